#pragma once
// run_ring_call: the one protocol of every ring entry point (ring::forward, ring::backward,
// ring::cuda::forward, ring::cuda::backward; docs/ring.md "One call"), written once:
//
//   1. validate_ring_call on the GLOBAL shape (partition, layout, config, the common options),
//      then the entry point's own checks on this rank's local shape (validate / validate_backward,
//      the device's limits and options);
//   2. run_agreed_call (ring/driver/agreement.hpp) with the entry point's record: the ranks agree
//      on the call, or every rank raises;
//   3. the body: build the back end, pick the pattern cache (options.cache, else
//      default_pattern_cache()), run the driver of `Operation` (run_ring_forward or
//      run_ring_backward), then, for a stream-ordered back end, synchronise its stream once, so
//      that a device fault is this rank's failure before the ranks exchange their verdicts;
//   4. the commit (finish()) once every rank succeeded. For a stream-ordered back end it is only
//      ENQUEUED: the call returns without waiting for it (the rule of every cuda:: call), and the
//      back end's destructor releases its device memory stream-ordered (ring/cuda/shard.cuh).

#include <memory>
#include <utility>

#include "../../config.hpp"
#include "agreement.hpp"
#include "backward.hpp"
#include "exchange.hpp"
#include "forward.hpp"
#include "layout.hpp"
#include "options.hpp"
#include "pattern_cache.hpp"
#include "../transport/transport.hpp"

namespace dilated_attention::ring {

// One ring call. `record`: what the ranks agree on (describe_call / describe_device_call with
// Operation). validate_local(local): the entry point's checks on this rank's local shape (throws
// std::invalid_argument naming the parameter). make_backend(local, chunks): the back end, as a
// std::unique_ptr. commit(backend): writes the outputs (every rank succeeded).
template <CallOperation Operation, class ValidateLocal, class MakeBackend, class Commit>
Stats run_ring_call(const Config& config, const Shape& shape, Transport& transport,
                    const CommonOptions& options, const CallRecord& record,
                    ValidateLocal&& validate_local, MakeBackend&& make_backend, Commit&& commit) {
  using BackendPointer = decltype(make_backend(shape, std::vector<Chunk>{}));
  using Backend = typename BackendPointer::element_type;
  Shape local = shape;
  Stats stats;
  BackendPointer backend;
  run_agreed_call(
      transport, options.timeout, record,
      [&] {
        local = validate_ring_call(config, shape, transport, options);
        validate_local(static_cast<const Shape&>(local));
      },
      [&] {
        backend = make_backend(
            static_cast<const Shape&>(local),
            rank_chunks(options.layout, shape.seq_len, transport.size(), transport.rank()));
        PatternCache& cache = options.cache != nullptr ? *options.cache : default_pattern_cache();
        if constexpr (Operation == CallOperation::forward)
          stats = run_ring_forward(config, shape, transport, *backend, cache, options);
        else
          stats = run_ring_backward(config, shape, transport, *backend, cache, options);
        if constexpr (detail::is_stream_ordered<Backend>::value) backend->synchronize();
      },
      [&] { commit(*backend); });
  return stats;
}

}  // namespace dilated_attention::ring
