// Interface between the frame logic and the per-instruction-set CPU kernels.
#pragma once
#include <cstdint>

namespace iota {

constexpr int64_t kMaxBlock = 4096;

enum Status : int { STATUS_OK = 0, STATUS_NONFINITE = 1, STATUS_SCALE_OVERFLOW = 2 };

struct EncodeJob {
  const void* src;  // numel elements of dtype
  uint8_t dtype;
  int64_t numel;
  uint8_t kind;
  int bits;
  int64_t block;
  uint8_t flags;
  uint64_t seed;
  uint8_t* scales;  // scales section of the frame (scales, then offsets for min-max)
  uint8_t* codes;   // codes section of the frame
};

struct DecodeJob {
  const uint8_t* scales;
  const uint8_t* codes;
  uint8_t dtype;  // dtype the frame was encoded from
  int64_t numel;
  uint8_t kind;
  int bits;
  int64_t block;
  uint8_t flags;
  void* out;  // decode: numel elements of out_dtype
  uint8_t out_dtype;
  float* acc;  // accumulate: acc += weight * value (then out is unused)
  float weight;
  int64_t origin = 0;  // the element out[0] holds (a decode into a window of the frame)
};

// k frames of one layout reduced in one pass: acc += weight_i * x_i in input
// order (the decode-accumulate contract, element by element) and the inner
// products of the decoded x_i (their Gram matrix), without decoding twice.
struct ReduceJob {
  const DecodeJob* inputs;  // k decode jobs; their acc and weight are unused
  const float* weights;
  int k;
  float* acc;  // numel fp32 values
};

// One instruction set's kernels. A "range" is [r0, r1) in units of quantization
// blocks for integer kinds, and of kMaxBlock elements for float kinds.
struct Kernels {
  const char* isa;
  Status (*encode)(const EncodeJob&, int64_t r0, int64_t r1);
  void (*decode)(const DecodeJob&, int64_t r0, int64_t r1);
  // Reduces the range's units; gram (k x k, row-major) += the range's inner products.
  void (*reduce)(const ReduceJob&, int64_t r0, int64_t r1, double* gram);
};

extern const Kernels kernels_baseline;
#if defined(IOTA_X86_ISAS)
extern const Kernels kernels_avx2;
extern const Kernels kernels_avx512;
#endif

// Work units of a frame's encode/decode (see Kernels).
inline int64_t work_units(uint8_t kind, int64_t numel, int64_t block) {
  const int64_t unit = kind == 0 ? block : kMaxBlock;
  return (numel + unit - 1) / unit;
}

}  // namespace iota
