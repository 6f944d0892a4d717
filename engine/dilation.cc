#include "engine/dilation.h"

namespace da::engine {

std::vector<std::vector<HeadWork>> AssignHeadPatterns(int64_t heads, const AttentionSpec& spec) {
  std::vector<std::vector<HeadWork>> work(heads);
  const int64_t num_patterns = static_cast<int64_t>(spec.patterns.size());
  if (spec.mode == CombineMode::kLongNet) {
    for (int64_t j = 0; j < heads; ++j) {
      for (int64_t i = 0; i < num_patterns; ++i) {
        const Pattern& p = spec.patterns[i];
        const int64_t heads_per_offset = (heads + p.dilation - 1) / p.dilation;
        work[j].push_back({static_cast<int>(i), p, j / heads_per_offset});
      }
    }
    return work;
  }
  // GROUPED: group sizes heads / P, the first heads % P groups one larger.
  int64_t head = 0;
  for (int64_t i = 0; i < num_patterns; ++i) {
    const Pattern& p = spec.patterns[i];
    const int64_t group_size = heads / num_patterns + (i < heads % num_patterns ? 1 : 0);
    for (int64_t g = 0; g < group_size; ++g, ++head) {
      work[head].push_back({static_cast<int>(i), p, i % p.dilation});
    }
  }
  return work;
}

}  // namespace da::engine
