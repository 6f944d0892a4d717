// The median the benchmarks report: the middle value of an odd count, the mean of the two middle
// values of an even count (a median of 2 is their mean, not the slower run), 0 for none.
//
//   const double median_s = Median(times_s);  // times_s is taken by value and left as it was
#pragma once

#include <algorithm>
#include <cstddef>
#include <vector>

namespace da::bench {

inline double Median(std::vector<double> values) {
  if (values.empty()) return 0.0;
  std::sort(values.begin(), values.end());
  const size_t half = values.size() / 2;
  return values.size() % 2 == 1 ? values[half] : (values[half - 1] + values[half]) / 2;
}

}  // namespace da::bench
