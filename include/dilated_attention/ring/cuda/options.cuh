#pragma once
// The options of the CUDA ring (ring::cuda::forward, ring::cuda::backward): the common ring
// settings (ring/driver/options.hpp) and `device`, the options of the device's own calls.
//
// DeviceOptions is the ring's stand-in for dilated_attention::cuda::Options (the single-device
// CUDA options: the stream, and a workspace the ring does not use): it holds the one field the
// ring reads, under the same name, so that switching to it is `using DeviceOptions =
// dilated_attention::cuda::Options;` and every `options.device.stream` stays as written.

#include <cuda_runtime.h>

#include "../driver/options.hpp"

namespace dilated_attention::ring::cuda {

// The stream every device operation of the call is enqueued on (nullptr: the legacy default
// stream), as for a cuda:: call.
struct DeviceOptions {
  cudaStream_t stream = nullptr;
};

// num_threads and drive_progress do not apply to the CUDA ring (the host only records and
// launches); every other common setting means what it means for the CPU ring.
struct Options : CommonOptions {
  DeviceOptions device;
};

}  // namespace dilated_attention::ring::cuda
