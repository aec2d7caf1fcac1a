// CUDA kernels of the integer codec kinds. Every per-element and per-block
// step calls the shared contract in csrc/codec_math.h, so the bytes match the
// CPU kernels (csrc/cpu_kernels.h); this file only decides which thread does
// which step. Build with --fmad=false (see codec_math.h).
//
// Work split: a thread block of kThreads threads owns a chunk of kChunk
// (= kMaxBlock) elements, i.e. kChunk / block quantization blocks, each
// handled by a "team" of block / kPerThread threads (2..256) that keeps its
// elements in registers between the statistics pass and the quantize pass.
// A thread owns whole code bytes (the 8 / bits elements of a byte), so
// packing needs no cross-thread communication.
//
// The per-thread steps are __host__ __device__ functions taking the thread's
// lane and team size explicitly, so that a host program can run them thread
// by thread and compare with the CPU kernels.
#include <cuda_runtime.h>

#include "codec_cuda.h"
#include "codec_math.h"
#include "kernels.h"

namespace iota::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 16;  // elements each thread holds
constexpr int kChunk = kThreads * kPerThread;
constexpr int kMinBlock = 32;
constexpr uint32_t kMaxFiniteBits = 0x7F7FFFFFu;
// Chunks are visited grid-stride beyond this many thread blocks (numel may
// reach 2^48, past the grid size limit).
constexpr int64_t kMaxGrid = int64_t(1) << 20;
static_assert(kChunk == kMaxBlock, "a chunk must hold whole quantization blocks");
static_assert(kMinBlock / kPerThread >= 2, "teams of one thread would need no reduction path");

// The per-thread loops must unroll on the device so that x[] lives in
// registers; the host compiler (which also sees them) knows no such pragma.
#if defined(__CUDA_ARCH__)
#define IOTA_UNROLL _Pragma("unroll")
#else
#define IOTA_UNROLL
#endif

// Output selector of the decode kernel: the first three are DType values.
enum Out : int { OUT_F32 = DT_F32, OUT_F16 = DT_F16, OUT_BF16 = DT_BF16, OUT_ACC = 3 };

IOTA_HD uint32_t umax(uint32_t a, uint32_t b) { return a > b ? a : b; }
IOTA_HD int32_t imin(int32_t a, int32_t b) { return a < b ? a : b; }
IOTA_HD int32_t imax(int32_t a, int32_t b) { return a > b ? a : b; }

// Scales sections carry no alignment guarantee (the frame header length
// depends on ndim and callers may pass views), so they are accessed bytewise,
// little-endian as the frame format says.
IOTA_HD void put_scale(uint8_t* p, int64_t i, float v, bool f16) {
  if (f16) {
    const uint32_t h = f32_to_f16_bits(v);
    p[2 * i] = (uint8_t)h;
    p[2 * i + 1] = (uint8_t)(h >> 8);
  } else {
    const uint32_t u = f32_bits(v);
    for (int k = 0; k < 4; k++) p[4 * i + k] = (uint8_t)(u >> (8 * k));
  }
}

IOTA_HD float get_scale(const uint8_t* p, int64_t i, bool f16) {
  if (f16) return f16_bits_to_f32((uint16_t)(p[2 * i] | (p[2 * i + 1] << 8)));
  uint32_t u = 0;
  for (int k = 0; k < 4; k++) u |= (uint32_t)p[4 * i + k] << (8 * k);
  return bits_f32(u);
}

template <int DT>
IOTA_HD float load_element(const void* __restrict__ src, int64_t i) {
  if (DT == DT_F32) return static_cast<const float*>(src)[i];
  const uint16_t h = static_cast<const uint16_t*>(src)[i];
  return DT == DT_F16 ? f16_bits_to_f32(h) : bf16_bits_to_f32(h);
}

// a + w * v rounded twice, whatever the compiler flags.
IOTA_HD float accumulate(float a, float w, float v) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, __fmul_rn(w, v));
#else
  return a + w * v;
#endif
}

struct EncodeParams {
  const void* src;
  int64_t numel;
  int64_t block;
  uint64_t seed;
  uint8_t* scales;
  uint8_t* offsets;  // min-max offsets: right after the nblocks scales
  uint8_t* codes;
  int* status;
  bool f16;  // scales stored as fp16
  bool nonfinite_ok;
};

