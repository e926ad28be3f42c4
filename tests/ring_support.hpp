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

template <class T>
RingRun<T> run_ring_in_process(const Config& config, const Shape& shape, const Tensor<T>& q,
                               const Tensor<T>& k, const Tensor<T>& v, int num_ranks,
                               ring::PatternCache* cache = nullptr, int threads = 1) {
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
    const std::int64_t begin = p * length;
    std::vector<lse_type_t<T>> local_lse(static_cast<std::size_t>(shape.batch * shape.num_heads * length));
    ring::Options options;
    options.cache = cache;
    options.num_threads = threads;
    run.stats[static_cast<std::size_t>(p)] = ring::forward<T>(
        config, shape, transport, shard_view(q.view(), begin), shard_view(k.view(), begin),
        shard_view(v.view(), begin), shard_view(run.out.view(), begin), local_lse.data(), options);
    for (std::int64_t bh = 0; bh < shape.batch * shape.num_heads; ++bh)
      for (std::int64_t x = 0; x < length; ++x)
        run.lse[static_cast<std::size_t>(bh * shape.seq_len + begin + x)] =
            local_lse[static_cast<std::size_t>(bh * length + x)];
    run.transport_sends[static_cast<std::size_t>(p)] = transport.sends;
    run.transport_recvs[static_cast<std::size_t>(p)] = transport.recvs;
    run.transport_bytes[static_cast<std::size_t>(p)] = transport.bytes_sent;
  });
  return run;
}

}  // namespace dilated_attention::testing
