#pragma once
// backward_on_device: one ring backward call on a device -- the protocol of ring::backward
// (ring/driver/agreement.hpp) around the CUDA gradient back end (ring/cuda/backward_backend.cuh) and the
// driver (ring/driver/backward.hpp). Free of runtime calls (the Device policy makes them), so the host
// emulation runs it; ring/cuda/backward.cuh instantiates it with the CUDA stream.

#include <cstdint>
#include <memory>
#include <utility>

#include "../../config.hpp"
#include "../../cuda/launch_checks.hpp"
#include "../driver/agreement.hpp"
#include "../driver/backward.hpp"
#include "forward_backend.cuh"
#include "backward_backend.cuh"
#include "../driver/layout.hpp"
#include "../driver/options.hpp"
#include "../driver/pattern_cache.hpp"
#include "../transport/transport.hpp"

namespace dilated_attention::ring {

// The ring backward on a device (ring/cuda/backward.cuh instantiates it with the CUDA stream): the
// protocol of ring::backward (ring/driver/agreement.hpp: describe_call with CallOperation::backward,
// validate_ring_call, validate_backward on the local shape, the device limits), then the driver
// with CudaBackwardBackend. As forward_on_device: one synchronisation ends the body (a device
// fault is this rank's failure before the verdicts are exchanged), finish() is enqueued only when
// every rank succeeded, and the call returns once the stream has written the gradients.
template <class T, class Device>
Stats backward_on_device(Device device, const Config& config, const Shape& shape, Transport& transport,
                         View<const T> q, View<const T> k, View<const T> v, View<const T> out,
                         const float* lse, View<const T> d_out, View<T> d_q, View<T> d_k, View<T> d_v,
                         const Options& options) {
  Shape local = shape;
  const auto validate_local = [&] {
    local = validate_ring_call(config, shape, transport, options);
    validate_backward(config, local, q, k, v, out, lse, d_out, d_q, d_k, d_v);
    dilated_attention::cuda::check_backend_limits(config, local);
    const char* element = "every tensor element must be aligned to its type";
    const std::pair<const void*, const char*> tensors[] = {{q.data, "q.data"},     {k.data, "k.data"},
                                                           {v.data, "v.data"},     {out.data, "out.data"},
                                                           {d_out.data, "d_out.data"}, {d_q.data, "d_q.data"},
                                                           {d_k.data, "d_k.data"}, {d_v.data, "d_v.data"}};
    for (const auto& [data, name] : tensors)
      dilated_attention::cuda::check_alignment(data, alignof(T), name, element);
    dilated_attention::cuda::check_alignment(lse, alignof(float), "lse", "lse is an array of float");
  };
  const CallRecord record =
      detail::describe_device_call<T>(config, shape, options.layout, CallOperation::backward);
  Stats stats;
  std::unique_ptr<CudaBackwardBackend<T, Device>> backend;
  run_agreed_call(
      transport, options.timeout, record, validate_local,
      [&] {
        backend = std::make_unique<CudaBackwardBackend<T, Device>>(
            device, local, rank_chunks(options.layout, shape.seq_len, transport.size(), transport.rank()),
            q, k, v, out, lse, d_out, resolved_scale(config, shape), config.causal,
            static_cast<std::int64_t>(config.segment_lengths.size()), config.mixing == Mixing::mean);
        PatternCache& cache = options.cache != nullptr ? *options.cache : default_pattern_cache();
        stats = run_ring_backward(config, shape, transport, *backend, cache, options);
        backend->synchronize();
      },
      [&] { backend->finish(d_q, d_k, d_v); });
  backend->synchronize();  // the gradients are written; a fault of finish() surfaces here
  return stats;
}

}  // namespace dilated_attention::ring
