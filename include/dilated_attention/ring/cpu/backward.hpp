#pragma once
// The CPU entry point of the ring backward (docs/semantics.md "Entry points", docs/semantics.md "The gradient"): ring::backward<T> runs the
// generic driver (ring/driver/backward.hpp) with the CPU gradient back end
// (ring/cpu/backward_backend.hpp).

#include <cstdint>
#include <memory>
#include <type_traits>

#include "../../config.hpp"
#include "../driver/agreement.hpp"
#include "../driver/backward.hpp"
#include "backward_backend.hpp"
#include "../driver/layout.hpp"
#include "../driver/options.hpp"
#include "../driver/pattern_cache.hpp"
#include "../driver/schedule.hpp"
#include "../transport/transport.hpp"

namespace dilated_attention::ring {

// Ring backward on the CPU (docs/semantics.md "The gradient"). Each rank passes what ring::forward gave it:
// `shape` is the GLOBAL shape; q, k, v, out, d_out and the gradients are views over this rank's
// N / P rows in options.layout's order; lse is [batch, num_heads, N / P] contiguous, same row
// order. d_q receives exactly this rank's rows of the single-device dQ, d_k and d_v this rank's
// rows of dK and dV (summed over the query heads of each GQA group and over every rank whose
// queries attend them); all three are overwritten.
//
// Collective, with the forward's guarantees: the ranks agree first (a rank with bad input throws
// std::invalid_argument naming the parameter -- every rule of validate_backward --, the others
// PeerFailure), either every rank returns or every rank raises, no gradient is written on any
// rank unless every rank succeeded, the transport serves the next call, and a transfer that does
// not complete within options.timeout throws TransferTimeout. Bitwise reproducible from run to
// run and for any options.num_threads.
template <class T>
Stats backward(const Config& config, const Shape& shape, Transport& transport,
               View<const dilated_attention::detail::identity_t<T>> q,
               View<const dilated_attention::detail::identity_t<T>> k,
               View<const dilated_attention::detail::identity_t<T>> v,
               View<const dilated_attention::detail::identity_t<T>> out,
               const lse_type_t<dilated_attention::detail::identity_t<T>>* lse,
               View<const dilated_attention::detail::identity_t<T>> d_out, View<T> d_q, View<T> d_k,
               View<T> d_v, const Options& options = {}) {
  using Acc = cpu::accumulator_t<T>;
  static_assert(std::is_same_v<lse_type_t<T>, Acc>, "the LSE is stored in the accumulator type");
  Shape local = shape;
  const auto validate_local = [&] {
    local = validate_ring_call(config, shape, transport, options);
    validate_backward(config, local, q, k, v, out, lse, d_out, d_q, d_k, d_v);
  };
  Stats stats;
  std::unique_ptr<CpuBackwardBackend<T>> backend;
  run_agreed_call(
      transport, options.timeout,
      describe_call<T>(config, shape, static_cast<std::int64_t>(options.layout), CallOperation::backward),
      validate_local,
      [&] {
        const bool mean = config.mixing == Mixing::mean;
        backend = std::make_unique<CpuBackwardBackend<T>>(
            local, rank_chunks(options.layout, shape.seq_len, transport.size(), transport.rank()), q, k, v,
            out, lse, d_out, static_cast<Acc>(resolved_scale(config, shape)), config.causal,
            static_cast<std::int64_t>(config.segment_lengths.size()), mean, options.num_threads);
        PatternCache& cache = options.cache != nullptr ? *options.cache : default_pattern_cache();
        stats = run_ring_backward(config, shape, transport, *backend, cache, options);
      },
      [&] { backend->finish(d_q, d_k, d_v); });
  return stats;
}

}  // namespace dilated_attention::ring
