#pragma once
// The options of the CUDA ring (ring::cuda::forward, ring::cuda::backward): the common ring
// settings (ring/driver/options.hpp) and `device`, the options of the device's own calls.
// `device` is a dilated_attention::cuda::Options, the options of a single-device CUDA call: the
// ring reads its `stream`. Its workspace fields belong to cuda::backward and are not used: the
// ring's buffers are its own, allocated and released stream-ordered on that stream.

#include <cuda_runtime.h>

#include "../../cuda/options.cuh"
#include "../driver/options.hpp"

namespace dilated_attention::ring::cuda {

using DeviceOptions = ::dilated_attention::cuda::Options;

// num_threads and drive_progress do not apply to the CUDA ring (the host only records and
// launches); every other common setting means what it means for the CPU ring.
struct Options : CommonOptions {
  DeviceOptions device;
};

}  // namespace dilated_attention::ring::cuda
