#pragma once
// The CPU entry point of the ring (docs/semantics.md "Entry points"): ring::forward<T> runs the generic driver
// (ring/driver/forward.hpp) with the CPU back end (ring/cpu/forward_backend.hpp).

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "../../arguments.hpp"
#include "../../config.hpp"
#include "../../cpu/kernels/isa.hpp"
#include "../driver/call.hpp"
#include "forward_backend.hpp"
#include "../driver/agreement.hpp"
#include "../driver/forward.hpp"
#include "../driver/layout.hpp"
#include "../driver/options.hpp"
#include "../driver/pattern_cache.hpp"
#include "../driver/schedule.hpp"
#include "../transport/transport.hpp"

namespace dilated_attention::ring {

// Ring forward on the CPU (docs/semantics.md "Entry points"). `shape` is the GLOBAL shape (seq_len = N);
// inputs.q, k, v and outputs.out are views over this rank's N / P rows, in the order
// options.layout gives them (rank_chunks in ring/driver/layout.hpp: the contiguous shard, or
// zigzag chunks p and 2P-1-p); outputs.lse, when given, is [batch, num_heads, N / P] contiguous
// of lse_type_t<T>, same row order. Rank and P come from the transport. This rank computes with
// options.device (CpuOptions; one thread by default, see ring::Options).
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
              const Inputs<dilated_attention::detail::identity_t<T>>& inputs,
              const Outputs<T>& outputs, const Options& options = {}) {
  int threads = 1;
  return run_ring_call<CallOperation::forward>(
      config, shape, transport, options,
      describe_call<T>(config, shape, static_cast<std::int64_t>(options.layout),
                       CallOperation::forward),
      [&](const Shape& local) {
        validate(config, local, inputs.q, inputs.k, inputs.v, outputs.out, outputs.lse);
        threads = detail::resolve_ring_threads(options);
        (void)cpu::resolve_isa(options.device.isa);  // a bad ISA is this rank's refusal
      },
      [&](const Shape& local, std::vector<Chunk> chunks) {
        const std::int64_t accumulators =
            config.mixing == Mixing::mean ? static_cast<std::int64_t>(config.segment_lengths.size())
                                          : 1;
        return std::make_unique<CpuForwardBackend<T>>(
            local, std::move(chunks), inputs.q, inputs.k, inputs.v,
            static_cast<cpu::accumulator_t<T>>(resolved_scale(config, shape)), config.causal,
            accumulators, threads, options.device.isa);
      },
      [&](CpuForwardBackend<T>& backend) { backend.finish(outputs.out, outputs.lse); });
}

// The positional spelling of 0.1.
template <class T>
[[deprecated(
    "use ring::forward(config, shape, transport, {q, k, v}, {out, lse}, options); removed in "
    "0.2.0")]] Stats
forward(const Config& config, const Shape& shape, Transport& transport,
        View<const dilated_attention::detail::identity_t<T>> q,
        View<const dilated_attention::detail::identity_t<T>> k,
        View<const dilated_attention::detail::identity_t<T>> v, View<T> out,
        lse_type_t<T>* lse = nullptr, const Options& options = {}) {
  return forward<T>(config, shape, transport, Inputs<T>{q, k, v}, Outputs<T>{out, lse}, options);
}

}  // namespace dilated_attention::ring
