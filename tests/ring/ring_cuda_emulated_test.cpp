// The ring's CUDA back end (ring/cuda/forward_backend.cuh) with its own kernels
// (ring/cuda/forward_kernels.cuh) run on the host: the device is emulated by plain memory and
// tests/support/cuda_host_emulation.hpp (threads as fibers, warp collectives as barriers), the ranks are
// threads of the in-process transport. So CI without a GPU executes the back end's recording,
// grouping and staging of work items, the pack, block attend+merge and finish kernels, and the
// whole ring protocol (ring::forward_on_device) for P = 1..4 in both layouts, against the CPU
// back end and the fp64 reference. The loopback CUDA transport runs too, over a fake of the few
// runtime calls it makes (tests/support/fake_cuda_runtime.hpp: host memory, every stream operation at
// once, a wait on an event never recorded counted as a bug). What this cannot see -- real stream
// concurrency, races, speed -- is for tests/ring/ring_cuda_forward_test.cu on a GPU.

#include <dilated_attention/reference.hpp>
#include <dilated_attention/ring.hpp>

#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <new>
#include <set>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "support/fake_cuda_runtime.hpp"  // the runtime calls of the loopback transport, on the host
#include "support/cuda_host_emulation.hpp"  // before the kernels: it defines the CUDA names they use

#include <dilated_attention/ring/cuda/forward_backend.cuh>
#include <dilated_attention/ring/transport/loopback.cuh>

#include "support/ring_cuda_cases.hpp"
#include "support/ring_cuda_emulated_device.hpp"
#include "support/ring_support.hpp"

namespace {

namespace da = dilated_attention;
namespace ring = dilated_attention::ring;
namespace dt = dilated_attention::testing;

using dt::EmulatedDevice;

template <class T>
using EmulatedBackend = ring::CudaForwardBackend<T, EmulatedDevice>;

template <class T>
dt::KernelResult<T> run_emulated_ring(const dt::Case& c, const dt::DeviceTestInputs<T>& in,
                                      int num_ranks, ring::Layout layout = ring::Layout::contiguous,
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
        dt::StreamOrderedAdapter ordered(inner);
        ring::Transport& transport =
            stream_ordered ? static_cast<ring::Transport&>(ordered) : inner;
        const ring::Stats stats = ring::forward_on_device<T>(
            EmulatedDevice{}, c.config, c.shape, transport, {q.view(), k.view(), v.view()},
            {out.view(), lse.data()}, options);
        if (stream_ordered) {  // every send ordered after its packing, every receive on the stream
          // once per step that moves anything: every send, and every receive-only step
          EXPECT_GE(ordered.orderings, stats.sends_posted);
          EXPECT_LE(ordered.orderings, stats.sends_posted + stats.recvs_posted);
          EXPECT_EQ(ordered.stream_waits, stats.recvs_posted);
        }
      });
}

template <class T>
dt::KernelResult<T> run_loopback_ring(const dt::Case& c, const dt::DeviceTestInputs<T>& in,
                                      int num_ranks,
                                      ring::Layout layout = ring::Layout::contiguous) {
  ring::Options options;
  options.layout = layout;
  return dt::run_ring_case<T>(
      c, in, num_ranks, layout,
      [](int ranks, auto body) {
        ring::run_in_loopback(ranks, [&](ring::Transport& transport, cudaStream_t stream) {
          body(transport, static_cast<void*>(stream));
        });
      },
      [&](ring::Transport& transport, void* stream, const dt::Tensor<T>& q, const dt::Tensor<T>& k,
          const dt::Tensor<T>& v, dt::Tensor<T>& out, std::vector<float>& lse) {
        ring::forward_on_device<T>(EmulatedDevice{stream}, c.config, c.shape, transport,
                                   {q.view(), k.view(), v.view()}, {out.view(), lse.data()},
                                   options);
      });
}

// Every event the loopback transport created was destroyed, every stream too, and no stream
// ever waited on an event that was never recorded.
void expect_clean_fake_runtime() {
  EXPECT_EQ(fake_cuda::waits_on_unrecorded_events.load(), 0);
  EXPECT_EQ(fake_cuda::live_events.load(), 0);
  EXPECT_EQ(fake_cuda::live_streams.load(), 0);
}

