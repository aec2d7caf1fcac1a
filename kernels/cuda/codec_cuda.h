// CUDA kernels of the integer codec kinds (KIND_INT), behind a plain C++
// interface so that the bindings compile without CUDA headers or libtorch.
// They produce the same scales and codes bytes as the CPU kernels
// (csrc/cpu_kernels.h); the float kinds are plain dtype casts and are left to
// the caller.
//
// All pointers are device pointers; `stream` is a cudaStream_t passed as void*
// (nullptr = the legacy default stream). Calls are asynchronous on the stream.
// They return 0 on success or a cudaError_t value (cudaErrorInvalidValue for
// bad arguments; cudaErrorNoDevice / cudaErrorInsufficientDriver when there is
// no usable GPU); error_string(code) describes it. numel may be 0 (nothing is
// launched) up to 2^48. Element arrays (src, out, acc) must be aligned to their
// element size, as tensors are; the scales and codes sections need no alignment.
#pragma once
#include <cstdint>

namespace iota::cuda {

// Encodes numel elements of `src` (dtype: iota::DType) into a frame's scales
// and codes sections.
//   bits   8, 4 or 2;  block  a power of two in [32, 4096];
//   flags  iota::Flag bits (FLAG_MINMAX, FLAG_STOCHASTIC, FLAG_SCALE_F32,
//          FLAG_NONFINITE_OK);
//   scales nblocks scales, then for FLAG_MINMAX nblocks offsets, each 2 bytes
//          (fp16 bits) or 4 bytes (FLAG_SCALE_F32), little-endian;
//   codes  code_bytes(numel, bits) bytes;
//   status device int the caller zeroes beforehand. Left 0 on success, else
//          set to iota::STATUS_NONFINITE (1) if any block held a non-finite
//          value without FLAG_NONFINITE_OK, otherwise STATUS_SCALE_OVERFLOW
//          (2) if a scale or offset overflowed. On a nonzero status the
//          scales and codes are garbage.
int encode(const void* src, int dtype, int64_t numel, int bits, int64_t block, int flags, uint64_t seed,
           void* scales, void* codes, int* status, void* stream);

// Decodes a frame's scales and codes. With acc == nullptr the values are
// stored to `out` as out_dtype (iota::DType); otherwise out is unused and
// acc[i] = acc[i] + weight * value (fp32, no fma).
int decode(const void* scales, const void* codes, int64_t numel, int bits, int64_t block, int flags, void* out,
           int out_dtype, float* acc, float weight, void* stream);

// Number of usable CUDA devices; 0 when there is no GPU or driver.
int device_count();

// Describes a return code of encode / decode.
const char* error_string(int code);

}  // namespace iota::cuda
