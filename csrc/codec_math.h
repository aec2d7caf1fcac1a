// The codec's arithmetic contract, shared by the C++ CPU kernels and the CUDA
// kernels (kernels/cuda/), and mirrored line for line by the Triton kernels
// (kernels/triton/codec.py). Every backend must produce byte-identical frames,
// so every rounding step below is spelled out:
//
//  absmax block:  amax = max |x| (fp32, exact)
//                 s    = to_scale_dtype(amax / qmax)       one IEEE division, RNE
//                 inv  = s == 0 ? 0 : 1 / s                 one IEEE division
//                 q    = rint(clamp(x * inv, -qmax, qmax))  (or floor(. + u))
//                 code = q + 2^(bits-1)   decode: (code - 2^(bits-1)) * s
//  minmax block:  lo, hi = min x, max x under the total order (-0 < +0)
//                 lo_s = to_scale_dtype rounded *down*      so x - lo_s >= 0
//                 s    = to_scale_dtype((hi - lo_s) / levels)
//                 code = rint(clamp((x - lo_s) * inv, 0, levels))
//                 decode: fma(code, s, lo_s)
//  stochastic:    floor(clamp(y + u)) with u = rng(seed, element index) in [0,1)
//
// rint is round-half-even by the 1.5*2^23 trick (exact for |y| < 2^22, which
// the clamp guarantees) because compilers vectorize it and every backend can
// express it. Nothing here may be contracted into an FMA: build with
// -ffp-contract=off / nvcc --fmad=false.
#pragma once
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define IOTA_HD __host__ __device__ __forceinline__
#else
#define IOTA_HD inline
#endif

namespace iota {

// Element types of tensors entering or leaving the codec.
enum DType : uint8_t { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2 };
// What the codes section of a frame holds.
enum Kind : uint8_t { KIND_INT = 0, KIND_RAW = 1, KIND_F32 = 2, KIND_F16 = 3, KIND_BF16 = 4 };
// Frame flag bits.
enum Flag : uint8_t {
  FLAG_MINMAX = 1,       // asymmetric min-max scheme (else symmetric absmax)
  FLAG_STOCHASTIC = 2,   // stochastic rounding (else nearest-even)
  FLAG_SCALE_F32 = 4,    // scales stored as fp32 (else fp16)
  FLAG_NONFINITE_OK = 8, // non-finite inputs were allowed (they encode as 0)
  FLAG_ALL = 15,
};

constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23

IOTA_HD uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
#endif
}

IOTA_HD float bits_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, 4);
  return f;
#endif
}

IOTA_HD float rint_even(float y) { return (y + kRoundMagic) - kRoundMagic; }

IOTA_HD float floor_small(float y) {  // floor for |y| < 2^22
  float r = rint_even(y);
  return r > y ? r - 1.0f : r;
}

// IEEE round-to-nearest-even float -> binary16, written out so that host and
// device share one definition (results equal F16C / __float2half_rn).
IOTA_HD uint16_t f32_to_f16_bits(float f) {
  uint32_t x = f32_bits(f);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t ax = x & 0x7FFFFFFFu;
  if (ax > 0x7F800000u) return (uint16_t)(sign | 0x7E00u);  // NaN
  if (ax >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u);  // rounds to inf
  if (ax < 0x38800000u) {  // below 2^-14: a binary16 subnormal (or zero)
    float m = rint_even(bits_f32(ax) * 16777216.0f);  // exact scaling by 2^24
    return (uint16_t)(sign | (uint32_t)m);
  }
  return (uint16_t)(sign | ((ax + 0xC8000FFFu + ((ax >> 13) & 1u)) >> 13));
}

IOTA_HD float f16_bits_to_f32(uint16_t h) {
  uint32_t sign = ((uint32_t)h & 0x8000u) << 16;
  uint32_t e = ((uint32_t)h >> 10) & 0x1Fu;
  uint32_t m = (uint32_t)h & 0x3FFu;
  if (e == 0) return bits_f32(f32_bits((float)m * 5.9604644775390625e-08f) | sign);
  if (e == 31) return bits_f32(sign | 0x7F800000u | (m << 13));
  return bits_f32(sign | ((e + 112u) << 23) | (m << 13));
}

