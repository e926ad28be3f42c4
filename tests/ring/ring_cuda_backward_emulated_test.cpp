// The ring's CUDA gradient back end (ring/cuda/backward_backend.cuh) with its own kernels
// (ring/cuda/backward_kernels.cuh) run on the host, as tests/ring/ring_cuda_emulated_test.cpp runs the
// forward's: device memory is host memory, kernels run through tests/support/cuda_host_emulation.hpp
// (threads as fibers, warp collectives as barriers), ranks are threads of the in-process
// transport (or of the loopback CUDA transport over tests/support/fake_cuda_runtime.hpp). Checked: the
// back end's members block by block against the CPU gradient back end, and the whole ring
// backward (ring::backward_on_device) for P = 1..4 and zigzag against the fp64
// reference::backward, for float, half and bfloat16, every rule, both mixings, causal, GQA and
// padded views; bitwise equal run to run, between the host- and stream-ordered driver paths and
// over the loopback transport. What this cannot see -- real stream concurrency, races, speed --
// is for tests/ring/ring_cuda_backward_test.cu on a GPU.

#include <dilated_attention/reference.hpp>
#include <dilated_attention/ring.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <mutex>
#include <new>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <cuda_runtime.h>

#include "support/fake_cuda_runtime.hpp"  // the runtime calls of the loopback transport, on the host
#include "support/cuda_host_emulation.hpp"  // before the kernels: it defines the CUDA names they use

#include <dilated_attention/ring/cuda/backward_call.cuh>
#include <dilated_attention/ring/transport/loopback.cuh>

#include "support/ring_cuda_cases.hpp"
#include "support/ring_cuda_emulated_device.hpp"
#include "support/ring_cuda_backward_cases.hpp"
#include "support/ring_support.hpp"

