// Byte blocks reused within the process. A round moves hundreds of MB through
// fresh buffers (received parts, encoded means); memory fresh from the OS is
// cleared page by page on its first write, which perf put at 15-20% of an
// all-reduce's CPU on a 2-core VM. A block freed here goes to a free list by
// size class and the next block of that class takes it, already faulted in.
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace iota {

struct BlockPoolStats {
  size_t taken_bytes;   // handed out over the pool's life, reused or fresh
  size_t fresh_bytes;   // mapped from the OS over the pool's life
  size_t pooled_bytes;  // free, kept for reuse
  size_t out_bytes;     // held by live blocks
  size_t peak_bytes;    // the most ever held at once
};

// Thread-safe. The free lists hold at most as many bytes as were ever out at
// once (the peak), so the pool keeps no more than one busy moment needed; past
// that, a freed block evicts free blocks of other classes.
class BlockPool {
 public:
  static BlockPool& instance();
  // The capacity a block of `nbytes` takes: within 1/16 above it, page-aligned,
  // so sizes close together (a frame, a frame plus its attestation) share a class.
  static size_t size_class(size_t nbytes);
  uint8_t* take(size_t capacity);
  void give(uint8_t* block, size_t capacity);
  BlockPoolStats stats();

 private:
  std::mutex mu_;
  std::unordered_map<size_t, std::vector<uint8_t*>> free_;
  size_t taken_ = 0, fresh_ = 0, pooled_ = 0, out_ = 0, peak_ = 0;
};

// One block, returned to the pool when destroyed.
class ByteBlock {
 public:
  explicit ByteBlock(size_t nbytes);
  ~ByteBlock();
  ByteBlock(const ByteBlock&) = delete;
  ByteBlock& operator=(const ByteBlock&) = delete;
  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  size_t size_, capacity_;
  uint8_t* data_;
};

}  // namespace iota
