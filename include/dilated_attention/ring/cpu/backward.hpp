#pragma once
// The CPU entry point of the ring backward (docs/semantics.md "Entry points", docs/semantics.md "The gradient"): ring::backward<T> runs the
// generic driver (ring/driver/backward.hpp) with the CPU gradient back end
// (ring/cpu/backward_backend.hpp).

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>
#include <type_traits>

#include "../../arguments.hpp"
#include "../../config.hpp"
#include "../../cpu/kernels/isa.hpp"
#include "../../pattern.hpp"
#include "../driver/call.hpp"
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
// `shape` is the GLOBAL shape; inputs, forward_outputs.out, d_out and the gradients are views
// over this rank's N / P rows in options.layout's order; forward_outputs.lse is [batch,
// num_heads, N / P] contiguous of lse_type_t<T>, same row order. gradients.d_q receives exactly
// this rank's rows of the single-device dQ, d_k and d_v this rank's rows of dK and dV (summed
// over the query heads of each GQA group and over every rank whose queries attend them); all
// three are overwritten.
//
// Collective, with the forward's guarantees: the ranks agree first (a rank with bad input throws
// std::invalid_argument naming the parameter -- every rule of validate_backward --, the others
// PeerFailure), either every rank returns or every rank raises, no gradient is written on any
// rank unless every rank succeeded, the transport serves the next call, and a transfer that does
// not complete within options.timeout throws TransferTimeout. Bitwise reproducible from run to
// run and for any options.device.num_threads.
template <class T>
Stats backward(const Config& config, const Shape& shape, Transport& transport,
               const Inputs<dilated_attention::detail::identity_t<T>>& inputs,
               const Outputs<const dilated_attention::detail::identity_t<T>>& forward_outputs,
               View<const dilated_attention::detail::identity_t<T>> d_out,
               const Gradients<T>& gradients, const Options& options = {}) {
  using Acc = cpu::accumulator_t<T>;
  static_assert(std::is_same_v<lse_type_t<T>, Acc>, "the LSE is stored in the accumulator type");
  int threads = 1;
  return run_ring_call<CallOperation::backward>(
      config, shape, transport, options,
      describe_call<T>(config, shape, static_cast<std::int64_t>(options.layout),
                       CallOperation::backward),
      [&](const Shape& local) {
        validate_backward(config, local, inputs.q, inputs.k, inputs.v, forward_outputs.out,
                          forward_outputs.lse, d_out, gradients.d_q, gradients.d_k, gradients.d_v);
        threads = detail::resolve_ring_threads(options);
        (void)cpu::resolve_isa(options.device.isa);  // a bad ISA is this rank's refusal
      },
      [&](const Shape& local, std::vector<Chunk> chunks) {
        const bool recompute =
            config.mixing == Mixing::mean && Pattern(config, shape).mean_recomputes_statistics();
        return std::make_unique<CpuBackwardBackend<T>>(
            local, std::move(chunks), inputs.q, inputs.k, inputs.v, forward_outputs.out,
            forward_outputs.lse, d_out, static_cast<Acc>(resolved_scale(config, shape)),
            config.causal, static_cast<std::int64_t>(config.segment_lengths.size()),
            config.mixing == Mixing::mean, recompute, threads, options.device.isa);
      },
      [&](CpuBackwardBackend<T>& backend) {
        backend.finish(gradients.d_q, gradients.d_k, gradients.d_v);
      });
}

// The positional spelling of 0.1.
template <class T>
[[deprecated(
    "use ring::backward(config, shape, transport, {q, k, v}, {out, lse}, d_out, {d_q, d_k, d_v}, "
    "options); removed in 0.2.0")]] Stats
backward(const Config& config, const Shape& shape, Transport& transport,
         View<const dilated_attention::detail::identity_t<T>> q,
         View<const dilated_attention::detail::identity_t<T>> k,
         View<const dilated_attention::detail::identity_t<T>> v,
         View<const dilated_attention::detail::identity_t<T>> out,
         const lse_type_t<dilated_attention::detail::identity_t<T>>* lse,
         View<const dilated_attention::detail::identity_t<T>> d_out, View<T> d_q, View<T> d_k,
         View<T> d_v, const Options& options = {}) {
  return backward<T>(config, shape, transport, Inputs<T>{q, k, v}, Outputs<const T>{out, lse},
                     d_out, Gradients<T>{d_q, d_k, d_v}, options);
}

}  // namespace dilated_attention::ring
