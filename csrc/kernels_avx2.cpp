// The CPU kernels compiled for the avx2 instruction set (flags in CMakeLists.txt).
#define IOTA_ISA_NS isa_avx2
#include "cpu_kernels.h"

namespace iota {
const Kernels kernels_avx2 = {"avx2", isa_avx2::encode_range, isa_avx2::decode_range, isa_avx2::reduce_range};
}
