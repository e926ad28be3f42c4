#pragma once
// Test support for the ring: run a forward or a backward on P in-process ranks over global
// tensors, each rank seeing views over its own rows, and gather the results back into global
// arrays; and the brute-force count of the K/V bytes a rank must send.

#include <dilated_attention/reference.hpp>
#include <dilated_attention/ring.hpp>

#include <gtest/gtest.h>

#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "support/ring_branch_sets.hpp"
#include "support/ring_rows.hpp"
#include "support/tensors.hpp"

namespace dilated_attention::testing {

// A transport that forwards to another and counts what passes through it: the tests use it to
// show that skipped steps really make no transport call.
class CountingTransport final : public ring::TransportAdapter {
 public:
  explicit CountingTransport(ring::Transport& inner) : TransportAdapter(inner) {}
  Ticket post_send(int peer, int tag, const void* data, std::size_t bytes) override {
    ++sends;
    bytes_sent += static_cast<std::int64_t>(bytes);
    return TransportAdapter::post_send(peer, tag, data, bytes);
  }
  Ticket post_recv(int peer, int tag, void* data, std::size_t bytes) override {
    ++recvs;
    return TransportAdapter::post_recv(peer, tag, data, bytes);
  }
  std::int64_t sends = 0, recvs = 0, bytes_sent = 0;
};

template <class T>
struct RingRun {
  Tensor<T> out;
  std::vector<lse_type_t<T>> lse;                                               // [batch, heads, N]
  std::vector<ring::Stats> stats;                                               // per rank
  std::vector<std::int64_t> transport_sends, transport_recvs, transport_bytes;  // per rank
};

// Runs the ring on P in-process ranks. Contiguous layout: each rank gets views straight into the
// (padded) global tensors; zigzag: dense local copies of its chunks, scattered back afterwards.
template <class T>
RingRun<T> run_ring_in_process(const Config& config, const Shape& shape, const Tensor<T>& q,
                               const Tensor<T>& k, const Tensor<T>& v, int num_ranks,
                               ring::PatternCache* cache = nullptr, int threads = 1,
                               ring::Layout layout = ring::Layout::contiguous) {
  RingRun<T> run;
  run.out = Tensor<T>(shape, shape.num_heads);
  run.out.fill(T(7));  // every row must be overwritten
  run.lse.assign(static_cast<std::size_t>(shape.batch * shape.num_heads * shape.seq_len), 0);
  run.stats.resize(static_cast<std::size_t>(num_ranks));
  run.transport_sends.assign(static_cast<std::size_t>(num_ranks), 0);
  run.transport_recvs.assign(static_cast<std::size_t>(num_ranks), 0);
  run.transport_bytes.assign(static_cast<std::size_t>(num_ranks), 0);
  const std::int64_t length = shape.seq_len / num_ranks;
  ring::run_in_process(num_ranks, [&](ring::Transport& inner) {
    CountingTransport transport(inner);
    const int p = transport.rank();
    const auto chunks = ring::rank_chunks(layout, shape.seq_len, num_ranks, p);
    std::vector<lse_type_t<T>> local_lse(
        static_cast<std::size_t>(shape.batch * shape.num_heads * length));
    ring::Options options;
    options.cache = cache;
    options.device.num_threads = threads;
    options.layout = layout;
    if (layout == ring::Layout::contiguous) {
      const std::int64_t begin = p * length;
      run.stats[static_cast<std::size_t>(p)] = ring::forward<T>(
          config, shape, transport,
          {shard_view(q.view(), begin), shard_view(k.view(), begin), shard_view(v.view(), begin)},
          {shard_view(run.out.view(), begin), local_lse.data()}, options);
    } else {
      const Tensor<T> lq = gather_rows(q, chunks, length), lk = gather_rows(k, chunks, length),
                      lv = gather_rows(v, chunks, length);
      Tensor<T> lo = gather_rows(run.out, chunks, length);
      run.stats[static_cast<std::size_t>(p)] =
          ring::forward<T>(config, shape, transport, {lq.view(), lk.view(), lv.view()},
                           {lo.view(), local_lse.data()}, options);
      for (const ring::Chunk& chunk : chunks)
        for (std::int64_t b = 0; b < shape.batch; ++b)
          for (std::int64_t x = chunk.begin; x < chunk.end; ++x)
            for (std::int64_t h = 0; h < shape.num_heads; ++h)
              for (std::int64_t d = 0; d < shape.head_dim; ++d)
                run.out.at(b, x, h, d) = lo.at(b, chunk.local + x - chunk.begin, h, d);
    }
    for (const ring::Chunk& chunk : chunks)
      for (std::int64_t bh = 0; bh < shape.batch * shape.num_heads; ++bh)
        for (std::int64_t x = chunk.begin; x < chunk.end; ++x)
          run.lse[static_cast<std::size_t>(bh * shape.seq_len + x)] =
              local_lse[static_cast<std::size_t>(bh * length + chunk.local + x - chunk.begin)];
    run.transport_sends[static_cast<std::size_t>(p)] = transport.sends;
    run.transport_recvs[static_cast<std::size_t>(p)] = transport.recvs;
    run.transport_bytes[static_cast<std::size_t>(p)] = transport.bytes_sent;
  });
  return run;
}

template <class T>
struct RingGradients {
  Tensor<T> d_q, d_k, d_v;
  std::vector<ring::Stats> stats;                              // per rank
  std::vector<std::int64_t> transport_sends, transport_bytes;  // per rank, K/V and gradients
};

// Runs ring::backward on P in-process ranks. Contiguous layout: views straight into padded
// global tensors (gradients too); zigzag: dense local copies of the rank's chunks, scattered back.
// Every gradient element starts at 7, so a row the ring does not write shows.
template <class T>
RingGradients<T> run_ring_backward_in_process(const Config& config, const Shape& shape,
                                              const Tensor<T>& q, const Tensor<T>& k,
                                              const Tensor<T>& v, const Tensor<T>& out,
                                              const std::vector<lse_type_t<T>>& lse,
                                              const Tensor<T>& d_out, int num_ranks,
                                              ring::Options options = {}) {
  RingGradients<T> run;
  run.d_q = Tensor<T>(shape, shape.num_heads, 1, 2);
  run.d_k = Tensor<T>(shape, shape.num_kv_heads, 2);
  run.d_v = Tensor<T>(shape, shape.num_kv_heads, 0, 3);
  for (Tensor<T>* gradient : {&run.d_q, &run.d_k, &run.d_v}) gradient->fill(T(7));
  run.stats.resize(static_cast<std::size_t>(num_ranks));
  run.transport_sends.assign(static_cast<std::size_t>(num_ranks), 0);
  run.transport_bytes.assign(static_cast<std::size_t>(num_ranks), 0);
  const std::int64_t length = shape.seq_len / num_ranks;
  ring::run_in_process(num_ranks, [&](ring::Transport& inner) {
    CountingTransport transport(inner);
    const int p = transport.rank();
    const auto chunks = ring::rank_chunks(options.layout, shape.seq_len, num_ranks, p);
    const std::vector<lse_type_t<T>> local_lse = gather_lse(lse, shape, chunks, length);
    ring::Stats& stats = run.stats[static_cast<std::size_t>(p)];
    if (options.layout == ring::Layout::contiguous) {
      const std::int64_t begin = p * length;
      stats = ring::backward<T>(
          config, shape, transport,
          {shard_view(q.view(), begin), shard_view(k.view(), begin), shard_view(v.view(), begin)},
          {shard_view(out.view(), begin), local_lse.data()}, shard_view(d_out.view(), begin),
          {shard_view(run.d_q.view(), begin), shard_view(run.d_k.view(), begin),
           shard_view(run.d_v.view(), begin)},
          options);
    } else {
      const Tensor<T> lq = gather_rows(q, chunks, length), lk = gather_rows(k, chunks, length),
                      lv = gather_rows(v, chunks, length), lo = gather_rows(out, chunks, length),
                      ld = gather_rows(d_out, chunks, length);
      Tensor<T> gq = gather_rows(run.d_q, chunks, length),
                gk = gather_rows(run.d_k, chunks, length),
                gv = gather_rows(run.d_v, chunks, length);
      stats = ring::backward<T>(config, shape, transport, {lq.view(), lk.view(), lv.view()},
                                {lo.view(), local_lse.data()}, ld.view(),
                                {gq.view(), gk.view(), gv.view()}, options);
      scatter_rows(gq, chunks, run.d_q);
      scatter_rows(gk, chunks, run.d_k);
      scatter_rows(gv, chunks, run.d_v);
    }
    run.transport_sends[static_cast<std::size_t>(p)] = transport.sends;
    run.transport_bytes[static_cast<std::size_t>(p)] = transport.bytes_sent;
  });
  return run;
}

// The K/V bytes rank p must send for branch i under the contiguous layout: every (batch, kv
// head, own row y, peer q) such that some query head of q reading that kv head attends y from
// some query row in q's shard. Brute force over the pattern, independent of the schedule.
// talks[p][q]: whether p sends anything to q.
inline std::vector<std::vector<std::int64_t>> needed_bytes(const Pattern& pattern, int num_ranks,
                                                           std::size_t element_size,
                                                           std::vector<std::vector<bool>>* talks) {
  const Shape& s = pattern.shape();
  const std::int64_t length = s.seq_len / num_ranks;
  std::vector<std::vector<std::int64_t>> bytes(
      static_cast<std::size_t>(num_ranks),
      std::vector<std::int64_t>(static_cast<std::size_t>(pattern.num_branches()), 0));
  talks->assign(static_cast<std::size_t>(num_ranks),
                std::vector<bool>(static_cast<std::size_t>(num_ranks), false));
  for (int p = 0; p < num_ranks; ++p)
    for (int q = 0; q < num_ranks; ++q) {
      if (q == p) continue;
      for (std::int64_t i = 0; i < pattern.num_branches(); ++i)
        for (std::int64_t g = 0; g < s.num_kv_heads; ++g)
          for (std::int64_t y = p * length; y < (p + 1) * length; ++y) {
            bool needed = false;
            for (std::int64_t h = 0; h < s.num_heads && !needed; ++h) {
              if (pattern.kv_head(h) != g) continue;
              for (std::int64_t x = q * length; x < (q + 1) * length && !needed; ++x)
                needed = pattern.keys(i, h, x).contains(y);
            }
            if (needed) {
              bytes[static_cast<std::size_t>(p)][static_cast<std::size_t>(i)] +=
                  2 * s.head_dim * s.batch * static_cast<std::int64_t>(element_size);
              (*talks)[static_cast<std::size_t>(p)][static_cast<std::size_t>(q)] = true;
            }
          }
    }
  return bytes;
}

// The sweep's parameters and their test names.
using RingSweepParam =
    std::tuple<int /*branch set*/, OffsetRule, Mixing, bool /*causal*/, bool /*gqa*/>;
inline std::string ring_sweep_name(const ::testing::TestParamInfo<RingSweepParam>& info) {
  const auto [set, rule, mixing, causal, gqa] = info.param;
  return std::string(ring_branch_sets()[static_cast<std::size_t>(set)].name) + "_" +
         to_string(rule) + "_" + to_string(mixing) + (causal ? "_causal" : "_full") +
         (gqa ? "_gqa" : "_mha");
}
inline auto ring_sweep_values() {
  return ::testing::Combine(
      ::testing::Range(0, 6),
      ::testing::Values(OffsetRule::modular, OffsetRule::blocked, OffsetRule::partitioned),
      ::testing::Values(Mixing::softmax, Mixing::mean), ::testing::Bool(), ::testing::Bool());
}
// Every (rule, mixing, causal, gqa): the zigzag tests at P = 5, 7, 8.
using RingComboParam = std::tuple<OffsetRule, Mixing, bool /*causal*/, bool /*gqa*/>;
inline auto ring_combo_values() {
  return ::testing::Combine(
      ::testing::Values(OffsetRule::modular, OffsetRule::blocked, OffsetRule::partitioned),
      ::testing::Values(Mixing::softmax, Mixing::mean), ::testing::Bool(), ::testing::Bool());
}
// The config the zigzag tests at P = 5, 7, 8 use (N = 560 = lcm(10, 14, 16)).
inline Config ring_zigzag_config(OffsetRule rule, Mixing mixing, bool causal) {
  Config config;
  config.segment_lengths = {20, 80, 560};
  config.dilation_rates = {1, 2, 4};
  config.offsets = rule;
  config.mixing = mixing;
  config.causal = causal;
  return config;
}

}  // namespace dilated_attention::testing
