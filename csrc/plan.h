// All-reduce chunking: split a flat vector into owner shards and streaming
// parts on quantization-block boundaries, so every part encodes to whole blocks.
#pragma once
#include <cstdint>
#include <utility>
#include <vector>

namespace iota {

using Range = std::pair<int64_t, int64_t>;  // [begin, end) in elements

// One contiguous shard per owner, sized in proportion to its weight (e.g. its
// declared bandwidth). Shards may be empty when a weight is tiny.
std::vector<Range> plan_shards(int64_t numel, int64_t block, const std::vector<double>& weights);

// Parts of [begin, end) holding at most max_part elements each (rounded down
// to whole blocks, at least one block).
std::vector<Range> plan_parts(int64_t begin, int64_t end, int64_t block, int64_t max_part);

}  // namespace iota
