// Codec hot loops for the CPU. This file is compiled once per instruction set
// (kernels_baseline.cpp, kernels_avx2.cpp, kernels_avx512.cpp), each time in
// its own namespace, so the compiler vectorizes the same source for each
// target; dispatch.cpp picks the best one the running CPU supports.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "codec_math.h"
#include "kernels.h"

#if defined(__AVX2__) && !defined(__AVX512F__)
#include <immintrin.h>
#define IOTA_AVX2_SYM 1  // hand-written symmetric round-to-nearest codes (GCC vectorizes them poorly for AVX2)
#endif

#ifndef IOTA_ISA_NS
#error "define IOTA_ISA_NS before including cpu_kernels.h"
#endif

namespace iota {
namespace IOTA_ISA_NS {

#if defined(__F16C__)
// With F16C the compiler turns these into vectorizable vcvtps2ph/vcvtph2ps;
// both are IEEE round-to-nearest-even like the portable functions.
static inline float load_f16(uint16_t h) {
  _Float16 v;
  memcpy(&v, &h, 2);
  return (float)v;
}
static inline uint16_t store_f16(float f) {
  _Float16 v = (_Float16)f;
  uint16_t h;
  memcpy(&h, &v, 2);
  return h;
}
#else
static inline float load_f16(uint16_t h) { return f16_bits_to_f32(h); }
static inline uint16_t store_f16(float f) { return f32_to_f16_bits(f); }
#endif

// Copies n elements of `src` (dtype dt) into fp32 `dst`.
static void load_f32(const void* src, uint8_t dt, int64_t n, float* __restrict dst) {
  if (dt == DT_F32) {
    memcpy(dst, src, n * 4);
  } else if (dt == DT_F16) {
    const uint16_t* s = (const uint16_t*)src;
    for (int64_t i = 0; i < n; i++) dst[i] = load_f16(s[i]);
  } else {
    const uint16_t* s = (const uint16_t*)src;
    for (int64_t i = 0; i < n; i++) dst[i] = bf16_bits_to_f32(s[i]);
  }
}

// The dtype a float kind's codes are in: raw keeps the input's, the others name theirs.
static inline uint8_t float_wire(uint8_t kind, uint8_t dtype) {
  return kind == KIND_RAW ? dtype : (uint8_t)(kind - KIND_F32);
}

// `p` as fp32 values when they are fp32 and aligned as floats, else nullptr (then copy with load_f32).
static inline const float* as_f32(const void* p, uint8_t dt) {
  return dt == DT_F32 && reinterpret_cast<uintptr_t>(p) % alignof(float) == 0 ? static_cast<const float*>(p) : nullptr;
}

static void store_from_f32(const float* __restrict src, int64_t n, uint8_t dt, void* dst) {
  if (dt == DT_F32) {
    memcpy(dst, src, n * 4);
  } else if (dt == DT_F16) {
    uint16_t* d = (uint16_t*)dst;
    for (int64_t i = 0; i < n; i++) d[i] = store_f16(src[i]);
  } else {
    uint16_t* d = (uint16_t*)dst;
    for (int64_t i = 0; i < n; i++) d[i] = f32_to_bf16_bits(src[i]);
  }
}

static inline uint32_t abs_bits(float x) { return f32_bits(x) & 0x7FFFFFFFu; }
constexpr uint32_t kMaxFiniteBits = 0x7F7FFFFFu;

static uint32_t block_absmax_bits(const float* __restrict x, int64_t n) {
  uint32_t m = 0;
  for (int64_t i = 0; i < n; i++) m = std::max(m, abs_bits(x[i]));
  return m;
}

static void block_order_range(const float* __restrict x, int64_t n, int32_t* lo, int32_t* hi) {
  int32_t a = INT32_MAX, b = INT32_MIN;
  for (int64_t i = 0; i < n; i++) {
    int32_t k = order_key(x[i]);
    a = std::min(a, k);
    b = std::max(b, k);
  }
  *lo = a;
  *hi = b;
}

static bool has_nonfinite(const float* __restrict x, int64_t n) { return block_absmax_bits(x, n) > kMaxFiniteBits; }
constexpr int32_t kPosInfKey = 0x7F800000;               // order_key(+inf)
constexpr int32_t kNegInfKey = (int32_t)0x807FFFFFu;     // order_key(-inf)

static void zero_nonfinite(float* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; i++) x[i] = abs_bits(x[i]) > kMaxFiniteBits ? 0.0f : x[i];
}

#if defined(IOTA_AVX2_SYM)
// Symmetric nearest-even codes q + offset of n elements as bytes: quantize_sym
// op for op (MINPS(hi, y) is `y > hi ? hi : y`, MAXPS(lo, y) is `y < lo ? lo : y`).
static void sym_codes_avx2(const float* __restrict x, int64_t n, float inv, float qmax, int offset,
                           uint8_t* __restrict out) {
  const __m256 vinv = _mm256_set1_ps(inv), hi = _mm256_set1_ps(qmax), lo = _mm256_set1_ps(-qmax);
  const __m256 magic = _mm256_set1_ps(kRoundMagic);
  const __m256i voffset = _mm256_set1_epi32(offset);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes the per-lane packs
  auto codes8 = [&](const float* p) {
    __m256 y = _mm256_max_ps(lo, _mm256_min_ps(hi, _mm256_mul_ps(_mm256_loadu_ps(p), vinv)));
    y = _mm256_sub_ps(_mm256_add_ps(y, magic), magic);
    return _mm256_add_epi32(_mm256_cvttps_epi32(y), voffset);
  };
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    // Codes are 0..2^BITS-1, so the saturating packs never saturate.
    const __m256i ab = _mm256_packs_epi32(codes8(x + i), codes8(x + i + 8));
    const __m256i cd = _mm256_packs_epi32(codes8(x + i + 16), codes8(x + i + 24));
    _mm256_storeu_si256((__m256i*)(out + i), _mm256_permutevar8x32_epi32(_mm256_packus_epi16(ab, cd), order));
  }
  for (; i < n; i++) out[i] = (uint8_t)((int32_t)quantize_sym(x[i], inv, qmax) + offset);
}
#endif