// pack(): K rows then V rows of a progression, as the CPU back end packs them (bitwise: a copy),
// in both layouts (zigzag: a progression in the second chunk).
TEST(RingCudaEmulated, PackEqualsCpuBackend) {
  DILATED_ATTENTION_REQUIRE_FIBERS();
  const da::Shape local{2, 12, 4, 2, 32};
  const auto k = dt::random_tensor<float>(local, 2, 1, 1, 3),
             v = dt::random_tensor<float>(local, 2, 2, 1, 3);
  const auto q = dt::random_tensor<float>(local, 4, 3);
  const std::vector<ring::Chunk> chunks = {{6, 12, 0}, {30, 36, 6}};  // zigzag rank 1 of 3, N = 36
  ring::CpuForwardBackend<float> cpu(local, chunks, q.view(), k.view(), v.view(), 1.f, false, 1, 1);
  EmulatedBackend<float> gpu(EmulatedDevice{}, local, chunks, q.view(), k.view(), v.view(), 1.0,
                             false, 1);
  const std::vector<da::Progression> pieces = {{6, 2, 3}, {31, 3, 2}, {11, 1, 1}, {30, 1, 6}};
  std::size_t elements = 0;
  for (const auto& rows : pieces) elements += static_cast<std::size_t>(2 * rows.count * 32);
  auto expected = cpu.make_buffer(elements);
  auto packed = gpu.make_buffer(elements);
  std::size_t at = 0;
  for (std::size_t i = 0; i < pieces.size(); ++i) {
    const std::int64_t b = static_cast<std::int64_t>(i % 2),
                       g = static_cast<std::int64_t>(i / 2 % 2);
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
  const auto q = dt::random_tensor<float>(local, 2, 11, 0, 2),
             k = dt::random_tensor<float>(local, 1, 12), v = dt::random_tensor<float>(local, 1, 13);
  const std::vector<ring::Chunk> chunks = {{16, 32, 0}};  // rank 1 of 2, N = 32
  for (const bool causal : {false, true})
    for (const std::int64_t slots : {1, 3}) {
      SCOPED_TRACE(std::string(causal ? "causal" : "full") + " slots " + std::to_string(slots));
      ring::CpuForwardBackend<float> cpu(local, chunks, q.view(), k.view(), v.view(), 0.3f, causal,
                                         slots, 1);
      EmulatedBackend<float> gpu(EmulatedDevice{}, local, chunks, q.view(), k.view(), v.view(), 0.3,
                                 causal, slots);
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
          {0, 0, {16, 1, 16}, {16, 1, 16}, false},       // dense local block
          {slots - 1, 0, {17, 2, 8}, {16, 3, 5}, true},  // received keys, same rows again
          {0, 1, {16, 2, 4}, {25, 2, 4}, false},         // causal: row 16 sees no key
          {slots - 1, 1, {16, 4, 4}, {16, 3, 5}, true},
      };
      ring::CpuForwardBackend<float>::Workspace cpu_ws(64, da::CpuIsa::automatic);
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
      EXPECT_LE(dt::max_abs_diff(gpu_out, cpu_out),
                5e-6);  // float rounding: exp2f vs the CPU's exp
      EXPECT_LE(dt::max_lse_diff(gpu_lse, cpu_lse), 5e-6);
      std::size_t untouched_rows = 0;  // rows no block selects: O = 0, LSE = -inf
      for (std::size_t i = 0; i < gpu_lse.size(); ++i)
        untouched_rows += std::isinf(gpu_lse[i]) ? 1 : 0;
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
      EXPECT_TRUE(
          dt::bitwise_equal(plain, run_emulated_ring<float>(c, in, p, ring::Layout::zigzag, true)));
    }
  }
}

// 16-bit storage: inputs and outputs in half / bfloat16, fp32 accumulation; within the bound of
// docs/semantics.md "Guarantees" (item 10) (twice the naive storage-type implementation's error).
TEST(RingCudaEmulated, RingHalfAndBfloat16WithinTheStorageBound) {
  DILATED_ATTENTION_REQUIRE_FIBERS();
  const auto cases = dt::ring_sweep_cases(64);
  for (std::size_t i = 0; i < cases.size(); i += 5) {
    const dt::Case& c = cases[i];
    SCOPED_TRACE(dt::describe(c));
    const auto half_in = dt::random_device_test_inputs<__half>(c.shape, c.pad, c.seq_pad, 200 + i);
    dt::check_result(c, half_in,
                     run_emulated_ring<__half>(c, half_in, 2 + static_cast<int>(i % 3)));
    const auto bf16_in =
        dt::random_device_test_inputs<__nv_bfloat16>(c.shape, c.pad, c.seq_pad, 300 + i);
    dt::check_result(c, bf16_in,
                     run_emulated_ring<__nv_bfloat16>(c, bf16_in, 4 - static_cast<int>(i % 3)));
  }
}

