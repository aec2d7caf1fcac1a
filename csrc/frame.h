// Wire frames: layout, validation, and encode/decode of a whole frame.
//
// Frame (little-endian):
//   0  "IOTQ"   4  version u8   5  kind u8   6  bits u8   7  flags u8
//   8  dtype u8 (of the encoded tensor)      9  ndim u8  10  reserved u16 = 0
//  12  block u32   16  seed u64   24  numel u64   32  scales_len u64
//  40  codes_len u64   48  shape u64[ndim]
//  then scales (scale per block; min-max adds an offset per block after them),
//  codes (packed densely, element i of a b-bit code at bit (i*b) % 8 of byte
//  i*b/8), and an XXH64 checksum (u64) of every byte before it.
#pragma once
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels.h"

namespace iota {

constexpr uint8_t kFrameVersion = 1;
constexpr size_t kFixedHeader = 48;
constexpr int kMaxDims = 8;
constexpr uint64_t kMaxNumel = uint64_t(1) << 48;

// A malformed, truncated or hostile frame.
struct FrameError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// Input the codec cannot encode as asked (non-finite values, scale overflow, bad spec).
struct CodecError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct FrameSpec {
  uint8_t kind = 0;
  uint8_t bits = 8;
  uint8_t flags = 0;
  uint8_t dtype = 0;
  uint32_t block = 64;
  uint64_t seed = 0;
  std::vector<uint64_t> shape;
  uint64_t numel = 0;
};

struct FrameLayout {
  size_t header, scales_off, scales_len, codes_off, codes_len, checksum_off, total;
};

// Checks a spec (throws CodecError) and computes its frame layout.
FrameLayout layout_for(const FrameSpec& spec);
void write_header(const FrameSpec& spec, const FrameLayout& layout, uint8_t* out);
// Validates every header field and the lengths, then (verify_payload) the
// checksum and the scales; throws FrameError.
FrameSpec parse_frame(const uint8_t* frame, size_t size, FrameLayout* layout, bool verify_payload = true);

uint64_t checksum(const uint8_t* data, size_t size);
// Writes the checksum of frame[0, size-8) into its last 8 bytes.
void seal_frame(uint8_t* frame, size_t size);

// Fills the scales and codes of a frame whose header is written.
void encode_payload(const FrameSpec& spec, const FrameLayout& layout, const void* src, uint8_t* frame, int threads);
// Decodes a parsed frame into out (out_dtype), or accumulates acc += weight * value.
void decode_payload(const FrameSpec& spec, const FrameLayout& layout, const uint8_t* frame, void* out,
                    uint8_t out_dtype, float* acc, float weight, int threads);

// Reduces k parsed frames of one layout (same kind, bits, block, flags, numel): acc += weights[i] * x_i in
// order, exactly as k decode_payload accumulations, and gram (k x k, row-major) = the x_i's inner products.
void reduce_payloads(const std::vector<FrameSpec>& specs, const std::vector<FrameLayout>& layouts,
                     const std::vector<const uint8_t*>& frames, const float* weights, float* acc, double* gram,
                     int threads);

const Kernels& active_kernels();
std::vector<std::string> available_isas();
void select_isa(const std::string& name);  // throws CodecError if unsupported here

}  // namespace iota