// Statistics of (part of) a block. raw_amax sees the input as given, to
// detect non-finite values; amax / klo / khi see it after non-finite values
// were zeroed (when allowed), as the CPU computes them.
struct BlockStats {
  uint32_t raw_amax;
  uint32_t amax;
  int32_t klo, khi;
};

IOTA_HD BlockStats stats_empty() { return BlockStats{0u, 0u, INT32_MAX, INT32_MIN}; }

IOTA_HD void stats_merge(BlockStats& a, const BlockStats& b) {
  a.raw_amax = umax(a.raw_amax, b.raw_amax);
  a.amax = umax(a.amax, b.amax);
  a.klo = imin(a.klo, b.klo);
  a.khi = imax(a.khi, b.khi);
}

struct BlockParams {
  float s, inv, lo;
  int status;
};

// Scale and offset of a block from its statistics: encode_int_blocks'
// per-block arithmetic and checks, in the same order.
template <int BITS, bool MINMAX>
IOTA_HD BlockParams block_params(const BlockStats& st, bool f16, bool nonfinite_ok) {
  BlockParams p{0.0f, 0.0f, 0.0f, STATUS_OK};
  if (st.raw_amax > kMaxFiniteBits && !nonfinite_ok) {
    p.status = STATUS_NONFINITE;
    return p;
  }
  if (MINMAX) {
    p.lo = to_scale_dtype_down(from_order_key(st.klo), f16);
    p.s = to_scale_dtype((from_order_key(st.khi) - p.lo) / minmax_levels(BITS), f16);
    if (!scale_is_valid(p.s) || !(p.lo >= -3.4028234663852886e38f)) p.status = STATUS_SCALE_OVERFLOW;
  } else {
    p.s = to_scale_dtype(bits_f32(st.amax) / sym_qmax(BITS), f16);
    if (!scale_is_valid(p.s)) p.status = STATUS_SCALE_OVERFLOW;
  }
  p.inv = inverse_scale(p.s);
  return p;
}

// Thread `lane` of a team of `team` threads owns code bytes lane, lane + team,
// lane + 2 * team, ... of the block, i.e. elements PER * byte + k: adjacent
// threads touch adjacent memory. Slot j * PER + k of x holds element
// (lane + j * team) * PER + k; slots past the block's n elements hold 0 and
// stay out of the statistics.
template <int BITS, int DT, bool MINMAX>
IOTA_HD void load_thread(const EncodeParams& p, int64_t start, int n, int lane, int team, float (&x)[kPerThread],
                         BlockStats& st) {
  constexpr int PER = 8 / BITS;
  IOTA_UNROLL
  for (int j = 0; j < kPerThread / PER; j++) {
    IOTA_UNROLL
    for (int k = 0; k < PER; k++) {
      const int i = (lane + j * team) * PER + k;
      float v = 0.0f;
      if (i < n) {
        v = load_element<DT>(p.src, start + i);
        uint32_t a = f32_bits(v) & 0x7FFFFFFFu;
        st.raw_amax = umax(st.raw_amax, a);
        if (a > kMaxFiniteBits && p.nonfinite_ok) {
          v = 0.0f;
          a = 0u;
        }
        if (MINMAX) {
          const int32_t key = order_key(v);
          st.klo = imin(st.klo, key);
          st.khi = imax(st.khi, key);
        } else {
          st.amax = umax(st.amax, a);
        }
      }
      x[j * PER + k] = v;
    }
  }
}

// Quantizes and writes the code bytes the thread owns (see load_thread). The
// padding bits of a final partial byte stay zero.
template <int BITS, bool MINMAX, bool SR>
IOTA_HD void store_thread(const EncodeParams& p, int64_t start, int n, int lane, int team,
                          const float (&x)[kPerThread], const BlockParams& bp) {
  constexpr int PER = 8 / BITS;
  const float top = MINMAX ? minmax_levels(BITS) : sym_qmax(BITS);
  const int offset = MINMAX ? 0 : sym_offset(BITS);
  // A block never straddles a multiple of 2^32 elements (its size divides
  // 2^32), so its first element's key is every element's key.
  const uint32_t key = SR ? rng_key(p.seed, (uint64_t)start) : 0u;
  uint8_t* out = p.codes + start * BITS / 8;  // exact: start is a multiple of 32
  IOTA_UNROLL
  for (int j = 0; j < kPerThread / PER; j++) {
    const int byte = lane + j * team;
    if (byte * PER >= n) break;
    uint32_t b = 0;
    IOTA_UNROLL
    for (int k = 0; k < PER; k++) {
      const int i = byte * PER + k;
      if (i < n) {
        const float xi = x[j * PER + k];
        float q;
        if (MINMAX) {
          q = SR ? quantize_minmax_sr(xi, bp.lo, bp.inv, top, rng_uniform(key, (uint32_t)start + (uint32_t)i))
                 : quantize_minmax(xi, bp.lo, bp.inv, top);
        } else {
          q = SR ? quantize_sym_sr(xi, bp.inv, top, rng_uniform(key, (uint32_t)start + (uint32_t)i))
                 : quantize_sym(xi, bp.inv, top);
        }
        b |= (uint32_t)((int32_t)q + offset) << (k * BITS);
      }
    }
    out[byte] = (uint8_t)b;
  }
}

