// A small, portable pseudo-random generator for the solvers' random choices (task orders). The
// seed comes from a torch.Generator on the Python side, so seeded runs reproduce on every
// platform (std::shuffle's algorithm is implementation-defined; ours is not).
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

namespace mtlgrad::solvers {

class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}

  uint64_t next() {
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }

  // Uniform in [0, bound), bound >= 1 (Lemire's multiply-shift; the bias is below 2^-32 for the
  // bounds used here).
  uint64_t below(uint64_t bound) { return uint64_t((__uint128_t(next()) * bound) >> 64); }

  // Fisher-Yates shuffle.
  template <typename T>
  void shuffle(std::vector<T>& v) {
    for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[size_t(below(i))]);
  }

 private:
  uint64_t state_;
};

}  // namespace mtlgrad::solvers