// The ring over the loopback transport (the driver's stream-ordered path with real tickets:
// sends ordered after the packing, receives waited for on the stream, the copies matched by
// either side) gives bitwise the in-process result, in both layouts.
TEST(RingCudaEmulated, LoopbackRingEqualsInProcessBitwise) {
  DILATED_ATTENTION_REQUIRE_FIBERS();
  const auto cases = dt::ring_sweep_cases(32);
  for (std::size_t i = 0; i < cases.size(); i += 4) {
    const dt::Case& c = cases[i];
    SCOPED_TRACE(dt::describe(c));
    const auto in = dt::random_device_test_inputs<float>(c.shape, c.pad, c.seq_pad, 500 + i);
    const int p = 2 + static_cast<int>(i / 4 % 3);
    const auto loopback = run_loopback_ring<float>(c, in, p);
    dt::check_result(c, in, loopback);
    EXPECT_TRUE(dt::bitwise_equal(loopback, run_emulated_ring<float>(c, in, p)));
    const int z = 2 + static_cast<int>(i / 4 % 2);
    EXPECT_TRUE(dt::bitwise_equal(run_loopback_ring<float>(c, in, z, ring::Layout::zigzag),
                                  run_emulated_ring<float>(c, in, z, ring::Layout::zigzag)));
  }
  expect_clean_fake_runtime();
}

// Faults on the loopback transport (as the GPU test, tests/ring/ring_cuda_forward_test.cu): rank 1
// throws at its first enqueue_wait (its links are matched: abandon parks them), rank 2 at its
// first post_recv (the others' sends are withdrawn), rank 1 passes a different causal flag.
// Every rank raises, no output is written, and the next call on the same transports is exact.
TEST(RingCudaEmulated, LoopbackFaultsRaiseOnEveryRankAndTheNextCallIsExact) {
  DILATED_ATTENTION_REQUIRE_FIBERS();
  const dt::Case c{"faults", dt::make_config({16, 48}, {1, 2}), da::Shape{1, 48, 2, 2, 32}};
  const auto in = dt::random_device_test_inputs<float>(c.shape, 0, 0, 77);
  for (int scenario = 0; scenario < 3; ++scenario) {
    SCOPED_TRACE("scenario " + std::to_string(scenario));
    std::vector<std::string> outcome(3);
    std::vector<std::size_t> written(3, 0);
    const auto result = dt::run_ring_case<float>(
        c, in, 3, ring::Layout::contiguous,
        [](int ranks, auto body) {
          ring::run_in_loopback(ranks, [&](ring::Transport& transport, cudaStream_t stream) {
            body(transport, static_cast<void*>(stream));
          });
        },
        [&](ring::Transport& transport, void* stream, const dt::Tensor<float>& q,
            const dt::Tensor<float>& k, const dt::Tensor<float>& v, dt::Tensor<float>& out,
            std::vector<float>& lse) {
          const auto p = static_cast<std::size_t>(transport.rank());
          dt::FaultyTransport faulty(transport, scenario == 0 && p == 1, scenario == 1 && p == 2);
          da::Config config = c.config;
          config.causal = scenario == 2 && p == 1;
          try {
            ring::forward_on_device<float>(EmulatedDevice{stream}, config, c.shape, faulty,
                                           {q.view(), k.view(), v.view()}, {out.view(), lse.data()},
                                           {});
            outcome[p] = "returned";
          } catch (const ring::PeerFailure& e) {
            outcome[p] = "PeerFailure from " + std::to_string(e.failed_rank());
          } catch (const std::exception& e) {
            outcome[p] = e.what();
          }
          for (const float value : out.storage) written[p] += std::isnan(value) ? 0 : 1;
          ring::forward_on_device<float>(EmulatedDevice{stream}, c.config, c.shape, transport,
                                         {q.view(), k.view(), v.view()}, {out.view(), lse.data()},
                                         {});
        });
    const std::size_t faulty_rank = scenario == 1 ? 2 : 1;
    const char* own = scenario == 0   ? "injected failure in enqueue_wait"
                      : scenario == 1 ? "injected failure in post_recv"
                                      : "config.causal";
    for (std::size_t p = 0; p < 3; ++p) {
      SCOPED_TRACE("rank " + std::to_string(p));
      if (p == faulty_rank) {
        EXPECT_NE(outcome[p].find(own), std::string::npos) << outcome[p];
      } else {
        EXPECT_EQ(outcome[p], "PeerFailure from " + std::to_string(faulty_rank));
      }
      EXPECT_EQ(written[p], 0u) << "a failed call wrote output";
    }
    dt::check_result(c, in, result);
  }
  expect_clean_fake_runtime();
}