// Quantizes one block of n elements into packed codes. Padding bits of a
// final partial byte stay zero.
template <int BITS, bool MINMAX, bool SR>
static void quantize_block(const float* __restrict x, int64_t n, float inv, float lo, uint32_t key,
                           uint32_t index0, uint8_t* __restrict out) {
  constexpr int PER = 8 / BITS;
  const float top = MINMAX ? minmax_levels(BITS) : sym_qmax(BITS);
  const int offset = MINMAX ? 0 : sym_offset(BITS);
  auto code = [&](int64_t i) -> uint32_t {
    float q;
    if (MINMAX) {
      q = SR ? quantize_minmax_sr(x[i], lo, inv, top, rng_uniform(key, index0 + (uint32_t)i))
             : quantize_minmax(x[i], lo, inv, top);
    } else {
      q = SR ? quantize_sym_sr(x[i], inv, top, rng_uniform(key, index0 + (uint32_t)i))
             : quantize_sym(x[i], inv, top);
    }
    return (uint32_t)((int32_t)q + offset);
  };
  alignas(64) uint8_t q[kMaxBlock];
  uint8_t* __restrict narrow = BITS == 8 ? out : q;
#if defined(IOTA_AVX2_SYM)
  if (!MINMAX && !SR) sym_codes_avx2(x, n, inv, top, offset, narrow);
  else
#endif
    for (int64_t i = 0; i < n; i++) narrow[i] = (uint8_t)code(i);
  if (BITS == 8) return;
  // Narrow codes first, then pack: two simple loops vectorize far better
  // than one loop with strided loads.
  const int64_t full = n / PER;
  for (int64_t j = 0; j < full; j++) {
    uint32_t b = 0;
    for (int k = 0; k < PER; k++) b |= (uint32_t)q[j * PER + k] << (k * BITS);
    out[j] = (uint8_t)b;
  }
  if (full * PER < n) {
    uint32_t b = 0;
    for (int64_t i = full * PER; i < n; i++) b |= (uint32_t)q[i] << ((i - full * PER) * BITS);
    out[full] = (uint8_t)b;
  }
}