// Combines the statistics of each team. Teams are power-of-two groups of
// consecutive threads: up to a warp they reduce by xor shuffles (which stay
// inside an aligned group), larger ones also through shared memory.
// `team` is the same for every thread of the launch, so the barriers are
// reached uniformly.
template <bool MINMAX>
__device__ void team_reduce(BlockStats& st, int team, BlockStats* partial) {
  const int width = team < 32 ? team : 32;
  for (int off = 1; off < width; off <<= 1) {
    BlockStats o;
    o.raw_amax = __shfl_xor_sync(0xFFFFFFFFu, st.raw_amax, off);
    if (MINMAX) {
      o.amax = 0u;
      o.klo = __shfl_xor_sync(0xFFFFFFFFu, st.klo, off);
      o.khi = __shfl_xor_sync(0xFFFFFFFFu, st.khi, off);
    } else {
      o.amax = __shfl_xor_sync(0xFFFFFFFFu, st.amax, off);
      o.klo = INT32_MAX;
      o.khi = INT32_MIN;
    }
    stats_merge(st, o);
  }
  if (team > 32) {
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = st;
    __syncthreads();
    const int warps = team >> 5;
    const int first = (int)(threadIdx.x / team) * warps;
    st = partial[first];
    for (int w = 1; w < warps; w++) stats_merge(st, partial[first + w]);
    __syncthreads();  // partial is reused by the next chunk
  }
}

// A non-finite block outranks a scale overflow anywhere else, so the final
// status does not depend on the order in which blocks run.
__device__ void report(int* status, int code) {
  if (code == STATUS_NONFINITE) atomicExch(status, code);
  else atomicCAS(status, STATUS_OK, code);
}

// Two resident blocks per SM cap registers at 128: without a minimum ptxas
// settled on 64 and spilled the minmax variants.
template <int BITS, int DT, bool MINMAX, bool SR>
__global__ void __launch_bounds__(kThreads, 2) encode_kernel(EncodeParams p) {
  __shared__ BlockStats partial[kThreads / 32];
  const int team = (int)(p.block / kPerThread);
  const int lane = (int)threadIdx.x & (team - 1);
  const int64_t per_chunk = kChunk / p.block;
  const int64_t nblocks = num_blocks(p.numel, p.block);
  const int64_t nchunks = (nblocks + per_chunk - 1) / per_chunk;
  for (int64_t c = blockIdx.x; c < nchunks; c += gridDim.x) {
    const int64_t b = c * per_chunk + threadIdx.x / team;
    const int64_t start = b * p.block;
    const int n = b < nblocks ? (int)(p.numel - start < p.block ? p.numel - start : p.block) : 0;
    float x[kPerThread];
    BlockStats st = stats_empty();
    load_thread<BITS, DT, MINMAX>(p, start, n, lane, team, x, st);
    team_reduce<MINMAX>(st, team, partial);
    if (n == 0) continue;  // a team past the last block: no barrier follows
    const BlockParams bp = block_params<BITS, MINMAX>(st, p.f16, p.nonfinite_ok);
    if (lane == 0) {
      if (bp.status != STATUS_OK) {
        report(p.status, bp.status);
      } else {
        put_scale(p.scales, b, bp.s, p.f16);
        if (MINMAX) put_scale(p.offsets, b, bp.lo, p.f16);
      }
    }
    if (bp.status == STATUS_OK) store_thread<BITS, MINMAX, SR>(p, start, n, lane, team, x, bp);
  }
}

struct DecodeParams {
  const uint8_t* scales;
  const uint8_t* offsets;
  const uint8_t* codes;
  int64_t numel;
  int64_t block;
  int log2_block;
  bool f16;
  void* out;
  float* acc;
  float weight;
};

