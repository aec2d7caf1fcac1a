// The CPU kernels compiled for the baseline instruction set (flags in CMakeLists.txt).
#define IOTA_ISA_NS isa_baseline
#include "cpu_kernels.h"

namespace iota {
const Kernels kernels_baseline = {"baseline", isa_baseline::encode_range, isa_baseline::decode_range, isa_baseline::reduce_range};
}