// The Transport contract on the loopback transport itself: a size mismatch raises on both sides,
// a receive nobody sends times out (TransferTimeout) and is abandoned, a notice makes the peer's
// wait raise PeerFailure at once, all_gather gathers in rank order, and a later call still moves
// the bytes.
TEST(RingCudaEmulated, LoopbackTransportContract) {
  std::vector<std::string> outcome(2);
  ring::run_in_loopback(2, [&](ring::Transport& t, cudaStream_t) {
    const int me = t.rank(), other = 1 - me;
    std::string& log = outcome[static_cast<std::size_t>(me)];
    std::vector<unsigned char> buffer(16, static_cast<unsigned char>(me + 1));
    const auto attempt = [&](auto&& body) {
      try {
        body();
        log += "ok;";
      } catch (const ring::TransferTimeout&) {
        log += "timeout;";
      } catch (const ring::PeerFailure& e) {
        log += "peer " + std::to_string(e.failed_rank()) + ";";
      } catch (const std::runtime_error& e) {
        log += std::string(std::strstr(e.what(), "expected") != nullptr ? "size" : e.what()) + ";";
      }
    };
    // 1. Sizes differ: 16 bytes sent, 8 expected.
    t.begin_call(std::chrono::seconds(10));
    ring::Transport::Ticket ticket = me == 0 ? t.post_send(other, 0, buffer.data(), 16)
                                             : t.post_recv(other, 0, buffer.data(), 8);
    attempt([&] { t.wait(ticket); });
    t.abandon(ticket, nullptr);
    t.end_call();
    // 2. Rank 1 receives what rank 0 never sends.
    t.begin_call(std::chrono::milliseconds(100));
    if (me == 1) {
      ticket = t.post_recv(other, 0, buffer.data(), 16);
      attempt([&] { t.wait(ticket); });
      t.abandon(ticket, nullptr);
    }
    t.end_call();
    // 3. Agreement, then rank 0 gives up.
    int gathered[2] = {-1, -1};
    t.begin_call(std::chrono::seconds(10));
    t.all_gather(&me, gathered, sizeof(int));
    log += std::to_string(gathered[0]) + std::to_string(gathered[1]) + ";";
    if (me == 0) {
      t.notify_failure("rank 0 gives up");
    } else {
      ticket = t.post_recv(other, 0, buffer.data(), 16);
      attempt([&] { t.wait(ticket); });
      t.abandon(ticket, nullptr);
    }
    t.end_call();
    // 4. A clean exchange.
    t.begin_call(std::chrono::seconds(10));
    ticket = me == 0 ? t.post_send(other, 0, buffer.data(), 16)
                     : t.post_recv(other, 0, buffer.data(), 16);
    attempt([&] { t.wait(ticket); });
    log += std::to_string(buffer[0]) + ";";
    t.end_call();
  });
  EXPECT_EQ(outcome[0], "size;01;ok;1;");
  EXPECT_EQ(outcome[1], "size;timeout;01;peer 0;ok;1;");
  expect_clean_fake_runtime();
}

// The other head dims' kernels: bfloat16 at D = 96 and float at D = 128, P = 3 and 2.
TEST(RingCudaEmulated, RingOtherHeadDims) {
  DILATED_ATTENTION_REQUIRE_FIBERS();
  const dt::Case c96 = dt::ring_sweep_cases(96)[19], c128 = dt::ring_sweep_cases(128)[27];
  SCOPED_TRACE(dt::describe(c96) + " / " + dt::describe(c128));
  const auto in96 =
      dt::random_device_test_inputs<__nv_bfloat16>(c96.shape, c96.pad, c96.seq_pad, 600);
  dt::check_result(c96, in96, run_emulated_ring<__nv_bfloat16>(c96, in96, 3));
  const auto in128 = dt::random_device_test_inputs<float>(c128.shape, c128.pad, c128.seq_pad, 601);
  dt::check_result(c128, in128, run_emulated_ring<float>(c128, in128, 2));
}