// Decodes element i (one thread per element: the code byte read is shared by
// neighbouring threads, the output stores coalesce).
template <int BITS, bool MINMAX, int OUT>
IOTA_HD void decode_element(const DecodeParams& p, int64_t i, float s, float lo) {
  const int64_t bit = i * BITS;
  const int code = (int)(((uint32_t)p.codes[bit >> 3] >> (bit & 7)) & ((1u << BITS) - 1u));
  const float v = MINMAX ? dequantize_minmax(code, s, lo) : dequantize_sym(code, sym_offset(BITS), s);
  if (OUT == OUT_ACC) p.acc[i] = accumulate(p.acc[i], p.weight, v);
  else if (OUT == OUT_F32) static_cast<float*>(p.out)[i] = v;
  else if (OUT == OUT_F16) static_cast<uint16_t*>(p.out)[i] = f32_to_f16_bits(v);
  else static_cast<uint16_t*>(p.out)[i] = f32_to_bf16_bits(v);
}

template <int BITS, bool MINMAX, int OUT>
__global__ void __launch_bounds__(kThreads) decode_kernel(DecodeParams p) {
  // The chunk's scales (and offsets), decoded once instead of per element.
  __shared__ float scale[kChunk / kMinBlock];
  __shared__ float lo[MINMAX ? kChunk / kMinBlock : 1];
  static_assert(kChunk / kMinBlock <= kThreads, "one scale per thread");
  const int64_t per_chunk = kChunk / p.block;
  const int64_t nblocks = num_blocks(p.numel, p.block);
  const int64_t nchunks = (p.numel + kChunk - 1) / kChunk;
  for (int64_t c = blockIdx.x; c < nchunks; c += gridDim.x) {
    const int64_t b0 = c * per_chunk;
    if ((int64_t)threadIdx.x < per_chunk && b0 + threadIdx.x < nblocks) {
      scale[threadIdx.x] = get_scale(p.scales, b0 + threadIdx.x, p.f16);
      if (MINMAX) lo[threadIdx.x] = get_scale(p.offsets, b0 + threadIdx.x, p.f16);
    }
    __syncthreads();
#pragma unroll 4
    for (int k = 0; k < kPerThread; k++) {
      const int r = (int)threadIdx.x + k * kThreads;
      const int64_t i = c * kChunk + r;
      if (i >= p.numel) break;
      const int lb = r >> p.log2_block;
      decode_element<BITS, MINMAX, OUT>(p, i, scale[lb], MINMAX ? lo[lb] : 0.0f);
    }
    __syncthreads();  // scale / lo are reused by the next chunk
  }
}

// Kernel selection: one instantiation per (bits, dtype, scheme, rounding) and
// per (bits, scheme, output), dispatched like the CPU's encode_int_scheme.

int grid_for(int64_t chunks) { return (int)(chunks < kMaxGrid ? chunks : kMaxGrid); }

template <int BITS, int DT, bool MINMAX>
int launch_encode(const EncodeParams& p, bool sr, int grid, cudaStream_t stream) {
  if (sr) encode_kernel<BITS, DT, MINMAX, true><<<grid, kThreads, 0, stream>>>(p);
  else encode_kernel<BITS, DT, MINMAX, false><<<grid, kThreads, 0, stream>>>(p);
  return (int)cudaGetLastError();
}

template <int BITS, int DT>
int launch_encode(const EncodeParams& p, bool minmax, bool sr, int grid, cudaStream_t stream) {
  return minmax ? launch_encode<BITS, DT, true>(p, sr, grid, stream) : launch_encode<BITS, DT, false>(p, sr, grid, stream);
}

template <int BITS>
int launch_encode(const EncodeParams& p, int dtype, bool minmax, bool sr, int grid, cudaStream_t stream) {
  switch (dtype) {
    case DT_F32: return launch_encode<BITS, DT_F32>(p, minmax, sr, grid, stream);
    case DT_F16: return launch_encode<BITS, DT_F16>(p, minmax, sr, grid, stream);
    default: return launch_encode<BITS, DT_BF16>(p, minmax, sr, grid, stream);
  }
}

