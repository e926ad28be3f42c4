// The ring backward on a GPU: ring::cuda::backward (ring/cuda/backward.cuh) with the CUDA
// gradient back end over the loopback transport (ranks are host threads of one GPU, each with its
// own stream), P = 1..4 (zigzag up to 6), the configuration sweep of the ring tests, against the
// fp64 reference::backward, bitwise run to run. GPU cases skip with "no CUDA device: ..." where
// there is none; the argument case runs everywhere (refused before any CUDA call).

#include <gtest/gtest.h>

#include <dilated_attention/ring/cuda/backward.cuh>
#include <dilated_attention/ring/transport/loopback.cuh>
#include <dilated_attention/ring/transport/in_process.hpp>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "support/cuda_test_support.cuh"
#include "support/ring_cuda_cases.hpp"
#include "support/ring_cuda_device.cuh"
#include "support/ring_cuda_backward_cases.hpp"

namespace {

namespace da = dilated_attention;
namespace ring = dilated_attention::ring;
namespace dt = dilated_attention::testing;

bool use_deprecated_spelling = false;  // DeprecatedSpellingEqualsTheGroupedCall

using dt::device_options;
using dt::on_device;

// One rank: its local tensors to the device, the ring backward on its stream, the gradients back.
template <class T>
void rank_backward(const dt::GradientProblem<T>& p, const ring::Options& options,
                   ring::Transport& transport, void* stream, const dt::RankTensors<T>& in,
                   const std::vector<float>& lse, dt::RingGradientResult<T>& local) {
  dt::DeviceBuffer<T> q(in.q.storage.size()), k(in.k.storage.size()), v(in.v.storage.size()),
      out(in.out.storage.size()), d_out(in.d_out.storage.size()), d_q(local.d_q.storage.size()),
      d_k(local.d_k.storage.size()), d_v(local.d_v.storage.size());
  dt::DeviceBuffer<float> d_lse(lse.size());
  q.upload(in.q.storage);
  k.upload(in.k.storage);
  v.upload(in.v.storage);
  out.upload(in.out.storage);
  d_out.upload(in.d_out.storage);
  d_lse.upload(lse);
  d_q.upload(local.d_q.storage);  // the poison: every element must be written, padding never
  d_k.upload(local.d_k.storage);
  d_v.upload(local.d_v.storage);
  da::cuda::check(cudaStreamSynchronize(nullptr), "uploads");
  if (use_deprecated_spelling) {  // the 0.1 spelling: ring::Options, then the stream
#pragma nv_diag_suppress 1444
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
    ring::cuda::backward<T>(p.c.config, p.c.shape, transport, on_device(in.q, q.data()),
                            on_device(in.k, k.data()), on_device(in.v, v.data()),
                            on_device(in.out, out.data()), d_lse.data(),
                            on_device(in.d_out, d_out.data()), on_device(local.d_q, d_q.data()),
                            on_device(local.d_k, d_k.data()), on_device(local.d_v, d_v.data()),
                            options, static_cast<cudaStream_t>(stream));
#pragma GCC diagnostic pop
#pragma nv_diag_default 1444
  } else {
    ring::cuda::backward<T>(
        p.c.config, p.c.shape, transport,
        {on_device(in.q, q.data()), on_device(in.k, k.data()), on_device(in.v, v.data())},
        {on_device(in.out, out.data()), d_lse.data()}, on_device(in.d_out, d_out.data()),
        {on_device(local.d_q, d_q.data()), on_device(local.d_k, d_k.data()),
         on_device(local.d_v, d_v.data())},
        device_options(options, static_cast<cudaStream_t>(stream)));
  }
  da::cuda::check(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)),
                  "ring call");  // asynchronous: wait before reading
  d_q.download(local.d_q.storage);
  d_k.download(local.d_k.storage);
  d_v.download(local.d_v.storage);
}

template <class T>
dt::RingGradientResult<T> run_gpu_ring(const dt::GradientProblem<T>& p, int num_ranks,
                                       ring::Layout layout = ring::Layout::contiguous) {
  ring::Options options;
  options.layout = layout;
  options.timeout = std::chrono::seconds(60);
  return dt::run_ring_backward_case<T>(
      p, num_ranks, layout,
      [](int ranks, auto body) {
        ring::run_in_loopback(ranks, [&](ring::Transport& transport, cudaStream_t stream) {
          body(transport, static_cast<void*>(stream));
        });
      },
      [&](ring::Transport& transport, void* stream, const dt::RankTensors<T>& in,
          const std::vector<float>& lse, dt::RingGradientResult<T>& local) {
        rank_backward<T>(p, options, transport, stream, in, lse, local);
      });
}