template <int BITS, bool MINMAX>
static void dequantize_block(const uint8_t* __restrict codes, int64_t n, float s, float lo, float* __restrict y) {
  constexpr int PER = 8 / BITS;
  constexpr uint32_t MASK = (1u << BITS) - 1u;
  const int offset = sym_offset(BITS);
  auto value = [&](uint32_t c) -> float {
    return MINMAX ? dequantize_minmax((int)c, s, lo) : dequantize_sym((int)c, offset, s);
  };
  if (BITS == 8) {
    for (int64_t i = 0; i < n; i++) y[i] = value(codes[i]);
    return;
  }
  const int64_t full = n / PER;
  for (int64_t j = 0; j < full; j++) {
    const uint32_t b = codes[j];
    for (int k = 0; k < PER; k++) y[j * PER + k] = value((b >> (k * BITS)) & MASK);
  }
  for (int64_t i = full * PER; i < n; i++) y[i] = value((uint32_t(codes[full]) >> ((i - full * PER) * BITS)) & MASK);
}

static inline float read_scale(const uint8_t* p, int64_t i, bool f16) {
  if (f16) {
    uint16_t h;
    memcpy(&h, p + 2 * i, 2);
    return f16_bits_to_f32(h);
  }
  float f;
  memcpy(&f, p + 4 * i, 4);
  return f;
}

static inline void write_scale(uint8_t* p, int64_t i, float v, bool f16) {
  if (f16) {
    uint16_t h = f32_to_f16_bits(v);
    memcpy(p + 2 * i, &h, 2);
  } else {
    memcpy(p + 4 * i, &v, 4);
  }
}

template <int BITS, bool MINMAX, bool SR>
static Status encode_int_blocks(const EncodeJob& job, int64_t b0, int64_t b1) {
  alignas(64) float tmp[kMaxBlock];
  const bool f16 = !(job.flags & FLAG_SCALE_F32);
  const bool nonfinite_ok = job.flags & FLAG_NONFINITE_OK;
  const int64_t nblocks = num_blocks(job.numel, job.block);
  const size_t esize = job.dtype == DT_F32 ? 4 : 2;
  uint8_t* los = job.scales + nblocks * (f16 ? 2 : 4);
  for (int64_t b = b0; b < b1; b++) {
    const int64_t start = b * job.block;
    const int64_t n = std::min(job.block, job.numel - start);
    const void* src = (const uint8_t*)job.src + start * esize;
    const float* x;
    if (job.dtype == DT_F32) {
      x = (const float*)src;
    } else {
      load_f32(src, job.dtype, n, tmp);
      x = tmp;
    }
    // One pass of statistics per block; they also reveal non-finite input
    // (NaN/inf have the largest magnitude bits and the extreme order keys).
    uint32_t amax_bits = 0;
    int32_t klo = 0, khi = 0;
    bool nonfinite;
    if (MINMAX) {
      block_order_range(x, n, &klo, &khi);
      nonfinite = khi >= kPosInfKey || klo <= kNegInfKey;
    } else {
      amax_bits = block_absmax_bits(x, n);
      nonfinite = amax_bits > kMaxFiniteBits;
    }
    if (nonfinite) {
      if (!nonfinite_ok) return STATUS_NONFINITE;
      if (x != tmp) memcpy(tmp, x, n * 4);
      zero_nonfinite(tmp, n);
      x = tmp;
      if (MINMAX) block_order_range(x, n, &klo, &khi);
      else amax_bits = block_absmax_bits(x, n);
    }
    float s, lo = 0.0f;
    if (MINMAX) {
      lo = to_scale_dtype_down(from_order_key(klo), f16);
      s = to_scale_dtype((from_order_key(khi) - lo) / minmax_levels(BITS), f16);
      if (!scale_is_valid(s) || !(lo >= -3.4028234663852886e38f)) return STATUS_SCALE_OVERFLOW;
      write_scale(los, b, lo, f16);
    } else {
      s = to_scale_dtype(bits_f32(amax_bits) / sym_qmax(BITS), f16);
      if (!scale_is_valid(s)) return STATUS_SCALE_OVERFLOW;
    }
    write_scale(job.scales, b, s, f16);
    const uint32_t key = SR ? rng_key(job.seed, (uint64_t)start) : 0;
    quantize_block<BITS, MINMAX, SR>(x, n, inverse_scale(s), lo, key, (uint32_t)start,
                                     job.codes + start * BITS / 8);
  }
  return STATUS_OK;
}