// The protocol of ring::forward (ring/driver/agreement.hpp) holds for the device entry: a head_dim the
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
      ring::forward_on_device<float>(
          EmulatedDevice{}, config, bad, transport,
          {dt::shard_view(q.view(), begin), dt::shard_view(k.view(), begin),
           dt::shard_view(v.view(), begin)},
          {dt::shard_view(out.view(), begin), nullptr}, {});
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
        ring::forward_on_device<__half>(
            EmulatedDevice{}, config, shape, transport,
            {dt::shard_view(hq.view(), begin), dt::shard_view(hk.view(), begin),
             dt::shard_view(hv.view(), begin)},
            {dt::shard_view(hout.view(), begin), nullptr}, {});
      else
        ring::forward_on_device<__nv_bfloat16>(
            EmulatedDevice{}, config, shape, transport,
            {dt::shard_view(bq.view(), begin), dt::shard_view(bk.view(), begin),
             dt::shard_view(bv.view(), begin)},
            {dt::shard_view(bout.view(), begin), nullptr}, {});
    } catch (const std::exception& e) {
      messages[static_cast<std::size_t>(transport.rank())] = e.what();
    }
  });
  EXPECT_NE(messages[1].find("the storage type T"), std::string::npos) << messages[1];
  EXPECT_NE(messages[0].find("rank 1 refused"), std::string::npos) << messages[0];
}

// The asynchrony rule of ring::cuda calls, as the emulated device models it: a call synchronises
// its stream once per rank (at the end of the body, before the verdicts), enqueues finish() and
// returns without waiting; the back end's buffers are released stream-ordered -- poisoned, and
// freed only when the caller's stream drains. A kernel that read a buffer after its release
// (finish() after the back end went, say) would read the poison and fail the comparison.
TEST(RingCudaEmulated, CallReturnsWithoutWaitingAndReleasesStreamOrdered) {
  {  // the model itself
    int key = 0;
    const EmulatedDevice device{&key};
    auto* data = static_cast<unsigned char*>(device.allocate(16));
    device.release(data);
    EXPECT_EQ(data[0], 0xFF);  // still allocated, poisoned
    EXPECT_EQ(EmulatedDevice::pending_releases(&key), 1u);
    device.synchronize();
    EXPECT_EQ(EmulatedDevice::pending_releases(&key), 0u);
  }
  const da::Config config = da::testing::make_config({8, 16}, {1, 2});
  const da::Shape shape{1, 32, 2, 1, 32};
  auto q = dt::random_tensor<float>(shape, 2, 5), k = dt::random_tensor<float>(shape, 1, 6),
       v = dt::random_tensor<float>(shape, 1, 7);
  dt::Tensor<float> expected(shape, 2), out(shape, 2);
  da::reference::forward<float>(config, shape, {q.view(), k.view(), v.view()}, {expected.view()});
  int streams[2] = {0, 0};
  const std::int64_t before = EmulatedDevice::synchronizations();
  std::size_t pending[2] = {0, 0};
  ring::run_in_process(2, [&](ring::Transport& transport) {
    const int p = transport.rank();
    const std::int64_t begin = p * 16;
    ring::forward_on_device<float>(
        EmulatedDevice{&streams[p]}, config, shape, transport,
        {dt::shard_view(q.view(), begin), dt::shard_view(k.view(), begin),
         dt::shard_view(v.view(), begin)},
        {dt::shard_view(out.view(), begin)}, ring::CommonOptions{});
    pending[p] = EmulatedDevice::pending_releases(&streams[p]);
    EmulatedDevice{&streams[p]}.synchronize();  // the caller's wait for its outputs
  });
  EXPECT_EQ(EmulatedDevice::synchronizations() - before,
            2 + 2);  // one per call and rank, then ours
  EXPECT_GT(pending[0], 0u) << "the back end's buffers were freed before the stream drained";
  EXPECT_GT(pending[1], 0u);
  EXPECT_EQ(
      EmulatedDevice::pending_releases(&streams[0]) + EmulatedDevice::pending_releases(&streams[1]),
      0u);
  EXPECT_LT(da::testing::max_abs_diff(out, expected), 2e-6);
}

}  // namespace