template <class T>
void sweep(std::int64_t head_dim, std::uint64_t seed) {
  for (const dt::Case& c : dt::ring_sweep_cases(head_dim)) {
    SCOPED_TRACE(dt::describe(c));
    const dt::GradientProblem<T> p(c, seed++);
    for (int ranks = 1; ranks <= 4; ++ranks) {
      SCOPED_TRACE("P = " + std::to_string(ranks));
      dt::check_gradients(p, run_gpu_ring<T>(p, ranks));
    }
    for (const int ranks : {2, 3, 4, 6}) {
      SCOPED_TRACE("zigzag P = " + std::to_string(ranks));
      dt::check_gradients(p, run_gpu_ring<T>(p, ranks, ring::Layout::zigzag));
    }
    EXPECT_TRUE(dt::bitwise_equal(run_gpu_ring<T>(p, 3), run_gpu_ring<T>(p, 3)))
        << "not bitwise equal at P = 3";
  }
}

// A few cases that communicate (every rule, both mixings, causal, GQA, a padded layout) at P = 3
// and zigzag P = 2, each storage type: small enough for compute-sanitizer.
TEST(RingCudaBackward, SmallCasesEveryType) {
  DILATED_ATTENTION_REQUIRE_DEVICE();
  const auto run = [](auto tag, std::int64_t head_dim, std::uint64_t seed) {
    using T = decltype(tag);
    const std::vector<dt::Case> cases = dt::ring_sweep_cases(head_dim);
    for (const std::size_t i : {19u, 22u, 27u, 32u}) {
      SCOPED_TRACE(dt::describe(cases[i]));
      const dt::GradientProblem<T> p(cases[i], seed + i);
      dt::check_gradients(p, run_gpu_ring<T>(p, 3));
      dt::check_gradients(p, run_gpu_ring<T>(p, 2, ring::Layout::zigzag));
    }
  };
  run(float{}, 128, 70);
  run(__half{}, 64, 80);
  run(__nv_bfloat16{}, 96, 90);
}

TEST(RingCudaBackward, SweepFloat) {
  DILATED_ATTENTION_REQUIRE_DEVICE();
  sweep<float>(32, 10);
}
TEST(RingCudaBackward, SweepHalf) {
  DILATED_ATTENTION_REQUIRE_DEVICE();
  sweep<__half>(64, 20);
}
TEST(RingCudaBackward, SweepBfloat16) {
  DILATED_ATTENTION_REQUIRE_DEVICE();
  sweep<__nv_bfloat16>(96, 30);
}

// The CUDA tests' longer cases (N = 90..700: several 64-row tiles, many segments, GQA, padded
// layouts) at every P = 2..4 that divides N, bitwise run to run: float every case, the 16-bit
// types every third.
template <class T>
void longer_cases(std::int64_t head_dim, std::uint64_t seed, std::size_t start, std::size_t step) {
  const std::vector<dt::Case> cases = dt::correctness_cases(head_dim);
  for (std::size_t i = start; i < cases.size(); i += step) {
    const dt::GradientProblem<T> p(cases[i], seed++);
    for (int ranks = 2; ranks <= 4; ++ranks) {
      if (p.c.shape.seq_len % ranks != 0) continue;
      SCOPED_TRACE(dt::describe(p.c) + " P = " + std::to_string(ranks));
      const auto first = run_gpu_ring<T>(p, ranks);
      dt::check_gradients(p, first);
      EXPECT_TRUE(dt::bitwise_equal(first, run_gpu_ring<T>(p, ranks)))
          << "not bitwise equal run to run";
    }
  }
}

TEST(RingCudaBackward, LongerCasesFloat) {
  DILATED_ATTENTION_REQUIRE_DEVICE();
  longer_cases<float>(64, 40, 0, 1);
}
TEST(RingCudaBackward, LongerCasesHalf) {
  DILATED_ATTENTION_REQUIRE_DEVICE();
  longer_cases<__half>(64, 50, 0, 3);
}
TEST(RingCudaBackward, LongerCasesBfloat16) {
  DILATED_ATTENTION_REQUIRE_DEVICE();
  longer_cases<__nv_bfloat16>(96, 60, 1, 3);
}

