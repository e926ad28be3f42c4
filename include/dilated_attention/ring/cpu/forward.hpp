#pragma once
// The CPU entry point of the ring (docs/semantics.md "Entry points"): ring::forward<T> runs the generic driver
// (ring/driver/forward.hpp) with the CPU back end (ring/cpu/forward_backend.hpp).

#include <cstdint>
#include <memory>

#include "../../config.hpp"
#include "forward_backend.hpp"
#include "../driver/agreement.hpp"
#include "../driver/forward.hpp"
#include "../driver/layout.hpp"
#include "../driver/options.hpp"
#include "../driver/pattern_cache.hpp"
#include "../driver/schedule.hpp"
#include "../transport/transport.hpp"

namespace dilated_attention::ring {

// Ring forward on the CPU (docs/semantics.md "Entry points"). `shape` is the GLOBAL shape (seq_len = N); q, k,
// v, out are views over this rank's N / P rows, in the order options.layout gives them
// (rank_chunks in ring/driver/layout.hpp: the contiguous shard, or zigzag chunks p and 2P-1-p); lse,
// when given, is [batch, num_heads, N / P] contiguous, same row order. Rank and P come from the
// transport.
//
// Every rank must call it with the same config, shape, T and options.layout: the ranks check
// that first (ring/driver/agreement.hpp), before any K/V row moves. A rank with bad input throws
// std::invalid_argument naming the parameter; so does a rank whose config or shape differs from
// rank 0's; every other rank throws PeerFailure naming that rank. A failure while the ring runs
// raises on every rank too (the failing rank its own exception, the others PeerFailure), no
// output is written on any rank unless every rank succeeded, and the transport serves the next
// call. A transfer that does not complete within options.timeout throws TransferTimeout.
template <class T>
Stats forward(const Config& config, const Shape& shape, Transport& transport,
              View<const dilated_attention::detail::identity_t<T>> q,
              View<const dilated_attention::detail::identity_t<T>> k,
              View<const dilated_attention::detail::identity_t<T>> v, View<T> out,
              lse_type_t<T>* lse = nullptr, const Options& options = {}) {
  Shape local = shape;
  const auto validate_local = [&] {
    local = validate_ring_call(config, shape, transport, options);
    validate(config, local, q, k, v, out, lse);
  };
  Stats stats;
  std::unique_ptr<CpuForwardBackend<T>> backend;
  run_agreed_call(
      transport, options.timeout, describe_call<T>(config, shape, static_cast<std::int64_t>(options.layout)), validate_local,
      [&] {
        const std::int64_t accumulators =
            config.mixing == Mixing::mean ? static_cast<std::int64_t>(config.segment_lengths.size()) : 1;
        backend = std::make_unique<CpuForwardBackend<T>>(
            local, rank_chunks(options.layout, shape.seq_len, transport.size(), transport.rank()), q, k, v, static_cast<cpu::accumulator_t<T>>(resolved_scale(config, shape)),
            config.causal, accumulators, options.num_threads);
        PatternCache& cache = options.cache != nullptr ? *options.cache : default_pattern_cache();
        stats = run_ring_forward(config, shape, transport, *backend, cache, options);
      },
      [&] { backend->finish(out, lse); });
  return stats;
}

}  // namespace dilated_attention::ring
