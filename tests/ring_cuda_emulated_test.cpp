// The ring's CUDA back end (ring/cuda_backend.cuh) with its own kernels
// (ring/cuda_block_kernels.cuh) run on the host: the device is emulated by plain memory and
// tests/cuda_host_emulation.hpp (threads as fibers, warp collectives as barriers), the ranks are
// threads of the in-process transport. So CI without a GPU executes the back end's recording,
// grouping and staging of work items, the pack, block attend+merge and finish kernels, and the
// whole ring protocol (ring::forward_on_device) for P = 1..4 in both layouts, against the CPU
// back end and the fp64 reference. What it cannot see -- streams, events, the loopback copies,
// races, speed -- is for tests/ring_cuda_forward_test.cu on a GPU.

#include <dilated_attention/reference.hpp>
#include <dilated_attention/ring.hpp>

#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <new>
#include <set>
#include <string>
#include <vector>

#include "cuda_host_emulation.hpp"  // before the kernels: it defines the CUDA names they use

#include <dilated_attention/ring/cuda_backend.cuh>

#include "ring_cuda_cases.hpp"
#include "ring_support.hpp"

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define DILATED_ATTENTION_FIBERS_UNSUPPORTED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define DILATED_ATTENTION_FIBERS_UNSUPPORTED 1
#endif
#endif

#if defined(DILATED_ATTENTION_FIBERS_UNSUPPORTED)
#define DILATED_ATTENTION_REQUIRE_FIBERS() \
  GTEST_SKIP() << "host emulation uses ucontext fibers, which ASan/TSan do not follow"
#else
#define DILATED_ATTENTION_REQUIRE_FIBERS() (void)0
#endif

namespace {

namespace da = dilated_attention;
namespace ring = dilated_attention::ring;
namespace dt = dilated_attention::testing;

// The Device policy of CudaBackend on the host: memory is memory, launches run the kernel's
// blocks one after another (emulation::launch), the "stream" is program order. One process-wide
// lock serialises launches: the emulation's fibers and shared memory are per process, and the
// ranks are threads.
std::mutex& launch_mutex() {
  static std::mutex mutex;
  return mutex;
}

struct EmulatedDevice {
  static void* allocate(std::size_t bytes) { return ::operator new(bytes, std::align_val_t(256)); }
  static void release(void* data) noexcept { ::operator delete(data, std::align_val_t(256)); }
  void upload(void* device, const void* host, std::size_t bytes) const { std::memcpy(device, host, bytes); }
  void zero(void* device, std::size_t bytes) const { std::memset(device, 0, bytes); }
  template <class Params>
  void launch(void (*kernel)(Params), std::int64_t blocks, int threads, std::size_t shared_bytes,
              const Params& params) const {
    EXPECT_LE(shared_bytes, sizeof(ring::device::ring_query_rows));
    const std::lock_guard<std::mutex> lock(launch_mutex());
    emulation::launch(static_cast<unsigned>(blocks), static_cast<unsigned>(threads),
                      reinterpret_cast<unsigned char*>(ring::device::ring_query_rows), shared_bytes,
                      [&] { kernel(params); });
  }
  void synchronize() const {}
  void* queue() const { return nullptr; }
};

template <class T>
using EmulatedBackend = ring::CudaBackend<T, EmulatedDevice>;

// A transport that claims device ordering, as the loopback and NCCL transports do: sends are
// "ordered" (program order), a stream wait completes the receive on the host and leaves the
// ticket open until the driver's final wait. Exercises the driver's stream-ordered path.
class StreamOrderedAdapter final : public ring::TransportAdapter {
 public:
  using TransportAdapter::TransportAdapter;
  bool order_sends_after(void*) override {
    ++orderings;
    return true;
  }
  bool enqueue_wait(Ticket ticket, void*) override {
    TransportAdapter::wait(ticket);
    arrived_.insert(ticket);
    ++stream_waits;
    return true;
  }
  void wait(Ticket ticket) override {
    if (arrived_.erase(ticket) != 0) return;
    TransportAdapter::wait(ticket);
  }
  int orderings = 0, stream_waits = 0;

