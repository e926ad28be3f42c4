#pragma once
// A fake of the few CUDA runtime calls the loopback transport (ring/transport/loopback.cuh) and
// cuda/error.cuh make, for host tests that run it without a GPU (and without linking cudart:
// include this in exactly one translation unit of a test that does not link CUDA::cudart).
//
// Memory is host memory and every stream operation runs when it is enqueued (the emulated
// kernels of the ring back end do too), so program order is stream order. What the fake checks
// that a GPU would not tell: cudaStreamWaitEvent on an event never recorded (on a GPU a silent
// no-op: the classic missed dependency), and events or streams never destroyed.

#include <cuda_runtime.h>

#include <atomic>
#include <cstring>

namespace fake_cuda {

struct Event {
  bool recorded = false;
};
struct Stream {
  int unused = 0;
};

inline std::atomic<long> live_events{0}, live_streams{0}, waits_on_unrecorded_events{0};

inline Event* event(cudaEvent_t handle) { return reinterpret_cast<Event*>(handle); }

}  // namespace fake_cuda

extern "C" {

cudaError_t CUDARTAPI cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaSetDevice(int) { return cudaSuccess; }
cudaError_t CUDARTAPI cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int) {
  *stream = reinterpret_cast<cudaStream_t>(new fake_cuda::Stream);
  ++fake_cuda::live_streams;
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t CUDARTAPI cudaStreamDestroy(cudaStream_t stream) {
  delete reinterpret_cast<fake_cuda::Stream*>(stream);
  --fake_cuda::live_streams;
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int) {
  *event = reinterpret_cast<cudaEvent_t>(new fake_cuda::Event);
  ++fake_cuda::live_events;
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaEventRecord(cudaEvent_t event, cudaStream_t) {
  fake_cuda::event(event)->recorded = true;
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaEventDestroy(cudaEvent_t event) {
  delete fake_cuda::event(event);
  --fake_cuda::live_events;
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaEventQuery(cudaEvent_t) { return cudaSuccess; }
cudaError_t CUDARTAPI cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
cudaError_t CUDARTAPI cudaStreamWaitEvent(cudaStream_t, cudaEvent_t event, unsigned int) {
  if (!fake_cuda::event(event)->recorded) ++fake_cuda::waits_on_unrecorded_events;
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaMemcpyAsync(void* destination, const void* source, size_t bytes,
                                      cudaMemcpyKind, cudaStream_t) {
  std::memcpy(destination, source, bytes);
  return cudaSuccess;
}
const char* CUDARTAPI cudaGetErrorString(cudaError_t) { return "fake CUDA runtime error"; }
const char* CUDARTAPI cudaGetErrorName(cudaError_t) { return "cudaErrorFake"; }

}  // extern "C"