template <int BITS, bool MINMAX>
static Status encode_int_sr(const EncodeJob& job, int64_t b0, int64_t b1) {
  return (job.flags & FLAG_STOCHASTIC) ? encode_int_blocks<BITS, MINMAX, true>(job, b0, b1)
                                       : encode_int_blocks<BITS, MINMAX, false>(job, b0, b1);
}

template <int BITS>
static Status encode_int_scheme(const EncodeJob& job, int64_t b0, int64_t b1) {
  return (job.flags & FLAG_MINMAX) ? encode_int_sr<BITS, true>(job, b0, b1) : encode_int_sr<BITS, false>(job, b0, b1);
}

// Float kinds: convert (or copy) elements [e0, e1) to the wire dtype.
static Status encode_float_range(const EncodeJob& job, int64_t e0, int64_t e1) {
  alignas(64) float tmp[kMaxBlock];
  const size_t esize = job.dtype == DT_F32 ? 4 : 2;
  const uint8_t wire = float_wire(job.kind, job.dtype);
  const size_t wsize = wire == DT_F32 ? 4 : 2;
  const bool check = !(job.flags & FLAG_NONFINITE_OK);
  for (int64_t e = e0; e < e1; e += kMaxBlock) {
    const int64_t n = std::min<int64_t>(kMaxBlock, e1 - e);
    const uint8_t* src = (const uint8_t*)job.src + e * esize;
    uint8_t* dst = job.codes + e * wsize;
    if (wire == job.dtype && !check) {
      memcpy(dst, src, n * esize);
      continue;
    }
    const float* x = as_f32(src, job.dtype);  // fp32 input is checked in place, not copied first
    if (x == nullptr) {
      load_f32(src, job.dtype, n, tmp);
      x = tmp;
    }
    if (check && has_nonfinite(x, n)) return STATUS_NONFINITE;
    if (wire == job.dtype) memcpy(dst, src, n * esize);  // raw bytes, NaN payloads included
    else store_from_f32(x, n, wire, dst);
  }
  return STATUS_OK;
}

static Status encode_range(const EncodeJob& job, int64_t r0, int64_t r1) {
  if (job.kind != KIND_INT) return encode_float_range(job, r0 * kMaxBlock, std::min(job.numel, r1 * kMaxBlock));
  switch (job.bits) {
    case 8: return encode_int_scheme<8>(job, r0, r1);
    case 4: return encode_int_scheme<4>(job, r0, r1);
    default: return encode_int_scheme<2>(job, r0, r1);
  }
}

// Writes decoded values of n elements starting at element `start` to the
// job's destination: stored as out_dtype, or accumulated acc += weight * v.
static void emit(const DecodeJob& job, int64_t start, int64_t n, const float* __restrict v) {
  if (job.acc) {
    float* __restrict a = job.acc + start;
    const float w = job.weight;
    for (int64_t i = 0; i < n; i++) a[i] = a[i] + w * v[i];
  } else {
    const size_t osize = job.out_dtype == DT_F32 ? 4 : 2;
    store_from_f32(v, n, job.out_dtype, (uint8_t*)job.out + (start - job.origin) * osize);
  }
}

template <int BITS, bool MINMAX>
static void decode_int_blocks(const DecodeJob& job, int64_t b0, int64_t b1) {
  alignas(64) float tmp[kMaxBlock];
  const bool f16 = !(job.flags & FLAG_SCALE_F32);
  const int64_t nblocks = num_blocks(job.numel, job.block);
  const uint8_t* los = job.scales + nblocks * (f16 ? 2 : 4);
  const bool direct = !job.acc && job.out_dtype == DT_F32;
  for (int64_t b = b0; b < b1; b++) {
    const int64_t start = b * job.block;
    const int64_t n = std::min(job.block, job.numel - start);
    const float s = read_scale(job.scales, b, f16);
    const float lo = MINMAX ? read_scale(los, b, f16) : 0.0f;
    float* y = direct ? (float*)job.out + (start - job.origin) : tmp;
    dequantize_block<BITS, MINMAX>(job.codes + start * BITS / 8, n, s, lo, y);
    if (!direct) emit(job, start, n, y);
  }
}