// Round-to-nearest-even float -> bfloat16 (NaN stays a quiet NaN), as torch does.
IOTA_HD uint16_t f32_to_bf16_bits(float f) {
  uint32_t x = f32_bits(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((x >> 16) | 0x40u);
  return (uint16_t)((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

IOTA_HD float bf16_bits_to_f32(uint16_t h) { return bits_f32((uint32_t)h << 16); }

// Total-order key of a float: signed integer order equals float order, -0 < +0.
IOTA_HD int32_t order_key(float f) {
  int32_t i = (int32_t)f32_bits(f);
  return i ^ ((i >> 31) & 0x7FFFFFFF);
}
IOTA_HD float from_order_key(int32_t k) { return bits_f32((uint32_t)(k ^ ((k >> 31) & 0x7FFFFFFF))); }

// Scale rounding to the stored dtype. fp32 scales below the smallest normal
// flush to 0 (the block then decodes to zeros, an error < 127 * 2^-126): their
// inverse would overflow to inf.
IOTA_HD float to_scale_dtype(float v, bool f16) {
  if (f16) return f16_bits_to_f32(f32_to_f16_bits(v));
  return v < 1.17549435082228750797e-38f ? 0.0f : v;
}

// Largest value of the scale dtype that is <= v (used for the min-max offset).
IOTA_HD float to_scale_dtype_down(float v, bool f16) {
  if (!f16) return v;
  uint16_t h = f32_to_f16_bits(v);
  if (f16_bits_to_f32(h) > v) {
    if ((h & 0x7FFFu) == 0) h = 0x8001u;      // +-0 above a tiny negative v
    else if (h & 0x8000u) h = (uint16_t)(h + 1);  // negative: away from zero
    else h = (uint16_t)(h - 1);                 // positive: toward zero
  }
  return f16_bits_to_f32(h);
}

IOTA_HD bool scale_is_valid(float s) { return s >= 0.0f && s <= 3.4028234663852886e38f; }

// Counter-based RNG for stochastic rounding: u(seed, i) in [0, 1), a multiple of
// 2^-24. mix32 is Chris Wellons' "lowbias32" bijective integer hash.
IOTA_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}
// Key for the 2^32 elements that share index >> 32.
IOTA_HD uint32_t rng_key(uint64_t seed, uint64_t index) {
  uint32_t hi = mix32((uint32_t)(index >> 32) + 0x9E3779B9u);
  return mix32((uint32_t)seed ^ mix32((uint32_t)(seed >> 32) ^ hi));
}
IOTA_HD float rng_uniform(uint32_t key, uint32_t index_lo) {
  return (float)(int32_t)(mix32(index_lo ^ key) >> 8) * 5.9604644775390625e-08f;
}

// Levels of a bit width: symmetric codes span [-qmax, qmax] (int2 is ternary),
// min-max codes span [0, levels].
IOTA_HD float sym_qmax(int bits) { return (float)((1 << (bits - 1)) - 1); }
IOTA_HD float minmax_levels(int bits) { return (float)((1 << bits) - 1); }
IOTA_HD int sym_offset(int bits) { return 1 << (bits - 1); }

IOTA_HD float inverse_scale(float s) { return s == 0.0f ? 0.0f : 1.0f / s; }

IOTA_HD float clampf(float y, float lo, float hi) {
  y = y > hi ? hi : y;
  return y < lo ? lo : y;
}

// Quantized value (an integer held in a float) of one element.
IOTA_HD float quantize_sym(float x, float inv, float qmax) {
  return rint_even(clampf(x * inv, -qmax, qmax));
}
IOTA_HD float quantize_sym_sr(float x, float inv, float qmax, float u) {
  return floor_small(clampf(x * inv + u, -qmax, qmax));
}
IOTA_HD float quantize_minmax(float x, float lo, float inv, float levels) {
  return rint_even(clampf((x - lo) * inv, 0.0f, levels));
}
IOTA_HD float quantize_minmax_sr(float x, float lo, float inv, float levels, float u) {
  return floor_small(clampf((x - lo) * inv + u, 0.0f, levels));
}

IOTA_HD float dequantize_sym(int code, int offset, float s) { return (float)(code - offset) * s; }
IOTA_HD float dequantize_minmax(int code, float s, float lo) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn((float)code, s, lo);
#else
  return __builtin_fmaf((float)code, s, lo);
#endif
}

// Frame geometry.
IOTA_HD int64_t num_blocks(int64_t numel, int64_t block) { return (numel + block - 1) / block; }
IOTA_HD int64_t code_bytes(int64_t numel, int bits) { return (numel * bits + 7) / 8; }

}  // namespace iota
