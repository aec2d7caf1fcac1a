#include "plan.h"

#include <cmath>
#include <stdexcept>

#include "frame.h"

namespace iota {

std::vector<Range> plan_shards(int64_t numel, int64_t block, const std::vector<double>& weights) {
  if (numel < 0 || block <= 0) throw CodecError("plan_shards needs numel >= 0 and block > 0");
  if (weights.empty()) throw CodecError("plan_shards needs at least one owner");
  double total = 0;
  for (double w : weights) {
    if (!(w > 0) || !std::isfinite(w)) throw CodecError("owner weights must be positive and finite");
    total += w;
  }
  const int64_t nblocks = (numel + block - 1) / block;
  std::vector<Range> shards;
  double cumulative = 0;
  int64_t begin = 0;
  for (size_t i = 0; i < weights.size(); i++) {
    cumulative += weights[i];
    int64_t end_block = i + 1 == weights.size() ? nblocks : (int64_t)std::llround(nblocks * (cumulative / total));
    int64_t end = std::min(numel, end_block * block);
    end = std::max(end, begin);
    shards.emplace_back(begin, end);
    begin = end;
  }
  return shards;
}

std::vector<Range> plan_parts(int64_t begin, int64_t end, int64_t block, int64_t max_part) {
  if (begin < 0 || end < begin || block <= 0 || max_part <= 0) throw CodecError("plan_parts: invalid range or sizes");
  if (begin % block) throw CodecError("plan_parts: begin must lie on a block boundary");
  const int64_t step = std::max(block, max_part / block * block);
  std::vector<Range> parts;
  for (int64_t p = begin; p < end; p += step) parts.emplace_back(p, std::min(end, p + step));
  return parts;
}

}  // namespace iota
