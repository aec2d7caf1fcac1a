#include "block_pool.h"

#include <new>
#include <utility>

#if defined(__linux__)
#include <sys/mman.h>
#else
#include <cstdlib>
#endif

namespace iota {

namespace {

constexpr size_t kPage = 4096;
constexpr size_t kHuge = 2u << 20;

uint8_t* map_fresh(size_t capacity) {
#if defined(__linux__)
  void* p = mmap(nullptr, capacity, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
#if defined(MADV_HUGEPAGE)
  if (capacity >= 2 * kHuge) madvise(p, capacity, MADV_HUGEPAGE);  // advisory: failure is harmless
#endif
  return (uint8_t*)p;
#else
  void* p = std::aligned_alloc(kPage, capacity);
  if (p == nullptr) throw std::bad_alloc();
  return (uint8_t*)p;
#endif
}

void unmap(uint8_t* block, size_t capacity) {
#if defined(__linux__)
  munmap(block, capacity);
#else
  (void)capacity;
  std::free(block);
#endif
}

}  // namespace

BlockPool& BlockPool::instance() {
  static BlockPool* pool = new BlockPool();  // never destroyed: blocks may outlive static destructors
  return *pool;
}

size_t BlockPool::size_class(size_t nbytes) {
  size_t step = kPage;
  while (step * 16 < nbytes) step *= 2;
  return (nbytes + step - 1) / step * step;
}

uint8_t* BlockPool::take(size_t capacity) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    taken_ += capacity;
    out_ += capacity;
    if (out_ > peak_) peak_ = out_;
    auto it = free_.find(capacity);
    if (it != free_.end() && !it->second.empty()) {
      uint8_t* block = it->second.back();
      it->second.pop_back();
      pooled_ -= capacity;
      return block;
    }
    fresh_ += capacity;
  }
  try {
    return map_fresh(capacity);
  } catch (...) {
    std::lock_guard<std::mutex> lock(mu_);
    taken_ -= capacity;
    out_ -= capacity;
    fresh_ -= capacity;
    throw;
  }
}

void BlockPool::give(uint8_t* block, size_t capacity) {
  std::vector<std::pair<uint8_t*, size_t>> evicted;
  {
    std::lock_guard<std::mutex> lock(mu_);
    out_ -= capacity;
    // Over the bound, blocks of other classes make room: the latest freed is the likeliest reused.
    for (auto it = free_.begin(); pooled_ + capacity > peak_ && it != free_.end(); ++it) {
      while (pooled_ + capacity > peak_ && !it->second.empty() && it->first != capacity) {
        evicted.emplace_back(it->second.back(), it->first);
        it->second.pop_back();
        pooled_ -= it->first;
      }
    }
    if (pooled_ + capacity <= peak_) {
      free_[capacity].push_back(block);
      pooled_ += capacity;
      block = nullptr;
    }
  }
  for (auto& [old, size] : evicted) unmap(old, size);
  if (block != nullptr) unmap(block, capacity);
}

BlockPoolStats BlockPool::stats() {
  std::lock_guard<std::mutex> lock(mu_);
  return {taken_, fresh_, pooled_, out_, peak_};
}

ByteBlock::ByteBlock(size_t nbytes)
    : size_(nbytes), capacity_(BlockPool::size_class(nbytes == 0 ? 1 : nbytes)),
      data_(BlockPool::instance().take(capacity_)) {}

ByteBlock::~ByteBlock() { BlockPool::instance().give(data_, capacity_); }

}  // namespace iota
