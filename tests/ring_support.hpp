#pragma once
// Test support for the ring: run a forward on P in-process ranks over global tensors, each rank
// seeing views over its own shard, and gather O and LSE back into global arrays.

#include <dilated_attention/reference.hpp>
#include <dilated_attention/ring.hpp>

#include <atomic>
#include <cstdint>
#include <mutex>
#include <vector>

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

// A shard view: same strides, data moved to the shard's first row.
template <class T>
View<T> shard_view(View<T> global, std::int64_t begin) {
  return {global.data + begin * global.seq_stride, global.batch_stride, global.seq_stride,
          global.head_stride};
}

template <class T>
struct RingRun {
  Tensor<T> out;
  std::vector<lse_type_t<T>> lse;            // [batch, heads, N]
  std::vector<ring::Stats> stats;            // per rank
  std::vector<std::int64_t> transport_sends, transport_recvs, transport_bytes;  // per rank
};

// A rank's rows of a global tensor, copied in `chunks` order into a dense local tensor.
template <class T>
Tensor<T> gather_rows(const Tensor<T>& global, const std::vector<ring::Chunk>& chunks, std::int64_t length) {
  Shape local = global.shape;
  local.seq_len = length;
  Tensor<T> result(local, global.heads);
  for (const ring::Chunk& chunk : chunks)
    for (std::int64_t b = 0; b < local.batch; ++b)
      for (std::int64_t x = chunk.begin; x < chunk.end; ++x)
        for (std::int64_t h = 0; h < global.heads; ++h)
          for (std::int64_t d = 0; d < local.head_dim; ++d)
            result.at(b, chunk.local + x - chunk.begin, h, d) = global.at(b, x, h, d);
  return result;
}

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
    std::vector<lse_type_t<T>> local_lse(static_cast<std::size_t>(shape.batch * shape.num_heads * length));
    ring::Options options;
    options.cache = cache;
    options.num_threads = threads;
    options.layout = layout;
    if (layout == ring::Layout::contiguous) {
      const std::int64_t begin = p * length;
      run.stats[static_cast<std::size_t>(p)] = ring::forward<T>(
          config, shape, transport, shard_view(q.view(), begin), shard_view(k.view(), begin),
          shard_view(v.view(), begin), shard_view(run.out.view(), begin), local_lse.data(), options);
    } else {
      const Tensor<T> lq = gather_rows(q, chunks, length), lk = gather_rows(k, chunks, length),
                      lv = gather_rows(v, chunks, length);
      Tensor<T> lo = gather_rows(run.out, chunks, length);
      run.stats[static_cast<std::size_t>(p)] = ring::forward<T>(
          config, shape, transport, lq.view(), lk.view(), lv.view(), lo.view(), local_lse.data(), options);
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

}  // namespace dilated_attention::testing
