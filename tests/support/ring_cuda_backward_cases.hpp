#pragma once
// Shared by the CUDA ring backward tests (the host emulation,
// tests/ring/ring_cuda_backward_emulated_test.cpp, and the GPU test, tests/ring/ring_cuda_backward_test.cu):
// a backward problem in a storage type with its fp64 reference gradients, one ring backward of
// it on P ranks gathered into global gradients, and the check against the reference. Plain C++.

#include <cuda_fp16.h>

#include <dilated_attention/reference.hpp>
#include <dilated_attention/ring/driver/layout.hpp>
#include <dilated_attention/ring/transport/transport.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include <gtest/gtest.h>

#include "support/cuda_test_oracles.hpp"
#include "support/ring_cuda_cases.hpp"
#include "support/ring_rows.hpp"

namespace dilated_attention::testing {

// Inputs in storage type T, the forward's O (fp64 reference, rounded to T) and LSE (float), an
// upstream gradient, and the fp64 reference gradients of exactly those stored values.
template <class T>
struct GradientProblem {
  Case c;
  Tensor<T> q, k, v, out, d_out;
  std::vector<float> lse;
  Tensor<double> ref_q, ref_k, ref_v;
  double scale = 1.0;  // the largest reference gradient (at least 1)

  GradientProblem(const Case& test_case, std::uint64_t seed) : c(test_case) {
    const Shape& s = c.shape;
    Tensor<double> wq, wk, wv, wd, wo;
    q = narrow(random_tensor<double>(s, s.num_heads, seed, c.pad, c.seq_pad), wq);
    k = narrow(random_tensor<double>(s, s.num_kv_heads, seed + 1, c.pad, c.seq_pad), wk);
    v = narrow(random_tensor<double>(s, s.num_kv_heads, seed + 2, c.pad, c.seq_pad), wv);
    d_out = narrow(random_tensor<double>(s, s.num_heads, seed + 3, c.pad, c.seq_pad), wd);
    Tensor<double> exact(s, s.num_heads, c.pad, c.seq_pad);
    std::vector<double> wide_lse(lse_size(s));
    reference::forward<double>(c.config, s, {wq.view(), wk.view(), wv.view()},
                               {exact.view(), wide_lse.data()});
    out = narrow(exact, wo);
    lse.resize(wide_lse.size());
    for (std::size_t e = 0; e < lse.size(); ++e) {
      lse[e] = static_cast<float>(wide_lse[e]);
      wide_lse[e] = static_cast<double>(lse[e]);
    }
    ref_q = Tensor<double>(s, s.num_heads);
    ref_k = Tensor<double>(s, s.num_kv_heads);
    ref_v = Tensor<double>(s, s.num_kv_heads);
    reference::backward<double>(c.config, s, {wq.view(), wk.view(), wv.view()},
                                {wo.view(), wide_lse.data()}, wd.view(),
                                {ref_q.view(), ref_k.view(), ref_v.view()});
    for (const Tensor<double>* g : {&ref_q, &ref_k, &ref_v})
      for (const double value : g->storage) scale = std::max(scale, std::abs(value));
  }

 private:
  // `wide` rounded to T; `widened` receives the rounded values back in double.
  static Tensor<T> narrow(const Tensor<double>& wide, Tensor<double>& widened) {
    Tensor<T> result(wide.shape, wide.heads, wide.head_stride - wide.shape.head_dim,
                     wide.seq_stride - wide.heads * wide.head_stride);
    widened = wide;
    for (std::size_t e = 0; e < wide.storage.size(); ++e) {
      result.storage[e] = from_double<T>(wide.storage[e]);
      widened.storage[e] = to_double(result.storage[e]);
    }
    return result;
  }
};

template <class T>
struct RingGradientResult {
  Tensor<T> d_q, d_k, d_v;
};

template <class T>
bool bitwise_equal(const RingGradientResult<T>& a, const RingGradientResult<T>& b) {
  return bitwise_equal(a.d_q, b.d_q) && bitwise_equal(a.d_k, b.d_k) && bitwise_equal(a.d_v, b.d_v);
}

// The tolerance relative to the largest reference gradient: fp32 accumulation in an order of
// its own, then one rounding to T (2^-11 for half, 2^-8 for bfloat16, relative).
template <class T>
double gradient_tolerance() {
  if constexpr (std::is_same_v<T, float>)
    return 2e-5;
  else if constexpr (std::is_same_v<T, __half>)
    return 2e-3;
  else
    return 1.6e-2;
}

template <class T>
void check_gradients(const GradientProblem<T>& p, const RingGradientResult<T>& run) {
  const double bound = gradient_tolerance<T>() * p.scale;
  EXPECT_LE(max_abs_diff(run.d_q, p.ref_q), bound) << "dQ";
  EXPECT_LE(max_abs_diff(run.d_k, p.ref_k), bound) << "dK";
  EXPECT_LE(max_abs_diff(run.d_v, p.ref_v), bound) << "dV";
}

// A rank's rows of the problem's tensors (padding kept), in its chunks' order.
template <class T>
struct RankTensors {
  Tensor<T> q, k, v, out, d_out;
};

// Runs the ring backward of `p` on `num_ranks` ranks: run_ranks(P, body) starts them, calling
// body(transport, stream); rank_backward(transport, stream, inputs, lse, gradients) runs one
// rank's backward on host tensors (dense local gradients, NaN beforehand: every element must be
// written). Returns the gradients gathered into global tensors.
template <class T, class RunRanks, class RankBackward>
RingGradientResult<T> run_ring_backward_case(const GradientProblem<T>& p, int num_ranks,
                                             ring::Layout layout, RunRanks&& run_ranks,
                                             RankBackward&& rank_backward) {
  const Shape& s = p.c.shape;
  RingGradientResult<T> run{Tensor<T>(s, s.num_heads), Tensor<T>(s, s.num_kv_heads),
                            Tensor<T>(s, s.num_kv_heads)};
  for (Tensor<T>* g : {&run.d_q, &run.d_k, &run.d_v})
    g->fill(T(std::numeric_limits<float>::quiet_NaN()));
  const std::int64_t length = s.seq_len / num_ranks;
  run_ranks(num_ranks, [&](ring::Transport& transport, void* stream) {
    const auto chunks = ring::rank_chunks(layout, s.seq_len, num_ranks, transport.rank());
    const RankTensors<T> in{local_rows(p.q, chunks, length), local_rows(p.k, chunks, length),
                            local_rows(p.v, chunks, length), local_rows(p.out, chunks, length),
                            local_rows(p.d_out, chunks, length)};
    const std::vector<float> lse = gather_lse(p.lse, s, chunks, length);
    RingGradientResult<T> local{local_rows(run.d_q, chunks, length),
                                local_rows(run.d_k, chunks, length),
                                local_rows(run.d_v, chunks, length)};
    rank_backward(transport, stream, in, lse, local);
    scatter_rows(local.d_q, chunks, run.d_q);  // disjoint rows per rank: no lock needed
    scatter_rows(local.d_k, chunks, run.d_k);
    scatter_rows(local.d_v, chunks, run.d_v);
  });
  return run;
}

}  // namespace dilated_attention::testing
