// The pinned staging of the inference forms' table (cuda/inference_staging.hpp) against a fake
// CUDA runtime defined here (host memory for pinned memory; events whose completion the test
// decides), so that its reuse rule runs without a GPU: a buffer is handed out again only once
// the event recorded after its upload has completed, per device, growing to the largest size.

#include <dilated_attention/cuda/inference_staging.hpp>

#include <gtest/gtest.h>

#include <cstdlib>
#include <set>

namespace fake {
struct Event {
  bool done = true;
};
inline int waits = 0, host_allocations = 0;
inline cudaError_t last = cudaSuccess;
}  // namespace fake

extern "C" {
cudaError_t CUDARTAPI cudaMallocHost(void** pointer, size_t bytes) {
  *pointer = std::malloc(bytes);
  ++fake::host_allocations;
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaFreeHost(void* pointer) {
  std::free(pointer);
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int) {
  *event = reinterpret_cast<cudaEvent_t>(new fake::Event);
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaEventDestroy(cudaEvent_t event) {
  delete reinterpret_cast<fake::Event*>(event);
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaEventRecord(cudaEvent_t event, cudaStream_t) {
  reinterpret_cast<fake::Event*>(event)->done = false;  // in flight until the test completes it
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaEventQuery(cudaEvent_t event) {
  if (reinterpret_cast<fake::Event*>(event)->done) return cudaSuccess;
  fake::last = cudaErrorNotReady;
  return cudaErrorNotReady;
}
cudaError_t CUDARTAPI cudaEventSynchronize(cudaEvent_t event) {
  ++fake::waits;
  reinterpret_cast<fake::Event*>(event)->done = true;
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaGetLastError(void) {
  const cudaError_t error = fake::last;
  fake::last = cudaSuccess;
  return error;
}
const char* CUDARTAPI cudaGetErrorString(cudaError_t) { return "fake CUDA runtime error"; }
const char* CUDARTAPI cudaGetErrorName(cudaError_t) { return "cudaErrorFake"; }
}  // extern "C"

namespace {

using dilated_attention::cuda::detail::HostStaging;

TEST(CudaInferenceStaging, ReusesABufferOnlyAfterItsUploadCompleted) {
  HostStaging staging;  // a private instance, not the process-wide one
  int a = -1, b = -1, c = -1;
  void* first = staging.acquire(100, 0, a);
  staging.release_after(a, nullptr);  // upload in flight
  void* second = staging.acquire(100, 0, b);
  EXPECT_NE(first, second) << "a buffer whose upload is in flight was handed out again";
  EXPECT_EQ(fake::last, cudaSuccess) << "cudaErrorNotReady left as the runtime's last error";
  staging.release_unused(b);  // nothing enqueued: free at once
  void* third = staging.acquire(100, 0, c);
  EXPECT_EQ(third, second);
  staging.release_after(c, nullptr);
  EXPECT_EQ(staging.slot_count(), 2u);
}

TEST(CudaInferenceStaging, CompletedBuffersAreReusedPerDeviceAndGrow) {
  HostStaging staging;
  int a = -1, b = -1;
  void* first = staging.acquire(64, 0, a);
  staging.release_unused(a);
  void* other = staging.acquire(64, 1, b);
  EXPECT_NE(other, first) << "device 1 gets buffers of its own";
  staging.release_unused(b);
  int d = -1;
  EXPECT_EQ(staging.acquire(HostStaging::min_bytes, 0, d), first)
      << "a free buffer of device 0 is reused";
  staging.release_unused(d);
  int e = -1;
  const int allocations = fake::host_allocations;
  void* big = staging.acquire(HostStaging::min_bytes * 4, 0, e);  // too small: a new, larger one
  EXPECT_NE(big, nullptr);
  EXPECT_EQ(fake::host_allocations, allocations + 1);
}

TEST(CudaInferenceStaging, PastMaxSlotsWaitsForTheOldest) {
  HostStaging staging;
  std::set<void*> seen;
  for (int i = 0; i < HostStaging::max_slots; ++i) {
    int slot = -1;
    seen.insert(staging.acquire(10, 0, slot));
    staging.release_after(slot, nullptr);  // all in flight
  }
  EXPECT_EQ(seen.size(), static_cast<std::size_t>(HostStaging::max_slots));
  const int waits = fake::waits;
  int slot = -1;
  void* again = staging.acquire(10, 0, slot);
  EXPECT_EQ(fake::waits, waits + 1) << "the 17th call waits for a slot instead of allocating";
  EXPECT_TRUE(seen.count(again));
  EXPECT_EQ(staging.slot_count(), static_cast<std::size_t>(HostStaging::max_slots));
}

}  // namespace