template <int BITS, bool MINMAX>
int launch_decode(const DecodeParams& p, int out, int grid, cudaStream_t stream) {
  switch (out) {
    case OUT_F32: decode_kernel<BITS, MINMAX, OUT_F32><<<grid, kThreads, 0, stream>>>(p); break;
    case OUT_F16: decode_kernel<BITS, MINMAX, OUT_F16><<<grid, kThreads, 0, stream>>>(p); break;
    case OUT_BF16: decode_kernel<BITS, MINMAX, OUT_BF16><<<grid, kThreads, 0, stream>>>(p); break;
    default: decode_kernel<BITS, MINMAX, OUT_ACC><<<grid, kThreads, 0, stream>>>(p); break;
  }
  return (int)cudaGetLastError();
}

template <int BITS>
int launch_decode(const DecodeParams& p, bool minmax, int out, int grid, cudaStream_t stream) {
  return minmax ? launch_decode<BITS, true>(p, out, grid, stream) : launch_decode<BITS, false>(p, out, grid, stream);
}

bool valid_geometry(int64_t numel, int bits, int64_t block) {
  return numel >= 0 && (uint64_t)numel <= (uint64_t(1) << 48) && (bits == 2 || bits == 4 || bits == 8) &&
         block >= kMinBlock && block <= kMaxBlock && (block & (block - 1)) == 0;
}

bool valid_dtype(int dt) { return dt == DT_F32 || dt == DT_F16 || dt == DT_BF16; }

int log2_of(int64_t v) {
  int l = 0;
  while ((int64_t(1) << l) < v) l++;
  return l;
}

}  // namespace

int encode(const void* src, int dtype, int64_t numel, int bits, int64_t block, int flags, uint64_t seed,
           void* scales, void* codes, int* status, void* stream) {
  if (!valid_geometry(numel, bits, block) || !valid_dtype(dtype) || (flags & ~FLAG_ALL) != 0)
    return (int)cudaErrorInvalidValue;
  if (numel == 0) return (int)cudaSuccess;
  if (!src || !scales || !codes || !status) return (int)cudaErrorInvalidValue;
  const bool f16 = !(flags & FLAG_SCALE_F32);
  const int64_t nblocks = num_blocks(numel, block);
  EncodeParams p;
  p.src = src;
  p.numel = numel;
  p.block = block;
  p.seed = seed;
  p.scales = static_cast<uint8_t*>(scales);
  p.offsets = p.scales + nblocks * (f16 ? 2 : 4);
  p.codes = static_cast<uint8_t*>(codes);
  p.status = status;
  p.f16 = f16;
  p.nonfinite_ok = (flags & FLAG_NONFINITE_OK) != 0;
  const bool minmax = flags & FLAG_MINMAX, sr = flags & FLAG_STOCHASTIC;
  const int grid = grid_for((numel + kChunk - 1) / kChunk);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (bits) {
    case 8: return launch_encode<8>(p, dtype, minmax, sr, grid, st);
    case 4: return launch_encode<4>(p, dtype, minmax, sr, grid, st);
    default: return launch_encode<2>(p, dtype, minmax, sr, grid, st);
  }
}

int decode(const void* scales, const void* codes, int64_t numel, int bits, int64_t block, int flags, void* out,
           int out_dtype, float* acc, float weight, void* stream) {
  if (!valid_geometry(numel, bits, block) || (flags & ~FLAG_ALL) != 0) return (int)cudaErrorInvalidValue;
  if (!acc && !valid_dtype(out_dtype)) return (int)cudaErrorInvalidValue;
  if (numel == 0) return (int)cudaSuccess;
  if (!scales || !codes || (!acc && !out)) return (int)cudaErrorInvalidValue;
  const bool f16 = !(flags & FLAG_SCALE_F32);
  DecodeParams p;
  p.scales = static_cast<const uint8_t*>(scales);
  p.offsets = p.scales + num_blocks(numel, block) * (f16 ? 2 : 4);
  p.codes = static_cast<const uint8_t*>(codes);
  p.numel = numel;
  p.block = block;
  p.log2_block = log2_of(block);
  p.f16 = f16;
  p.out = out;
  p.acc = acc;
  p.weight = weight;
  const bool minmax = flags & FLAG_MINMAX;
  const int target = acc ? OUT_ACC : out_dtype;
  const int grid = grid_for((numel + kChunk - 1) / kChunk);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (bits) {
    case 8: return launch_decode<8>(p, minmax, target, grid, st);
    case 4: return launch_decode<4>(p, minmax, target, grid, st);
    default: return launch_decode<2>(p, minmax, target, grid, st);
  }
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // leave no error behind for the next call
    return 0;
  }
  return n;
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace iota::cuda