 private:
  std::set<Ticket> arrived_;
};

template <class T>
dt::KernelResult<T> run_emulated_ring(const dt::Case& c, const dt::DeviceTestInputs<T>& in, int num_ranks,
                                      ring::Layout layout = ring::Layout::contiguous,
                                      bool stream_ordered = false) {
  ring::Options options;
  options.layout = layout;
  return dt::run_ring_case<T>(
      c, in, num_ranks, layout,
      [](int ranks, auto body) {
        ring::run_in_process(ranks, [&](ring::Transport& transport) { body(transport, nullptr); });
      },
      [&](ring::Transport& inner, void*, const dt::Tensor<T>& q, const dt::Tensor<T>& k,
          const dt::Tensor<T>& v, dt::Tensor<T>& out, std::vector<float>& lse) {
        StreamOrderedAdapter ordered(inner);
        ring::Transport& transport = stream_ordered ? static_cast<ring::Transport&>(ordered) : inner;
        const ring::Stats stats = ring::forward_on_device<T>(EmulatedDevice{}, c.config, c.shape, transport,
                                                             q.view(), k.view(), v.view(), out.view(),
                                                             lse.data(), options);
        if (stream_ordered) {  // every send ordered after its packing, every receive on the stream
          EXPECT_EQ(ordered.orderings, stats.sends_posted);
          EXPECT_EQ(ordered.stream_waits, stats.recvs_posted);
        }
      });
}

// pack(): K rows then V rows of a progression, as the CPU back end packs them (bitwise: a copy),
// in both layouts (zigzag: a progression in the second chunk).
TEST(RingCudaEmulated, PackEqualsCpuBackend) {
  DILATED_ATTENTION_REQUIRE_FIBERS();
  const da::Shape local{2, 12, 4, 2, 32};
  const auto k = dt::random_tensor<float>(local, 2, 1, 1, 3), v = dt::random_tensor<float>(local, 2, 2, 1, 3);
  const auto q = dt::random_tensor<float>(local, 4, 3);
  const std::vector<ring::Chunk> chunks = {{6, 12, 0}, {30, 36, 6}};  // zigzag rank 1 of 3, N = 36
  ring::CpuBackend<float> cpu(local, chunks, q.view(), k.view(), v.view(), 1.f, false, 1, 1);
  EmulatedBackend<float> gpu(EmulatedDevice{}, local, chunks, q.view(), k.view(), v.view(), 1.0, false, 1);
  const std::vector<da::Progression> pieces = {{6, 2, 3}, {31, 3, 2}, {11, 1, 1}, {30, 1, 6}};
  std::size_t elements = 0;
  for (const auto& rows : pieces) elements += static_cast<std::size_t>(2 * rows.count * 32);
  auto expected = cpu.make_buffer(elements);
  auto packed = gpu.make_buffer(elements);
  std::size_t at = 0;
  for (std::size_t i = 0; i < pieces.size(); ++i) {
    const std::int64_t b = static_cast<std::int64_t>(i % 2), g = static_cast<std::int64_t>(i / 2 % 2);
    cpu.pack(expected, at, b, g, pieces[i]);
    gpu.pack(packed, at, b, g, pieces[i]);
    at += static_cast<std::size_t>(2 * pieces[i].count * 32);
  }
  gpu.flush_packs();
  EXPECT_EQ(std::memcmp(expected.data(), packed.data(), elements * sizeof(float)), 0);
}

// attend_merge() then finish(): the block partials merged with the guarded merge, including a
// block with no visible key (causal, keys after the queries: lse = -inf, the identity), keys
// received in a packed buffer, two blocks on the same rows, and mean mixing where one branch
// never selects a row (it contributes 0). Against the CPU back end.
TEST(RingCudaEmulated, BlockAttendMergeAndFinishEqualCpuBackend) {
  DILATED_ATTENTION_REQUIRE_FIBERS();
  const da::Shape local{1, 16, 2, 1, 64};
  const auto q = dt::random_tensor<float>(local, 2, 11, 0, 2), k = dt::random_tensor<float>(local, 1, 12),
             v = dt::random_tensor<float>(local, 1, 13);
  const std::vector<ring::Chunk> chunks = {{16, 32, 0}};  // rank 1 of 2, N = 32
  for (const bool causal : {false, true})
    for (const std::int64_t slots : {1, 3}) {
      SCOPED_TRACE(std::string(causal ? "causal" : "full") + " slots " + std::to_string(slots));
      ring::CpuBackend<float> cpu(local, chunks, q.view(), k.view(), v.view(), 0.3f, causal, slots, 1);
      EmulatedBackend<float> gpu(EmulatedDevice{}, local, chunks, q.view(), k.view(), v.view(), 0.3, causal, slots);
      // "Received" rows: the CPU packs host rows, the emulated device packs its own.
      const da::Progression sent{16, 3, 5};
      auto cpu_message = cpu.make_buffer(2 * 5 * 64);
      auto gpu_message = gpu.make_buffer(2 * 5 * 64);
      cpu.pack(cpu_message, 0, 0, 0, sent);
      gpu.pack(gpu_message, 0, 0, 0, sent);
      gpu.flush_packs();
      struct Block {
        std::int64_t slot, head;
        da::Progression queries, keys;
        bool received;
      };
      const std::vector<Block> blocks = {
          {0, 0, {16, 1, 16}, {16, 1, 16}, false},          // dense local block
          {slots - 1, 0, {17, 2, 8}, {16, 3, 5}, true},     // received keys, same rows again
          {0, 1, {16, 2, 4}, {25, 2, 4}, false},            // causal: row 16 sees no key
          {slots - 1, 1, {16, 4, 4}, {16, 3, 5}, true},
      };
      ring::CpuBackend<float>::Workspace cpu_ws(64, da::CpuIsa::automatic);
      gpu.for_each_head([&](std::int64_t b, std::int64_t h, EmulatedBackend<float>::Workspace& ws) {
        for (const Block& block : blocks)
          if (block.head == h && b == 0)
            gpu.attend_merge(ws, block.slot, b, h, 0, block.queries, block.keys,
                             block.received ? &gpu_message : nullptr, 0);
      });
      for (const Block& block : blocks)
        cpu.attend_merge(cpu_ws, block.slot, 0, block.head, 0, block.queries, block.keys,
                         block.received ? &cpu_message : nullptr, 0);
      dt::Tensor<float> cpu_out(local, 2), gpu_out(local, 2, 1);
      gpu_out.fill(std::numeric_limits<float>::quiet_NaN());
      std::vector<float> cpu_lse(32), gpu_lse(32, std::numeric_limits<float>::quiet_NaN());
      cpu.finish(cpu_out.view(), cpu_lse.data());
      gpu.finish(gpu_out.view(), gpu_lse.data());
      EXPECT_LE(dt::max_abs_diff(gpu_out, cpu_out), 5e-6);  // float rounding: exp2f vs the CPU's exp
      EXPECT_LE(dt::max_lse_diff(gpu_lse, cpu_lse), 5e-6);
      std::size_t untouched_rows = 0;  // rows no block selects: O = 0, LSE = -inf
      for (std::size_t i = 0; i < gpu_lse.size(); ++i) untouched_rows += std::isinf(gpu_lse[i]) ? 1 : 0;
      EXPECT_GT(untouched_rows, 0u);
      for (std::int64_t x = 0; x < 16; ++x)  // the padding stays NaN
        EXPECT_TRUE(std::isnan(gpu_out.at(0, x, 1, 64)));
    }
}

// The whole ring, float: the sweep's 36 cases x P = 1..4 (contiguous) and zigzag at P = 2 or 3,
// against the fp64 reference (check_result), bitwise equal between the host-ordered and the
// stream-ordered driver paths.
TEST(RingCudaEmulated, RingFloatEqualsReferenceForEveryP) {
  DILATED_ATTENTION_REQUIRE_FIBERS();
  std::uint64_t seed = 100;
  for (const dt::Case& c : dt::ring_sweep_cases(32)) {
    SCOPED_TRACE(dt::describe(c));
    const auto in = dt::random_device_test_inputs<float>(c.shape, c.pad, c.seq_pad, seed++);
    for (int p = 1; p <= 4; ++p) {
      SCOPED_TRACE("P = " + std::to_string(p));
      dt::check_result(c, in, run_emulated_ring<float>(c, in, p));
    }
    {
      const int p = 2 + static_cast<int>(seed % 2);
      SCOPED_TRACE("zigzag P = " + std::to_string(p));
      const auto plain = run_emulated_ring<float>(c, in, p, ring::Layout::zigzag);
      dt::check_result(c, in, plain);
      EXPECT_TRUE(dt::bitwise_equal(plain, run_emulated_ring<float>(c, in, p, ring::Layout::zigzag, true)));
    }
  }
}

// 16-bit storage: inputs and outputs in half / bfloat16, fp32 accumulation; within the bound of
// docs/semantics.md §6.10 (twice the naive storage-type implementation's error).
TEST(RingCudaEmulated, RingHalfAndBfloat16WithinTheStorageBound) {
  DILATED_ATTENTION_REQUIRE_FIBERS();
  const auto cases = dt::ring_sweep_cases(64);
  for (std::size_t i = 0; i < cases.size(); i += 5) {
    const dt::Case& c = cases[i];
    SCOPED_TRACE(dt::describe(c));
    const auto half_in = dt::random_device_test_inputs<__half>(c.shape, c.pad, c.seq_pad, 200 + i);
    dt::check_result(c, half_in, run_emulated_ring<__half>(c, half_in, 2 + static_cast<int>(i % 3)));
    const auto bf16_in = dt::random_device_test_inputs<__nv_bfloat16>(c.shape, c.pad, c.seq_pad, 300 + i);
    dt::check_result(c, bf16_in, run_emulated_ring<__nv_bfloat16>(c, bf16_in, 4 - static_cast<int>(i % 3)));
  }
}

// The protocol of ring::forward (ring/agreement.hpp) holds for the device entry: a head_dim the
// back end does not support is std::invalid_argument naming it, on every rank; ranks whose
// storage types differ (half on rank 0, bfloat16 on rank 1: same size, told apart by the
// mantissa) refuse the call before anything moves.
TEST(RingCudaEmulated, ValidationAndAgreement) {
  const da::Config config = da::testing::make_config({8}, {2});
  const da::Shape bad{1, 16, 2, 2, 40};
  dt::Tensor<float> q(bad, 2), k(bad, 2), v(bad, 2), out(bad, 2);
  try {
    ring::run_in_process(2, [&](ring::Transport& transport) {
      const std::int64_t begin = transport.rank() * 8;
      ring::forward_on_device<float>(EmulatedDevice{}, config, bad, transport,
                                     dt::shard_view(q.view(), begin), dt::shard_view(k.view(), begin),
                                     dt::shard_view(v.view(), begin), dt::shard_view(out.view(), begin), nullptr, {});
    });
    ADD_FAILURE() << "head_dim 40 was accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("head_dim"), std::string::npos) << e.what();
  }

  const da::Shape shape{1, 16, 2, 2, 32};
  dt::Tensor<__half> hq(shape, 2), hk(shape, 2), hv(shape, 2), hout(shape, 2);
  dt::Tensor<__nv_bfloat16> bq(shape, 2), bk(shape, 2), bv(shape, 2), bout(shape, 2);
  std::vector<std::string> messages(2);
  ring::run_in_process(2, [&](ring::Transport& transport) {
    const std::int64_t begin = transport.rank() * 8;
    try {
      if (transport.rank() == 0)
        ring::forward_on_device<__half>(EmulatedDevice{}, config, shape, transport, dt::shard_view(hq.view(), begin),
                                        dt::shard_view(hk.view(), begin), dt::shard_view(hv.view(), begin),
                                        dt::shard_view(hout.view(), begin), nullptr, {});
      else
        ring::forward_on_device<__nv_bfloat16>(EmulatedDevice{}, config, shape, transport,
                                               dt::shard_view(bq.view(), begin), dt::shard_view(bk.view(), begin),
                                               dt::shard_view(bv.view(), begin), dt::shard_view(bout.view(), begin),
                                               nullptr, {});
    } catch (const std::exception& e) {
      messages[static_cast<std::size_t>(transport.rank())] = e.what();
    }
  });
  EXPECT_NE(messages[1].find("the storage type T"), std::string::npos) << messages[1];
  EXPECT_NE(messages[0].find("rank 1 refused"), std::string::npos) << messages[0];
}

}  // namespace
