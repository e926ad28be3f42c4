#pragma once
// The branch sets the ring sweeps run at N = 24 (shard lengths 24, 12, 8, 6 for P = 1..4):
// segments below, equal to, across and beyond the shards. Shared by the CPU ring tests
// (ring_support.hpp) and the CUDA ring tests (ring_cuda_cases.hpp). Plain C++.

#include <cstdint>
#include <vector>

namespace dilated_attention::testing {

struct RingBranches {
  const char* name;
  std::vector<std::int64_t> w, r;
};
inline const std::vector<RingBranches>& ring_branch_sets() {
  static const std::vector<RingBranches> sets = {
      {"below_shard", {4}, {1}},                     // w < L for every P: all local
      {"equal_shard_p4", {6}, {2}},                  // w == L at P = 4
      {"equal_shard_p3_p2", {8, 12}, {2, 3}},        // w == L at P = 3 and P = 2
      {"not_multiple", {10, 16}, {2, 4}},            // w straddles shard boundaries
      {"whole_and_beyond", {24, 5, 48}, {3, 1, 2}},  // w == N, w short, w > N
      {"repeated_branch", {9, 9}, {3, 3}},           // r does not divide w; a branch twice
  };
  return sets;
}

}  // namespace dilated_attention::testing