namespace {

namespace da = dilated_attention;
namespace ring = dilated_attention::ring;
namespace dt = dilated_attention::testing;

using dt::EmulatedDevice;

template <class T>
using EmulatedBackwardBackend = ring::CudaBackwardBackend<T, EmulatedDevice>;

enum class Path { host_ordered, stream_ordered, loopback };

// The ring backward of `p` on P emulated ranks, over the in-process transport (host- or
// stream-ordered driver path) or the loopback transport.
template <class T>
dt::RingGradientResult<T> run_ring_forward(const dt::GradientProblem<T>& p, int num_ranks,
                                           ring::Layout layout = ring::Layout::contiguous,
                                           Path path = Path::host_ordered) {
  ring::Options options;
  options.layout = layout;
  const auto run_ranks = [&](int ranks, auto body) {
    if (path == Path::loopback) {
      ring::run_in_loopback(ranks, [&](ring::Transport& transport, cudaStream_t stream) {
        body(transport, static_cast<void*>(stream));
      });
    } else {
      ring::run_in_process(ranks, [&](ring::Transport& transport) { body(transport, nullptr); });
    }
  };
  return dt::run_ring_backward_case<T>(
      p, num_ranks, layout, run_ranks,
      [&](ring::Transport& transport, void* stream, const dt::RankTensors<T>& in,
          const std::vector<float>& lse, dt::RingGradientResult<T>& local) {
        dt::StreamOrderedAdapter ordered(transport);
        ring::Transport& used =
            path == Path::stream_ordered ? static_cast<ring::Transport&>(ordered) : transport;
        const ring::Stats stats = ring::backward_on_device<T>(
            EmulatedDevice{stream}, p.c.config, p.c.shape, used,
            {in.q.view(), in.k.view(), in.v.view()}, {in.out.view(), lse.data()}, in.d_out.view(),
            {local.d_q.view(), local.d_k.view(), local.d_v.view()}, options);
        if (path ==
            Path::stream_ordered) {  // K/V and partial sends ordered; every receive on the stream
          // once per exchange that moves anything (K/V out, partials back)
          EXPECT_GE(ordered.orderings, stats.sends_posted + stats.gradient_sends);
          EXPECT_LE(ordered.orderings, stats.sends_posted + stats.recvs_posted +
                                           stats.gradient_sends + stats.gradient_recvs);
          EXPECT_EQ(ordered.stream_waits, stats.recvs_posted + stats.gradient_recvs);
        }
      });
}

// The members block by block against the CPU gradient back end: local statistics (softmax) or
// block statistics merged per branch (mean), gradients of local blocks and of blocks on received
// (packed) keys into a partial buffer, two blocks on the same rows, a causal block where a row
// sees no key, the partials added back as a returned message, and the final cast.
TEST(RingCudaBackwardEmulated, MembersEqualCpuBackwardBackend) {
  DILATED_ATTENTION_REQUIRE_FIBERS();
  const da::Shape local{1, 16, 2, 1, 64};
  const std::vector<ring::Chunk> chunks = {{16, 32, 0}};  // rank 1 of 2, N = 32
  const auto q = dt::random_tensor<float>(local, 2, 11, 0, 2),
             k = dt::random_tensor<float>(local, 1, 12), v = dt::random_tensor<float>(local, 1, 13),
             out = dt::random_tensor<float>(local, 2, 14, 1),
             d_out = dt::random_tensor<float>(local, 2, 15);
  std::vector<float> lse(32);
  for (std::size_t e = 0; e < lse.size(); ++e) lse[e] = 2.f + 0.1f * static_cast<float>(e % 5);
  for (const bool causal : {false, true})
    for (const bool mean : {false, true}) {
      SCOPED_TRACE(std::string(causal ? "causal" : "full") + (mean ? " mean" : " softmax"));
      const std::int64_t branches = 3;
      ring::CpuBackwardBackend<float> cpu(local, chunks, q.view(), k.view(), v.view(), out.view(),
                                          lse.data(), d_out.view(), 0.3f, causal, branches, mean,
                                          /*recompute=*/mean, 1);
      EmulatedBackwardBackend<float> gpu(EmulatedDevice{}, local, chunks, q.view(), k.view(),
                                         v.view(), out.view(), lse.data(), d_out.view(), 0.3,
                                         causal, branches, mean);
      const da::Progression sent{16, 3, 5};  // "received" rows: each side packs its own
      auto cpu_message = cpu.make_buffer(2 * 5 * 64);
      auto gpu_message = gpu.make_buffer(2 * 5 * 64);
      cpu.pack(cpu_message, 0, 0, 0, sent);
      gpu.pack(gpu_message, 0, 0, 0, sent);
      gpu.flush_packs();
      auto cpu_partials = cpu.make_gradient_buffer(2 * 5 * 64);
      auto gpu_partials = gpu.make_gradient_buffer(2 * 5 * 64);
      struct Block {
        std::int64_t branch, head;
        da::Progression queries, keys;
        bool received;
      };
      const std::vector<Block> blocks = {
          {0, 0, {16, 1, 16}, {16, 1, 16}, false},  // dense local block
          {2, 0, {17, 2, 8}, {16, 3, 5}, true},     // received keys, same rows again
          {0, 1, {16, 2, 4}, {25, 2, 4}, false},    // causal: row 16 sees no key
          {1, 1, {16, 4, 4}, {16, 3, 5}, true},    {2, 1, {18, 2, 7}, {16, 1, 16}, false},
      };
      ring::CpuBackwardBackend<float>::Workspace cpu_ws(64, da::CpuIsa::automatic);
      const auto each_block = [&](auto&& visit) {
        gpu.for_each_kv_head(
            0, 1,
            [&](std::int64_t b, std::int64_t g, EmulatedBackwardBackend<float>::Workspace& ws) {
              for (std::int64_t h = 0; h < 2; ++h)
                for (const Block& block : blocks)
                  if (block.head == h) visit(ws, block, b, g);
            });
      };
      if (mean) {
        each_block([&](auto& ws, const Block& block, std::int64_t b, std::int64_t g) {
          gpu.statistics(ws, block.branch, b, block.head, g, block.queries, block.keys,
                         block.received ? &gpu_message : nullptr, 0);
          cpu.statistics(cpu_ws, block.branch, b, block.head, g, block.queries, block.keys,
                         block.received ? &cpu_message : nullptr, 0);
        });
      } else {
        gpu.local_statistics();
        cpu.local_statistics();
      }
      each_block([&](auto& ws, const Block& block, std::int64_t b, std::int64_t g) {
        gpu.gradient(ws, block.branch, b, block.head, g, block.queries, block.keys,
                     block.received ? &gpu_message : nullptr, 0, &gpu_partials);
        cpu.gradient(cpu_ws, block.branch, b, block.head, g, block.queries, block.keys,
                     block.received ? &cpu_message : nullptr, 0, &cpu_partials);
      });
      // The partials, bitwise-independent of the cast, against the CPU's.
      double partial_error = 0, partial_scale = 1;
      for (std::size_t e = 0; e < cpu_partials.size(); ++e) {
        partial_error =
            std::max(partial_error, double(std::abs(gpu_partials.data()[e] - cpu_partials[e])));
        partial_scale = std::max(partial_scale, double(std::abs(cpu_partials[e])));
      }
      EXPECT_LE(partial_error, 2e-5 * partial_scale);
      // The message returned to the owner (here: the same rank) is added to its rows.
      cpu.add_returned(cpu_partials, 0, 0, 0, sent);
      gpu.add_returned(gpu_partials, 0, 0, 0, sent);
      gpu.flush_returned();
      dt::Tensor<float> cpu_q(local, 2), cpu_k(local, 1), cpu_v(local, 1);
      dt::Tensor<float> gpu_q(local, 2, 1), gpu_k(local, 1, 0, 3), gpu_v(local, 1);
      for (dt::Tensor<float>* t : {&gpu_q, &gpu_k, &gpu_v})
        t->fill(std::numeric_limits<float>::quiet_NaN());
      cpu.finish(cpu_q.view(), cpu_k.view(), cpu_v.view());
      gpu.finish(gpu_q.view(), gpu_k.view(), gpu_v.view());
      double scale = 1;
      for (const dt::Tensor<float>* t : {&cpu_q, &cpu_k, &cpu_v})
        for (const float value : t->storage) scale = std::max(scale, double(std::abs(value)));
      EXPECT_LE(dt::max_abs_diff(gpu_q, cpu_q), 2e-5 * scale);
      EXPECT_LE(dt::max_abs_diff(gpu_k, cpu_k), 2e-5 * scale);
      EXPECT_LE(dt::max_abs_diff(gpu_v, cpu_v), 2e-5 * scale);
      EXPECT_GT(scale, 1.5);                 // the blocks produced gradients
      for (std::int64_t x = 0; x < 16; ++x)  // padding stays NaN
        EXPECT_TRUE(std::isnan(gpu_q.at(0, x, 1, 64)));
    }
}

// The whole ring backward, float: the 36 cases (every branch set, rule and mixing; causal, GQA
// and padding alternating), each at two consecutive P of 1..4 (so each mixing meets every P) and
// every other case in zigzag at P = 2 or 3, against the fp64 reference; every fourth case also
// bitwise equal between the host- and stream-ordered driver paths and run to run.
TEST(RingCudaBackwardEmulated, FloatEqualsReference) {
  DILATED_ATTENTION_REQUIRE_FIBERS();
  const auto cases = dt::ring_sweep_cases(32);
  for (std::size_t n = 0; n < cases.size(); ++n) {
    SCOPED_TRACE(dt::describe(cases[n]));
    const dt::GradientProblem<float> p(cases[n], 700 + n);
    for (const int ranks : {1 + static_cast<int>(n % 4), 1 + static_cast<int>((n + 1) % 4)}) {
      SCOPED_TRACE("P = " + std::to_string(ranks));
      dt::check_gradients(p, run_ring_forward(p, ranks));
    }
    if (n % 2 != 0) continue;
    const int ranks = 2 + static_cast<int>(n / 2 % 2);
    SCOPED_TRACE("zigzag P = " + std::to_string(ranks));
    const auto zigzag = run_ring_forward(p, ranks, ring::Layout::zigzag);
    dt::check_gradients(p, zigzag);
    if (n % 4 != 0) continue;
    EXPECT_TRUE(dt::bitwise_equal(
        zigzag, run_ring_forward(p, ranks, ring::Layout::zigzag, Path::stream_ordered)));
    EXPECT_TRUE(dt::bitwise_equal(zigzag, run_ring_forward(p, ranks, ring::Layout::zigzag)));
  }
}

// 16-bit storage, fp32 accumulation: every fifth case (both mixings) for half at P = 2..4 and
// bfloat16 in zigzag at P = 2..4.
TEST(RingCudaBackwardEmulated, HalfAndBfloat16) {
  DILATED_ATTENTION_REQUIRE_FIBERS();
  const auto cases = dt::ring_sweep_cases(64);
  for (std::size_t i = 0; i < cases.size(); i += 5) {
    SCOPED_TRACE(dt::describe(cases[i]));
    const dt::GradientProblem<__half> half(cases[i], 800 + i);
    dt::check_gradients(half, run_ring_forward(half, 2 + static_cast<int>(i % 3)));
    const dt::GradientProblem<__nv_bfloat16> bf16(cases[i], 900 + i);
    dt::check_gradients(bf16,
                        run_ring_forward(bf16, 4 - static_cast<int>(i % 3), ring::Layout::zigzag));
  }
}

// The loopback CUDA transport (real tickets, events and streams of the fake runtime): bitwise
// the in-process result; no event or stream leaks, no wait on an unrecorded event.
TEST(RingCudaBackwardEmulated, LoopbackEqualsInProcessBitwise) {
  DILATED_ATTENTION_REQUIRE_FIBERS();
  const auto cases = dt::ring_sweep_cases(32);
  for (std::size_t i = 1; i < cases.size(); i += 5) {
    SCOPED_TRACE(dt::describe(cases[i]));
    const dt::GradientProblem<float> p(cases[i], 1000 + i);
    const int ranks = 2 + static_cast<int>(i % 3);
    const auto loopback = run_ring_forward(p, ranks, ring::Layout::contiguous, Path::loopback);
    dt::check_gradients(p, loopback);
    EXPECT_TRUE(dt::bitwise_equal(loopback, run_ring_forward(p, ranks)));
  }
  EXPECT_EQ(fake_cuda::waits_on_unrecorded_events.load(), 0);
  EXPECT_EQ(fake_cuda::live_events.load(), 0);
  EXPECT_EQ(fake_cuda::live_streams.load(), 0);
}

// Faults over the loopback transport (ring/transport/transport.hpp's contract): rank 1 throws at its first
// enqueue_wait, rank 2 at its first post_recv, or rank 1 passes another causal flag (refused
// before anything moves). Every rank raises -- the faulty one its own exception, the others
// PeerFailure naming it --, no gradient is written, and a consistent call right after on the same
// transports is exact.
TEST(RingCudaBackwardEmulated, LoopbackFaultsRaiseOnEveryRankAndTheNextCallIsExact) {
  DILATED_ATTENTION_REQUIRE_FIBERS();
  const dt::Case c{"faults", dt::make_config({16, 48}, {1, 2}), da::Shape{1, 48, 2, 2, 32}};
  const dt::GradientProblem<float> p(c, 1200);
  for (int scenario = 0; scenario < 3; ++scenario) {
    SCOPED_TRACE("scenario " + std::to_string(scenario));
    std::vector<std::string> outcome(3);
    std::vector<std::size_t> written(3, 0);
    const auto result = dt::run_ring_backward_case<float>(
        p, 3, ring::Layout::contiguous,
        [](int ranks, auto body) {
          ring::run_in_loopback(ranks, [&](ring::Transport& transport, cudaStream_t stream) {
            body(transport, static_cast<void*>(stream));
          });
        },
        [&](ring::Transport& transport, void* stream, const dt::RankTensors<float>& in,
            const std::vector<float>& lse, dt::RingGradientResult<float>& local) {
          const auto rank = static_cast<std::size_t>(transport.rank());
          dt::FaultyTransport faulty(transport, scenario == 0 && rank == 1,
                                     scenario == 1 && rank == 2);
          da::Config config = c.config;
          config.causal = scenario == 2 && rank == 1;
          const auto call = [&](ring::Transport& used, const da::Config& cfg) {
            ring::backward_on_device<float>(
                EmulatedDevice{stream}, cfg, c.shape, used, {in.q.view(), in.k.view(), in.v.view()},
                {in.out.view(), lse.data()}, in.d_out.view(),
                {local.d_q.view(), local.d_k.view(), local.d_v.view()}, {});
          };
          try {
            call(faulty, config);
            outcome[rank] = "returned";
          } catch (const ring::PeerFailure& e) {
            outcome[rank] = "PeerFailure from " + std::to_string(e.failed_rank());
          } catch (const std::exception& e) {
            outcome[rank] = e.what();
          }
          for (const dt::Tensor<float>* g : {&local.d_q, &local.d_k, &local.d_v})
            for (const float value : g->storage) written[rank] += std::isnan(value) ? 0 : 1;
          call(transport, c.config);  // the consistent call, on the same transport
        });
    const std::size_t faulty_rank = scenario == 1 ? 2 : 1;
    const char* own = scenario == 0   ? "injected failure in enqueue_wait"
                      : scenario == 1 ? "injected failure in post_recv"
                                      : "config.causal";
    for (std::size_t rank = 0; rank < 3; ++rank) {
      SCOPED_TRACE("rank " + std::to_string(rank));
      if (rank == faulty_rank)
        EXPECT_NE(outcome[rank].find(own), std::string::npos) << outcome[rank];
      else
        EXPECT_EQ(outcome[rank], "PeerFailure from " + std::to_string(faulty_rank));
      EXPECT_EQ(written[rank], 0u) << "a failed call wrote gradients";
    }
    dt::check_gradients(p, result);
  }
  EXPECT_EQ(fake_cuda::waits_on_unrecorded_events.load(), 0);
  EXPECT_EQ(fake_cuda::live_events.load(), 0);
  EXPECT_EQ(fake_cuda::live_streams.load(), 0);
}

// The other head dims' kernels: bfloat16 at D = 96, float at D = 128.
TEST(RingCudaBackwardEmulated, OtherHeadDims) {
  DILATED_ATTENTION_REQUIRE_FIBERS();
  const dt::GradientProblem<__nv_bfloat16> p96(dt::ring_sweep_cases(96)[19], 1100);
  dt::check_gradients(p96, run_ring_forward(p96, 3));
  const dt::GradientProblem<float> p128(dt::ring_sweep_cases(128)[27], 1101);
  dt::check_gradients(p128, run_ring_forward(p128, 2));
}

// The protocol: a head_dim the back end does not support is std::invalid_argument naming it on
// every rank; a bad lse on one rank is refused there (naming lse) and PeerFailure elsewhere.
TEST(RingCudaBackwardEmulated, ValidationAndAgreement) {
  const da::Config config = dt::make_config({8}, {2});
  for (const std::int64_t dim : {40, 32}) {
    const da::Shape shape{1, 16, 2, 2, dim};
    dt::Tensor<float> q(shape, 2), k(shape, 2), v(shape, 2), out(shape, 2), d_out(shape, 2),
        d_q(shape, 2), d_k(shape, 2), d_v(shape, 2);
    std::vector<float> lse(32, 0.f);
    std::vector<std::string> messages(2);
    ring::run_in_process(2, [&](ring::Transport& transport) {
      const std::int64_t begin = transport.rank() * 8;
      const float* rank_lse =
          dim == 32 && transport.rank() == 1 ? nullptr : lse.data() + transport.rank() * 16;
      try {
        ring::backward_on_device<float>(
            EmulatedDevice{}, config, shape, transport,
            {dt::shard_view(q.view(), begin), dt::shard_view(k.view(), begin),
             dt::shard_view(v.view(), begin)},
            {dt::shard_view(out.view(), begin), rank_lse}, dt::shard_view(d_out.view(), begin),
            {dt::shard_view(d_q.view(), begin), dt::shard_view(d_k.view(), begin),
             dt::shard_view(d_v.view(), begin)},
            {});
      } catch (const std::exception& e) {
        messages[static_cast<std::size_t>(transport.rank())] = e.what();
      }
    });
    if (dim == 40) {
      for (const std::string& m : messages) EXPECT_NE(m.find("head_dim"), std::string::npos) << m;
    } else {
      EXPECT_NE(messages[1].find("lse"), std::string::npos) << messages[1];
      EXPECT_NE(messages[0].find("rank 1 refused"), std::string::npos) << messages[0];
    }
  }
}

}  // namespace
