#pragma once
// Shared by the CUDA ring tests (the host emulation, tests/ring/ring_cuda_emulated_test.cpp, and the
// GPU test, tests/ring/ring_cuda_forward_test.cu): the configuration sweep of ring_forward_test at a
// head_dim the CUDA back end supports, and one ring run of a case on P ranks whose result is
// gathered into one global output, checked with cuda_test_oracles.hpp's check_result (fp64
// reference, docs/semantics.md "Guarantees" (item 10)'s bound, padding untouched). Plain C++: no CUDA here.

#include <dilated_attention/config.hpp>
#include <dilated_attention/ring/driver/layout.hpp>
#include <dilated_attention/ring/transport/transport.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "support/cuda_test_oracles.hpp"
#include "support/ring_branch_sets.hpp"
#include "support/tensors.hpp"

namespace dilated_attention::testing {

// ring_forward_test's branch sets (N = 24: segments below, equal to, across and beyond shards
// of 24, 12, 8, 6 rows), each rule and mixing, causal and GQA alternating: 36 cases.
inline std::vector<Case> ring_sweep_cases(std::int64_t head_dim) {
  std::vector<Case> cases;
  int index = 0;
  for (const RingBranches& set : ring_branch_sets())
    for (const OffsetRule rule :
         {OffsetRule::modular, OffsetRule::blocked, OffsetRule::partitioned})
      for (const Mixing mixing : {Mixing::softmax, Mixing::mean}) {
        const bool causal = index % 2 == 1, gqa = index / 2 % 2 == 1;
        ++index;
        Case c{std::string(set.name) + " " + to_string(rule) + " " + to_string(mixing) +
                   (causal ? " causal" : "") + (gqa ? " gqa" : ""),
               make_config(set.w, set.r, causal, rule, mixing),
               Shape{2, 24, 4, gqa ? 2 : 4, head_dim}};
        // Every third case padded, so that the ring honours view strides.
        if (index % 3 == 0) c.pad = 1, c.seq_pad = 3;
        cases.push_back(c);
      }
  return cases;
}

// The fault the CUDA ring tests inject (loopback transport): an exception at the first
// enqueue_wait or at the first post_recv.
class FaultyTransport final : public ring::TransportAdapter {
 public:
  FaultyTransport(ring::Transport& inner, bool in_stream_wait, bool in_post_recv)
      : TransportAdapter(inner), in_stream_wait_(in_stream_wait), in_post_recv_(in_post_recv) {}
  bool enqueue_wait(Ticket ticket, void* queue) override {
    if (std::exchange(in_stream_wait_, false))
      throw std::runtime_error("injected failure in enqueue_wait");
    return TransportAdapter::enqueue_wait(ticket, queue);
  }
  Ticket post_recv(int peer, int tag, void* data, std::size_t bytes) override {
    if (std::exchange(in_post_recv_, false))
      throw std::runtime_error("injected failure in post_recv");
    return TransportAdapter::post_recv(peer, tag, data, bytes);
  }

 private:
  bool in_stream_wait_, in_post_recv_;
};

// A rank's rows of a global tensor in `chunks` order, padding included.
template <class T>
Tensor<T> local_rows(const Tensor<T>& global, const std::vector<ring::Chunk>& chunks,
                     std::int64_t length) {
  Shape local = global.shape;
  local.seq_len = length;
  const std::int64_t pad = global.head_stride - global.shape.head_dim;
  const std::int64_t seq_pad = global.seq_stride - global.heads * global.head_stride;
  Tensor<T> result(local, global.heads, pad, seq_pad);
  for (const ring::Chunk& chunk : chunks)
    for (std::int64_t b = 0; b < local.batch; ++b)
      for (std::int64_t x = chunk.begin; x < chunk.end; ++x)
        for (std::int64_t e = 0; e < global.seq_stride; ++e)
          result.storage[static_cast<std::size_t>(
              b * result.batch_stride + (chunk.local + x - chunk.begin) * result.seq_stride + e)] =
              global.storage[static_cast<std::size_t>(b * global.batch_stride +
                                                      x * global.seq_stride + e)];
  return result;
}

// Runs case `c` on `num_ranks` ranks: run_ranks(P, body) starts the ranks, calling
// body(transport, stream) on each; rank_forward(transport, stream, q, k, v, out, lse) runs one
// rank's forward on its local (host) tensors. Returns O and LSE gathered into global arrays,
// poisoned with NaN beforehand (every element must be written; padding never).
template <class T, class RunRanks, class RankForward>
KernelResult<T> run_ring_case(const Case& c, const DeviceTestInputs<T>& in, int num_ranks,
                              ring::Layout layout, RunRanks&& run_ranks,
                              RankForward&& rank_forward) {
  KernelResult<T> result = poisoned_result<T>(c.shape, c.pad, c.seq_pad);
  const std::int64_t length = c.shape.seq_len / num_ranks;
  run_ranks(num_ranks, [&](ring::Transport& transport, void* stream) {
    const auto chunks = ring::rank_chunks(layout, c.shape.seq_len, num_ranks, transport.rank());
    const Tensor<T> q = local_rows(in.q, chunks, length), k = local_rows(in.k, chunks, length),
                    v = local_rows(in.v, chunks, length);
    Tensor<T> out = local_rows(result.out, chunks, length);
    std::vector<float> lse(static_cast<std::size_t>(c.shape.batch * c.shape.num_heads * length),
                           std::numeric_limits<float>::quiet_NaN());
    rank_forward(transport, stream, q, k, v, out, lse);
    // Disjoint rows per rank: no lock needed.
    for (const ring::Chunk& chunk : chunks)
      for (std::int64_t b = 0; b < c.shape.batch; ++b)
        for (std::int64_t x = chunk.begin; x < chunk.end; ++x) {
          for (std::int64_t e = 0; e < out.seq_stride; ++e)
            result.out.storage[static_cast<std::size_t>(b * result.out.batch_stride +
                                                        x * result.out.seq_stride + e)] =
                out.storage[static_cast<std::size_t>(
                    b * out.batch_stride + (chunk.local + x - chunk.begin) * out.seq_stride + e)];
          for (std::int64_t h = 0; h < c.shape.num_heads; ++h)
            result
                .lse[static_cast<std::size_t>((b * c.shape.num_heads + h) * c.shape.seq_len + x)] =
                lse[static_cast<std::size_t>((b * c.shape.num_heads + h) * length + chunk.local +
                                             x - chunk.begin)];
        }
  });
  return result;
}

template <class T>
bool bitwise_equal(const KernelResult<T>& a, const KernelResult<T>& b) {
  return a.out.storage.size() == b.out.storage.size() && a.lse.size() == b.lse.size() &&
         std::memcmp(a.out.storage.data(), b.out.storage.data(),
                     a.out.storage.size() * sizeof(T)) == 0 &&
         std::memcmp(a.lse.data(), b.lse.data(), a.lse.size() * sizeof(float)) == 0;
}

}  // namespace dilated_attention::testing
