// The positional ring spellings of 0.1 (deprecated, removed in 0.2.0) forward to the grouped
// calls: each gives bitwise what the new spelling gives, on the same ranks and inputs. The CUDA
// forwarders (ring::cuda::forward / backward with a trailing stream) are checked on a GPU in
// ring_cuda_forward_test.cu and ring_cuda_backward_test.cu.

#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"  // this test calls them on purpose
#endif

#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include <dilated_attention/dilated_attention.hpp>

#include "support/ring_support.hpp"

namespace {

namespace da = dilated_attention;
namespace ring = dilated_attention::ring;
using da::testing::shard_view;
using da::testing::Tensor;

struct Problem {
  da::Config config;
  da::Shape shape{2, 48, 4, 2, 8};
  Tensor<double> q{shape, 4}, k{shape, 2}, v{shape, 2}, d_out{shape, 4};
  Problem() {
    config.segment_lengths = {8, 16, 48};
    config.dilation_rates = {1, 2, 4};
    config.causal = true;
    q.fill_random(11);
    k.fill_random(12);
    v.fill_random(13);
    d_out.fill_random(14);
  }
};

struct Results {
  Tensor<double> out, d_q, d_k, d_v;
  std::vector<double> lse;
};

// Forward then backward on 3 ranks (zigzag, two threads per rank), with the new or the old spelling.
Results run(const Problem& p, bool old_spelling) {
  constexpr int ranks = 3;
  const da::Shape& s = p.shape;
  Results r{
      Tensor<double>(s, 4), Tensor<double>(s, 4), Tensor<double>(s, 2), Tensor<double>(s, 2), {}};
  const std::int64_t local = s.seq_len / ranks;
  r.lse.assign(static_cast<std::size_t>(ranks * s.batch * s.num_heads * local), 0.0);
  ring::Options options;
  options.device.num_threads = 2;
  ring::run_in_process(ranks, [&](ring::Transport& transport) {
    const std::int64_t begin = transport.rank() * local;
    // Contiguous shards of the global tensors; each rank's LSE in its own block.
    const auto q = shard_view(p.q.view(), begin), k = shard_view(p.k.view(), begin),
               v = shard_view(p.v.view(), begin);
    const auto out = shard_view(r.out.view(), begin);
    const auto d_out = shard_view(p.d_out.view(), begin);
    const auto d_q = shard_view(r.d_q.view(), begin), d_k = shard_view(r.d_k.view(), begin),
               d_v = shard_view(r.d_v.view(), begin);
    double* lse = r.lse.data() + transport.rank() * s.batch * s.num_heads * local;
    if (old_spelling) {
      ring::forward<double>(p.config, s, transport, q, k, v, out, lse, options);
      ring::backward<double>(p.config, s, transport, q, k, v, out, lse, d_out, d_q, d_k, d_v,
                             options);
    } else {
      ring::forward<double>(p.config, s, transport, {q, k, v}, {out, lse}, options);
      ring::backward<double>(p.config, s, transport, {q, k, v}, {out, lse}, d_out, {d_q, d_k, d_v},
                             options);
    }
  });
  return r;
}

TEST(RingDeprecatedApi, PositionalForwardAndBackwardEqualTheGroupedCalls) {
  const Problem problem;
  const Results grouped = run(problem, false), positional = run(problem, true);
  EXPECT_EQ(positional.out.storage, grouped.out.storage);
  EXPECT_EQ(positional.lse, grouped.lse);
  EXPECT_EQ(positional.d_q.storage, grouped.d_q.storage);
  EXPECT_EQ(positional.d_k.storage, grouped.d_k.storage);
  EXPECT_EQ(positional.d_v.storage, grouped.d_v.storage);
  // And the new call is the ring: a non-trivial result.
  double sum = 0;
  for (const double x : grouped.d_q.storage) sum += x * x;
  EXPECT_GT(sum, 0.0);
}

}  // namespace