template <int BITS>
static void decode_int_scheme(const DecodeJob& job, int64_t b0, int64_t b1) {
  if (job.flags & FLAG_MINMAX) decode_int_blocks<BITS, true>(job, b0, b1);
  else decode_int_blocks<BITS, false>(job, b0, b1);
}

static void decode_float_range(const DecodeJob& job, int64_t e0, int64_t e1) {
  alignas(64) float tmp[kMaxBlock];
  const uint8_t wire = float_wire(job.kind, job.dtype);
  const size_t wsize = wire == DT_F32 ? 4 : 2;
  for (int64_t e = e0; e < e1; e += kMaxBlock) {
    const int64_t n = std::min<int64_t>(kMaxBlock, e1 - e);
    const uint8_t* src = job.codes + e * wsize;
    if (!job.acc && wire == job.out_dtype) {
      memcpy((uint8_t*)job.out + (e - job.origin) * wsize, src, n * wsize);
      continue;
    }
    const float* v = as_f32(src, wire);
    if (v == nullptr) {
      load_f32(src, wire, n, tmp);
      v = tmp;
    }
    emit(job, e, n, v);
  }
}

static void decode_range(const DecodeJob& job, int64_t r0, int64_t r1) {
  if (job.kind != KIND_INT) return decode_float_range(job, r0 * kMaxBlock, std::min(job.numel, r1 * kMaxBlock));
  switch (job.bits) {
    case 8: return decode_int_scheme<8>(job, r0, r1);
    case 4: return decode_int_scheme<4>(job, r0, r1);
    default: return decode_int_scheme<2>(job, r0, r1);
  }
}

// <a, b> over n values: kLanes independent partial sums, so the loop vectorizes
// without reassociating (no -ffast-math), then summed in double.
static double dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  constexpr int kLanes = 16;
  float lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; l++) lane[l] = lane[l] + a[i + l] * b[i + l];
  double sum = 0.0;
  for (int l = 0; l < kLanes; l++) sum += lane[l];
  for (; i < n; i++) sum += (double)a[i] * b[i];
  return sum;
}

// Windows of about kMaxBlock elements: each input's window is decoded once into
// a buffer that stays in cache, accumulated into acc, and multiplied with the others'.
static void reduce_range(const ReduceJob& job, int64_t r0, int64_t r1, double* gram) {
  if (job.k == 0) return;
  const DecodeJob& first = job.inputs[0];
  const int64_t unit = first.kind == KIND_INT ? first.block : kMaxBlock;
  const int64_t window = std::max<int64_t>(1, kMaxBlock / unit);
  const int k = job.k;
  std::vector<float> window_values((size_t)k * kMaxBlock);
  std::vector<const float*> decoded(k);  // each input's window: in place if its frame holds fp32, else decoded
  for (int64_t u0 = r0; u0 < r1; u0 += window) {
    const int64_t u1 = std::min(r1, u0 + window);
    const int64_t start = u0 * unit, n = std::min(first.numel, u1 * unit) - start;
    for (int i = 0; i < k; i++) {
      const DecodeJob& in = job.inputs[i];
      const bool f32_codes = in.kind != KIND_INT && float_wire(in.kind, in.dtype) == DT_F32;
      const float* v = f32_codes ? as_f32(in.codes + start * 4, DT_F32) : nullptr;
      if (v == nullptr) {
        DecodeJob into = in;
        into.acc = nullptr;
        into.out = window_values.data() + (size_t)i * kMaxBlock;
        into.out_dtype = DT_F32;
        into.origin = start;
        decode_range(into, u0, u1);
        v = window_values.data() + (size_t)i * kMaxBlock;
      }
      decoded[i] = v;
      float* __restrict a = job.acc + start;
      const float w = job.weights[i];
      for (int64_t j = 0; j < n; j++) a[j] = a[j] + w * v[j];  // as emit() does
    }
    for (int i = 0; i < k; i++)
      for (int j = i; j < k; j++) gram[i * k + j] += dot(decoded[i], decoded[j], n);
  }
}

}  // namespace IOTA_ISA_NS
}  // namespace iota