// Faults on the loopback transport on real streams and events: rank 1 throws at its first
// enqueue_wait, rank 2 at its first post_recv, or rank 1 passes another causal flag. Every rank
// raises (the faulty one its own exception, the others PeerFailure naming it), no gradient is
// written, and a consistent call right after on the same transports is exact.
TEST(RingCudaBackward, LoopbackFaultsRaiseOnEveryRankAndTheNextCallIsExact) {
  DILATED_ATTENTION_REQUIRE_DEVICE();
  const dt::Case c{"faults", dt::make_config({16, 48}, {1, 2}), da::Shape{1, 48, 2, 2, 32}};
  const dt::GradientProblem<float> p(c, 77);
  ring::Options options;
  options.timeout = std::chrono::seconds(30);
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
          {
            dt::DeviceBuffer<float> q(in.q.storage.size()), k(in.k.storage.size()),
                v(in.v.storage.size()), out(in.out.storage.size()), d_out(in.d_out.storage.size()),
                d_q(local.d_q.storage.size()), d_k(local.d_k.storage.size()),
                d_v(local.d_v.storage.size()), d_lse(lse.size());
            q.upload(in.q.storage);
            k.upload(in.k.storage);
            v.upload(in.v.storage);
            out.upload(in.out.storage);
            d_out.upload(in.d_out.storage);
            d_lse.upload(lse);
            d_q.upload(local.d_q.storage);
            d_k.upload(local.d_k.storage);
            d_v.upload(local.d_v.storage);
            da::cuda::check(cudaStreamSynchronize(nullptr), "uploads");
            dt::FaultyTransport faulty(transport, scenario == 0 && rank == 1,
                                       scenario == 1 && rank == 2);
            da::Config config = c.config;
            config.causal = scenario == 2 && rank == 1;
            try {
              ring::cuda::backward<float>(
                  config, c.shape, faulty,
                  {on_device(in.q, q.data()), on_device(in.k, k.data()), on_device(in.v, v.data())},
                  {on_device(in.out, out.data()), d_lse.data()}, on_device(in.d_out, d_out.data()),
                  {on_device(local.d_q, d_q.data()), on_device(local.d_k, d_k.data()),
                   on_device(local.d_v, d_v.data())},
                  device_options(options, static_cast<cudaStream_t>(stream)));
              da::cuda::check(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)),
                              "ring call");  // asynchronous: wait before reading
              outcome[rank] = "returned";
            } catch (const ring::PeerFailure& e) {
              outcome[rank] = "PeerFailure from " + std::to_string(e.failed_rank());
            } catch (const std::exception& e) {
              outcome[rank] = e.what();
            }
            for (dt::DeviceBuffer<float>* g : {&d_q, &d_k, &d_v}) {
              std::vector<float> after;
              g->download(after);
              for (const float value : after) written[rank] += std::isnan(value) ? 0 : 1;
            }
          }
          rank_backward<float>(p, options, transport, stream, in, lse,
                               local);  // the consistent call
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
}

// Anywhere, no device needed: bad input is refused by the agreement before any CUDA call (the
// pointers are fake and would fault if touched), as std::invalid_argument naming the parameter.
TEST(RingCudaBackward, RejectsBadInputBeforeAnyDeviceWork) {
  const da::Config config = dt::make_config({8, 16}, {1, 2});
  const auto expect_refused = [&](const da::Shape& shape, const char* fragment, bool null_lse) {
    try {
      ring::run_in_process(2, [&](ring::Transport& transport) {
        da::Shape local = shape;
        local.seq_len /= 2;
        dt::FakeTensors<float> fake(local);
        const auto at = [](std::uintptr_t i) {  // after FakeTensors' five arrays, as far apart
          return reinterpret_cast<float*>(std::uintptr_t{1} << 32 | (std::uintptr_t{1} << 28) * i);
        };
        const da::View<const float> q = fake.q, k = fake.k, v = fake.v, out = fake.out;
        const da::View<const float> d_out = da::contiguous_view(at(5), local, local.num_heads);
        ring::cuda::backward<float>(config, shape, transport, {q, k, v},
                                    {out, null_lse ? nullptr : fake.lse}, d_out,
                                    {da::contiguous_view(at(6), local, local.num_heads),
                                     da::contiguous_view(at(7), local, local.num_kv_heads),
                                     da::contiguous_view(at(8), local, local.num_kv_heads)});
      });
      ADD_FAILURE() << "accepted; expected a refusal naming " << fragment;
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
    }
  };
  expect_refused(da::Shape{1, 32, 2, 2, 40}, "head_dim", false);
  expect_refused(da::Shape{1, 32, 2, 2, 64}, "lse", true);
  expect_refused(da::Shape{1, 31, 2, 2, 64}, "num_ranks", false);
}

// The deprecated positional spelling (ring::Options, a trailing stream; it still synchronises)
// gives bitwise what the grouped call gives.
TEST(RingCudaBackward, DeprecatedSpellingEqualsTheGroupedCall) {
  DILATED_ATTENTION_REQUIRE_DEVICE();
  const dt::GradientProblem<float> p(dt::ring_sweep_cases(64)[22], 321);
  const auto grouped = run_gpu_ring<float>(p, 3);
  use_deprecated_spelling = true;
  const auto positional = run_gpu_ring<float>(p, 3);
  use_deprecated_spelling = false;
  EXPECT_TRUE(dt::bitwise_equal(grouped, positional));
}

}  // namespace
