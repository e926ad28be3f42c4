// The NCCL transport. Built whenever DilatedAttention::nccl exists (nvcc and NCCL found), so CI
// without a GPU still compiles it; the transfer case skips when no CUDA device is visible.
// On a GPU it is the P = 1 check of the transport: a self-exchange (send to and receive from
// rank 0 in one group) moves the bytes.

#include <gtest/gtest.h>

// Not ring.hpp: its CPU back end brings Eigen, which nvcc should not see here.
#include <dilated_attention/ring/driver/forward.hpp>
#include <dilated_attention/ring/nccl.cuh>

#include <cuda_runtime.h>
#include <nccl.h>

#include <vector>

namespace ring = dilated_attention::ring;

namespace {

// The driver sees every transport through the one interface.
static_assert(std::is_base_of_v<ring::Transport, ring::NcclTransport>);

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) return 0;
  return count;
}

TEST(RingNcclTransport, SelfExchangeAtOneRank) {
  if (device_count() == 0)
    GTEST_SKIP() << "no CUDA device: the NCCL transport is compile-checked only";
  ncclComm_t comm;
  int device = 0;
  ASSERT_EQ(ncclCommInitAll(&comm, 1, &device), ncclSuccess);
  cudaStream_t stream;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  {
    ring::NcclTransport transport(comm, stream);
    EXPECT_EQ(transport.rank(), 0);
    EXPECT_EQ(transport.size(), 1);
    std::vector<int> host(256);
    for (int i = 0; i < 256; ++i) host[static_cast<std::size_t>(i)] = i * 7 - 3;
    int *send = nullptr, *recv = nullptr;
    ASSERT_EQ(cudaMalloc(&send, host.size() * sizeof(int)), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&recv, host.size() * sizeof(int)), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(send, host.data(), host.size() * sizeof(int), cudaMemcpyHostToDevice),
              cudaSuccess);
    ring::Transport& t = transport;
    t.begin_group();
    const auto r = t.post_recv(0, 1, recv, host.size() * sizeof(int));
    const auto s = t.post_send(0, 1, send, host.size() * sizeof(int));
    t.end_group();
    t.wait(r);
    t.wait(s);
    std::vector<int> back(host.size());
    ASSERT_EQ(cudaMemcpy(back.data(), recv, back.size() * sizeof(int), cudaMemcpyDeviceToHost),
              cudaSuccess);
    EXPECT_EQ(back, host);
    cudaFree(send);
    cudaFree(recv);
  }
  cudaStreamDestroy(stream);
  ncclCommDestroy(comm);
}

}  // namespace
