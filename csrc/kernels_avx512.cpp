// The CPU kernels compiled for the avx512 instruction set (flags in CMakeLists.txt).
#define IOTA_ISA_NS isa_avx512
#include "cpu_kernels.h"

namespace iota {
const Kernels kernels_avx512 = {"avx512", isa_avx512::encode_range, isa_avx512::decode_range, isa_avx512::reduce_range};
}
