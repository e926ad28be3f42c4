#pragma once
// backward_on_device: one ring backward call on a device -- the protocol of ring::backward
// (ring/driver/agreement.hpp) around the CUDA gradient back end (ring/cuda/backward_backend.cuh) and the
// driver (ring/driver/backward.hpp). Free of runtime calls (the Device policy makes them), so the host
// emulation runs it; ring/cuda/backward.cuh instantiates it with the CUDA stream.

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "../../arguments.hpp"
#include "../../config.hpp"
#include "../../cuda/launch_checks.hpp"
#include "../driver/agreement.hpp"
#include "../driver/backward.hpp"
#include "../driver/call.hpp"
#include "forward_backend.cuh"
#include "backward_backend.cuh"
#include "../driver/layout.hpp"
#include "../driver/options.hpp"
#include "../driver/pattern_cache.hpp"
#include "../transport/transport.hpp"

namespace dilated_attention::ring {

// The ring backward on a device (ring/cuda/backward.cuh instantiates it with the CUDA stream):
// run_ring_call (ring/driver/call.hpp) with validate_backward on the local shape, the device
// limits and CudaBackwardBackend. As forward_on_device: one synchronisation ends the body (a
// device fault is this rank's failure before the verdicts are exchanged), finish() is enqueued
// only when every rank succeeded and not waited for: the gradients are written once the stream
// reaches that point.
template <class T, class Device>
Stats backward_on_device(Device device, const Config& config, const Shape& shape,
                         Transport& transport, const Inputs<T>& inputs,
                         const Outputs<const T>& forward_outputs, View<const T> d_out,
                         const Gradients<T>& gradients, const CommonOptions& options) {
  const View<const T> q = inputs.q, k = inputs.k, v = inputs.v;
  const View<const T> out = forward_outputs.out;
  const float* lse = forward_outputs.lse;
  return run_ring_call<CallOperation::backward>(
      config, shape, transport, options,
      detail::describe_device_call<T>(config, shape, options.layout, CallOperation::backward),
      [&](const Shape& local) {
        validate_backward(config, local, q, k, v, out, lse, d_out, gradients.d_q, gradients.d_k,
                          gradients.d_v);
        dilated_attention::cuda::check_backend_limits(config, local);
        const char* element = "every tensor element must be aligned to its type";
        const std::pair<const void*, const char*> tensors[] = {{q.data, "q.data"},
                                                               {k.data, "k.data"},
                                                               {v.data, "v.data"},
                                                               {out.data, "out.data"},
                                                               {d_out.data, "d_out.data"},
                                                               {gradients.d_q.data, "d_q.data"},
                                                               {gradients.d_k.data, "d_k.data"},
                                                               {gradients.d_v.data, "d_v.data"}};
        for (const auto& [data, name] : tensors)
          dilated_attention::cuda::check_alignment(data, alignof(T), name, element);
        dilated_attention::cuda::check_alignment(lse, alignof(float), "lse",
                                                 "lse is an array of float");
      },
      [&](const Shape& local, std::vector<Chunk> chunks) {
        return std::make_unique<CudaBackwardBackend<T, Device>>(
            device, local, std::move(chunks), q, k, v, out, lse, d_out,
            resolved_scale(config, shape), config.causal,
            static_cast<std::int64_t>(config.segment_lengths.size()),
            config.mixing == Mixing::mean);
      },
      [&](CudaBackwardBackend<T, Device>& backend) {
        backend.finish(gradients.d_q, gradients.d_k, gradients.d_v);
      });
}

}  // namespace dilated_attention::ring
