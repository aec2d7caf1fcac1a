#include "frame.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <map>
#include <mutex>
#include <thread>

#include "codec_math.h"

namespace iota {
namespace {

const char kMagic[4] = {'I', 'O', 'T', 'Q'};

template <typename T>
void put(uint8_t* p, size_t off, T v) {
  memcpy(p + off, &v, sizeof(T));  // little-endian hosts only (checked in bindings)
}
template <typename T>
T get(const uint8_t* p, size_t off) {
  T v;
  memcpy(&v, p + off, sizeof(T));
  return v;
}

size_t element_size(uint8_t dtype) { return dtype == DT_F32 ? 4 : 2; }

size_t wire_element_size(uint8_t kind, uint8_t dtype) {
  switch (kind) {
    case KIND_RAW: return element_size(dtype);
    case KIND_F32: return 4;
    default: return 2;
  }
}

bool is_power_of_two(uint64_t v) { return v && !(v & (v - 1)); }

// Everything a spec must satisfy; the message names the field. Used for both
// encode (CodecError) and parse (FrameError).
std::string spec_problem(const FrameSpec& s) {
  if (s.kind > KIND_BF16) return "unknown kind " + std::to_string(s.kind);
  if (s.dtype > DT_BF16) return "unknown dtype " + std::to_string(s.dtype);
  if (s.flags & ~FLAG_ALL) return "unknown flag bits " + std::to_string(s.flags);
  if (s.shape.size() > kMaxDims) return "too many dimensions (" + std::to_string(s.shape.size()) + " > 8)";
  uint64_t n = 1;
  for (uint64_t d : s.shape) {
    if (d > kMaxNumel) return "dimension " + std::to_string(d) + " too large";
    if (d != 0 && n > kMaxNumel / d) return "too many elements";
    n *= d;
  }
  if (n != s.numel) return "shape does not match numel " + std::to_string(s.numel);
  if (s.kind == KIND_INT) {
    if (s.bits != 2 && s.bits != 4 && s.bits != 8) return "bits must be 2, 4 or 8, not " + std::to_string(s.bits);
    if (!is_power_of_two(s.block) || s.block < 32 || s.block > kMaxBlock)
      return "block must be a power of two in [32, 4096], not " + std::to_string(s.block);
    if (!(s.flags & FLAG_STOCHASTIC) && s.seed != 0) return "seed given without stochastic rounding";
  } else {
    if (s.bits != 0 || s.block != 0 || s.seed != 0 || (s.flags & ~FLAG_NONFINITE_OK))
      return "float kinds take no bits, block, seed or quantization flags";
  }
  return "";
}

FrameLayout compute_layout(const FrameSpec& s) {
  FrameLayout l;
  l.header = kFixedHeader + 8 * s.shape.size();
  if (s.kind == KIND_INT) {
    const size_t ssize = (s.flags & FLAG_SCALE_F32) ? 4 : 2;
    l.scales_len = num_blocks(s.numel, s.block) * ssize * ((s.flags & FLAG_MINMAX) ? 2 : 1);
    l.codes_len = code_bytes(s.numel, s.bits);
  } else {
    l.scales_len = 0;
    l.codes_len = s.numel * wire_element_size(s.kind, s.dtype);
  }
  l.scales_off = l.header;
  l.codes_off = l.scales_off + l.scales_len;
  l.checksum_off = l.codes_off + l.codes_len;
  l.total = l.checksum_off + 8;
  return l;
}

// Runs f(r0, r1) over [0, units) on up to `threads` threads (0: automatic,
// one thread per ~1 MiB of elements, since waking a thread costs more than
// small calls take).
template <typename F>
void parallel_ranges(int64_t units, int64_t unit_elems, int threads, F f) {
  int64_t t = threads;
  if (t <= 0) {
    t = std::max<int64_t>(1, std::thread::hardware_concurrency());
    t = std::min<int64_t>(t, std::max<int64_t>(1, units * unit_elems / (1 << 20)));
  }
  t = std::max<int64_t>(1, std::min<int64_t>(t, units));
  if (t == 1) {
    f(0, units);
    return;
  }
  std::vector<std::thread> pool;
  const int64_t per = (units + t - 1) / t;
  for (int64_t i = 1; i < t; i++) {
    const int64_t r0 = std::min(units, i * per), r1 = std::min(units, (i + 1) * per);
    pool.emplace_back([=] { f(r0, r1); });
  }
  f(0, std::min(units, per));
  for (auto& th : pool) th.join();
}

// XXH64 (Yann Collet), seed 0.
constexpr uint64_t P1 = 11400714785074694791ULL, P2 = 14029467366897019727ULL, P3 = 1609587929392839161ULL,
                   P4 = 9650029242287828579ULL, P5 = 2870177450012600261ULL;
inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
inline uint64_t xxh_round(uint64_t acc, uint64_t v) { return rotl(acc + v * P2, 31) * P1; }
inline uint64_t xxh_merge(uint64_t acc, uint64_t v) { return (acc ^ xxh_round(0, v)) * P1 + P4; }

const Kernels* pick_default_kernels() {
#if defined(IOTA_X86_ISAS)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return &kernels_avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return &kernels_avx2;
#endif
  return &kernels_baseline;
}

const Kernels* g_kernels = pick_default_kernels();

}  // namespace

uint64_t checksum(const uint8_t* p, size_t len) {
  const uint8_t* end = p + len;
  uint64_t h;
  if (len >= 32) {
    uint64_t v1 = P1 + P2, v2 = P2, v3 = 0, v4 = 0 - P1;
    const uint8_t* limit = end - 32;
    do {
      v1 = xxh_round(v1, get<uint64_t>(p, 0));
      v2 = xxh_round(v2, get<uint64_t>(p, 8));
      v3 = xxh_round(v3, get<uint64_t>(p, 16));
      v4 = xxh_round(v4, get<uint64_t>(p, 24));
      p += 32;
    } while (p <= limit);
    h = rotl(v1, 1) + rotl(v2, 7) + rotl(v3, 12) + rotl(v4, 18);
    h = xxh_merge(h, v1);
    h = xxh_merge(h, v2);
    h = xxh_merge(h, v3);
    h = xxh_merge(h, v4);
  } else {
    h = P5;
  }
  h += (uint64_t)len;
  for (; p + 8 <= end; p += 8) h = rotl(h ^ xxh_round(0, get<uint64_t>(p, 0)), 27) * P1 + P4;
  if (p + 4 <= end) {
    h = rotl(h ^ (uint64_t)get<uint32_t>(p, 0) * P1, 23) * P2 + P3;
    p += 4;
  }
  for (; p < end; p++) h = rotl(h ^ (uint64_t)(*p) * P5, 11) * P1;
  h ^= h >> 33;
  h *= P2;
  h ^= h >> 29;
  h *= P3;
  h ^= h >> 32;
  return h;
}

void seal_frame(uint8_t* frame, size_t size) {
  if (size < 8) throw FrameError("frame too short to seal");
  put<uint64_t>(frame, size - 8, checksum(frame, size - 8));
}

FrameLayout layout_for(const FrameSpec& spec) {
  std::string problem = spec_problem(spec);
  if (!problem.empty()) throw CodecError("invalid codec spec: " + problem);
  return compute_layout(spec);
}

void write_header(const FrameSpec& s, const FrameLayout& l, uint8_t* out) {
  memcpy(out, kMagic, 4);
  put<uint8_t>(out, 4, kFrameVersion);
  put<uint8_t>(out, 5, s.kind);
  put<uint8_t>(out, 6, s.bits);
  put<uint8_t>(out, 7, s.flags);
  put<uint8_t>(out, 8, s.dtype);
  put<uint8_t>(out, 9, (uint8_t)s.shape.size());
  put<uint16_t>(out, 10, 0);
  put<uint32_t>(out, 12, s.block);
  put<uint64_t>(out, 16, s.seed);
  put<uint64_t>(out, 24, s.numel);
  put<uint64_t>(out, 32, (uint64_t)l.scales_len);
  put<uint64_t>(out, 40, (uint64_t)l.codes_len);
  for (size_t i = 0; i < s.shape.size(); i++) put<uint64_t>(out, kFixedHeader + 8 * i, s.shape[i]);
}

FrameSpec parse_frame(const uint8_t* f, size_t size, FrameLayout* layout, bool verify_payload) {
  if (size < kFixedHeader + 8)
    throw FrameError("frame truncated: " + std::to_string(size) + " bytes is shorter than the fixed header");
  if (memcmp(f, kMagic, 4) != 0) throw FrameError("not an iota frame (bad magic)");
  if (get<uint8_t>(f, 4) != kFrameVersion)
    throw FrameError("unsupported frame version " + std::to_string(get<uint8_t>(f, 4)));
  FrameSpec s;
  s.kind = get<uint8_t>(f, 5);
  s.bits = get<uint8_t>(f, 6);
  s.flags = get<uint8_t>(f, 7);
  s.dtype = get<uint8_t>(f, 8);
  const uint8_t ndim = get<uint8_t>(f, 9);
  if (get<uint16_t>(f, 10) != 0) throw FrameError("reserved header bytes are not zero");
  s.block = get<uint32_t>(f, 12);
  s.seed = get<uint64_t>(f, 16);
  s.numel = get<uint64_t>(f, 24);
  if (ndim > kMaxDims) throw FrameError("frame declares " + std::to_string(ndim) + " dimensions (at most 8)");
  if (size < kFixedHeader + 8 * (size_t)ndim + 8) throw FrameError("frame truncated inside its shape");
  for (int i = 0; i < ndim; i++) s.shape.push_back(get<uint64_t>(f, kFixedHeader + 8 * i));
  std::string problem = spec_problem(s);
  if (!problem.empty()) throw FrameError("invalid frame header: " + problem);
  FrameLayout l = compute_layout(s);
  if (get<uint64_t>(f, 32) != l.scales_len || get<uint64_t>(f, 40) != l.codes_len)
    throw FrameError("frame section lengths do not match its header");
  if (size != l.total)
    throw FrameError("frame is " + std::to_string(size) + " bytes but its header describes " +
                     std::to_string(l.total) + " (truncated or padded)");
  *layout = l;
  if (!verify_payload) return s;
  if (checksum(f, l.checksum_off) != get<uint64_t>(f, l.checksum_off))
    throw FrameError("frame checksum mismatch (corrupted in transit?)");
  if (s.kind == KIND_INT) {
    const bool f16 = !(s.flags & FLAG_SCALE_F32);
    const int64_t nb = num_blocks(s.numel, s.block), per = (s.flags & FLAG_MINMAX) ? 2 : 1;
    for (int64_t i = 0; i < nb * per; i++) {
      float v = f16 ? f16_bits_to_f32(get<uint16_t>(f, l.scales_off + 2 * i)) : get<float>(f, l.scales_off + 4 * i);
      bool ok = i < nb ? scale_is_valid(v) : (v >= -3.4028234663852886e38f && v <= 3.4028234663852886e38f);
      if (!ok) throw FrameError("frame holds a negative or non-finite scale in block " + std::to_string(i % nb));
    }
  }
  return s;
}

void encode_payload(const FrameSpec& s, const FrameLayout& l, const void* src, uint8_t* frame, int threads) {
  EncodeJob job{src, s.dtype, (int64_t)s.numel, s.kind, s.bits, (int64_t)s.block, s.flags, s.seed,
                frame + l.scales_off, frame + l.codes_off};
  const Kernels& k = *g_kernels;
  const int64_t units = work_units(s.kind, job.numel, job.block);
  std::atomic<int> status{STATUS_OK};
  parallel_ranges(units, s.kind == KIND_INT ? job.block : kMaxBlock, threads, [&](int64_t r0, int64_t r1) {
    Status st = k.encode(job, r0, r1);
    if (st != STATUS_OK) status.store(st);
  });
  if (status == STATUS_NONFINITE)
    throw CodecError("input holds NaN or infinity; clean it or pass allow_nonfinite=True (they then encode as 0)");
  if (status == STATUS_SCALE_OVERFLOW)
    throw CodecError("a block's range overflows fp16 scales (|x| too large); use scale_dtype='fp32'");
}

namespace {
DecodeJob decode_job(const FrameSpec& s, const FrameLayout& l, const uint8_t* frame, void* out, uint8_t out_dtype,
                     float* acc, float weight) {
  return DecodeJob{frame + l.scales_off, frame + l.codes_off, s.dtype, (int64_t)s.numel, s.kind, s.bits,
                   (int64_t)s.block, s.flags, out, out_dtype, acc, weight};
}
}  // namespace

void decode_payload(const FrameSpec& s, const FrameLayout& l, const uint8_t* frame, void* out, uint8_t out_dtype,
                    float* acc, float weight, int threads) {
  const DecodeJob job = decode_job(s, l, frame, out, out_dtype, acc, weight);
  const Kernels& k = *g_kernels;
  parallel_ranges(work_units(s.kind, job.numel, job.block), s.kind == KIND_INT ? job.block : kMaxBlock, threads,
                  [&](int64_t r0, int64_t r1) { k.decode(job, r0, r1); });
}

void reduce_payloads(const std::vector<FrameSpec>& specs, const std::vector<FrameLayout>& layouts,
                     const std::vector<const uint8_t*>& frames, const float* weights, float* acc, double* gram,
                     int threads) {
  const int k = (int)frames.size();
  if (k == 0) return;
  std::vector<DecodeJob> jobs;
  for (int i = 0; i < k; i++) jobs.push_back(decode_job(specs[i], layouts[i], frames[i], nullptr, DT_F32, nullptr, 0.0f));
  const ReduceJob job{jobs.data(), weights, k, acc};
  const Kernels& kernels = *g_kernels;
  const FrameSpec& s = specs[0];
  // Each range sums its own inner products; they are added in range order, so the Gram matrix
  // does not depend on thread timing.
  std::mutex lock;
  std::map<int64_t, std::vector<double>> partial;
  parallel_ranges(work_units(s.kind, (int64_t)s.numel, s.block), s.kind == KIND_INT ? s.block : kMaxBlock, threads,
                  [&](int64_t r0, int64_t r1) {
                    std::vector<double> g((size_t)k * k, 0.0);
                    kernels.reduce(job, r0, r1, g.data());
                    std::lock_guard<std::mutex> hold(lock);
                    partial[r0] = std::move(g);
                  });
  std::fill(gram, gram + (size_t)k * k, 0.0);
  for (const auto& [r0, g] : partial)
    for (int i = 0; i < k; i++)
      for (int j = i; j < k; j++) gram[i * k + j] += g[i * k + j];
  for (int i = 0; i < k; i++)
    for (int j = 0; j < i; j++) gram[i * k + j] = gram[j * k + i];
}

const Kernels& active_kernels() { return *g_kernels; }

std::vector<std::string> available_isas() {
  std::vector<std::string> v{"baseline"};
#if defined(IOTA_X86_ISAS)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    v.push_back("avx2");
  if (pick_default_kernels() == &kernels_avx512) v.push_back("avx512");
#endif
  return v;
}

void select_isa(const std::string& name) {
  auto have = available_isas();
  if (std::find(have.begin(), have.end(), name) == have.end())
    throw CodecError("instruction set '" + name + "' is not available on this CPU");
  if (name == "baseline") g_kernels = &kernels_baseline;
#if defined(IOTA_X86_ISAS)
  if (name == "avx2") g_kernels = &kernels_avx2;
  if (name == "avx512") g_kernels = &kernels_avx512;
#endif
}

}  // namespace iota
