// The ring on a GPU: ring::cuda::forward (ring/cuda/forward.cuh) with the CUDA back end over the
// loopback transport (ring/transport/loopback.cuh: ranks are host threads of one GPU, each with its
// own stream), P = 1..4 (zigzag up to 6), the configuration sweep of ring_forward_test, against
// the single-GPU cuda::forward and the fp64 reference, bitwise run to run. GPU cases skip with
// "no CUDA device: ..." where there is none; the argument cases run everywhere (they are refused
// before any CUDA call, through the in-process transport).

#include <gtest/gtest.h>

#include <dilated_attention/ring/cuda/forward.cuh>
#include <dilated_attention/ring/transport/loopback.cuh>
#include <dilated_attention/ring/transport/in_process.hpp>

#include <chrono>
#include <cmath>
#include <stdexcept>
#include <utility>
#include <cstdint>
#include <string>
#include <vector>

#include "support/cuda_test_support.cuh"
#include "support/ring_cuda_cases.hpp"
#include "support/ring_cuda_device.cuh"

namespace {

namespace da = dilated_attention;
namespace ring = dilated_attention::ring;
namespace dt = dilated_attention::testing;

bool use_deprecated_spelling = false;  // DeprecatedSpellingEqualsTheGroupedCall

using dt::device_options;
using dt::on_device;

// One rank: its local tensors to the device, the ring forward on its stream, O and LSE back.
template <class T>
void rank_forward(const dt::Case& c, const ring::Options& options, ring::Transport& transport,
                  void* stream, const dt::Tensor<T>& q, const dt::Tensor<T>& k,
                  const dt::Tensor<T>& v, dt::Tensor<T>& out, std::vector<float>& lse) {
  dt::DeviceBuffer<T> dq(q.storage.size()), dk(k.storage.size()), dv(v.storage.size()),
      dout(out.storage.size());
  dt::DeviceBuffer<float> dlse(lse.size());
  dq.upload(q.storage);
  dk.upload(k.storage);
  dv.upload(v.storage);
  dout.upload(out.storage);  // the poison: every element must be written, padding never
  dlse.upload(lse);
  da::cuda::check(cudaStreamSynchronize(nullptr),
                  "uploads");     // pageable copies: make sure they landed
  if (use_deprecated_spelling) {  // the 0.1 spelling: ring::Options, then the stream
#pragma nv_diag_suppress 1444
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
    ring::cuda::forward<T>(c.config, c.shape, transport, on_device(q, dq.data()),
                           on_device(k, dk.data()), on_device(v, dv.data()),
                           on_device(out, dout.data()), dlse.data(), options,
                           static_cast<cudaStream_t>(stream));
#pragma GCC diagnostic pop
#pragma nv_diag_default 1444
  } else {
    ring::cuda::forward<T>(
        c.config, c.shape, transport,
        {on_device(q, dq.data()), on_device(k, dk.data()), on_device(v, dv.data())},
        {on_device(out, dout.data()), dlse.data()},
        device_options(options, static_cast<cudaStream_t>(stream)));
  }
  da::cuda::check(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)),
                  "ring call");  // asynchronous: wait before reading
  dout.download(out.storage);
  dlse.download(lse);
}

template <class T>
dt::KernelResult<T> run_gpu_ring(const dt::Case& c, const dt::DeviceTestInputs<T>& in,
                                 int num_ranks, ring::Layout layout = ring::Layout::contiguous) {
  ring::Options options;
  options.layout = layout;
  options.timeout = std::chrono::seconds(60);
  return dt::run_ring_case<T>(
      c, in, num_ranks, layout,
      [](int ranks, auto body) {
        ring::run_in_loopback(ranks, [&](ring::Transport& transport, cudaStream_t stream) {
          body(transport, static_cast<void*>(stream));
        });
      },
      [&](ring::Transport& transport, void* stream, const dt::Tensor<T>& q, const dt::Tensor<T>& k,
          const dt::Tensor<T>& v, dt::Tensor<T>& out, std::vector<float>& lse) {
        rank_forward<T>(c, options, transport, stream, q, k, v, out, lse);
      });
}

// Within docs/semantics.md "Guarantees" (item 10)'s bound of the fp64 reference (check_result), and close to the
// single-GPU kernel on the same inputs: float within 2e-5; 16-bit within twice the bound, since
// both are within the bound of the reference.
template <class T>
void check_ring(const dt::Case& c, const dt::DeviceTestInputs<T>& in,
                const dt::KernelResult<T>& ring_result, const dt::KernelResult<T>& single) {
  dt::check_result(c, in, ring_result);
  double bound = 2e-5;
  if (!std::is_same_v<T, float>) {
    const dt::Tensor<double> q = dt::widen(in.q), k = dt::widen(in.k), v = dt::widen(in.v);
    dt::Tensor<double> expected(c.shape, c.shape.num_heads);
    da::reference::forward<double>(c.config, c.shape, {q.view(), k.view(), v.view()},
                                   {expected.view()});
    dt::Tensor<T> naive(c.shape, c.shape.num_heads);
    std::vector<double> naive_lse;
    dt::naive_in_storage_type(c.config, c.shape, in.q, in.k, in.v, naive, naive_lse);
    bound = 2.0 * std::max(2.0 * dt::max_abs_diff(naive, expected), 1e-6);
  }
  EXPECT_LE(dt::max_abs_diff(ring_result.out, single.out), bound)
      << "ring vs single-GPU cuda::forward";
}

template <class T>
void sweep(std::int64_t head_dim, std::uint64_t seed) {
  for (const dt::Case& c : dt::ring_sweep_cases(head_dim)) {
    SCOPED_TRACE(dt::describe(c));
    const auto in = dt::random_device_test_inputs<T>(c.shape, c.pad, c.seq_pad, seed++);
    const auto single = dt::run_on_gpu(c.config, c.shape, in.q, in.k, in.v, c.pad, c.seq_pad);
    for (int p = 1; p <= 4; ++p) {
      SCOPED_TRACE("P = " + std::to_string(p));
      check_ring(c, in, run_gpu_ring<T>(c, in, p), single);
    }
    for (int p : {2, 3, 4, 6}) {
      SCOPED_TRACE("zigzag P = " + std::to_string(p));
      check_ring(c, in, run_gpu_ring<T>(c, in, p, ring::Layout::zigzag), single);
    }
    const auto first = run_gpu_ring<T>(c, in, 3), second = run_gpu_ring<T>(c, in, 3);
    EXPECT_TRUE(dt::bitwise_equal(first, second)) << "not bitwise equal run to run at P = 3";
  }
}

// A few cases that communicate (every rule, both mixings, causal, GQA, a padded layout) at P = 3
// and zigzag P = 2, each storage type: small enough for compute-sanitizer (the GPU check runs it
// under memcheck, racecheck and synccheck).
TEST(RingCudaForward, SmallCasesEveryType) {
  DILATED_ATTENTION_REQUIRE_DEVICE();
  const auto run = [](auto tag, std::int64_t head_dim, std::uint64_t seed) {
    using T = decltype(tag);
    const std::vector<dt::Case> cases = dt::ring_sweep_cases(head_dim);
    for (const std::size_t i :
         {19u, 22u, 27u, 32u}) {  // not_multiple / whole_and_beyond / repeated_branch
      const dt::Case& c = cases[i];
      SCOPED_TRACE(dt::describe(c));
      const auto in = dt::random_device_test_inputs<T>(c.shape, c.pad, c.seq_pad, seed + i);
      const auto single = dt::run_on_gpu(c.config, c.shape, in.q, in.k, in.v, c.pad, c.seq_pad);
      check_ring(c, in, run_gpu_ring<T>(c, in, 3), single);
      check_ring(c, in, run_gpu_ring<T>(c, in, 2, ring::Layout::zigzag), single);
    }
  };
  run(float{}, 128, 70);
  run(__half{}, 64, 80);
  run(__nv_bfloat16{}, 96, 90);
}

TEST(RingCudaForward, SweepFloat) {
  DILATED_ATTENTION_REQUIRE_DEVICE();
  sweep<float>(32, 10);
}
TEST(RingCudaForward, SweepHalf) {
  DILATED_ATTENTION_REQUIRE_DEVICE();
  sweep<__half>(64, 20);
}
TEST(RingCudaForward, SweepBfloat16) {
  DILATED_ATTENTION_REQUIRE_DEVICE();
  sweep<__nv_bfloat16>(96, 30);  // D = 128 with mean needs 117 KiB: not on every GPU
}

// The CUDA tests' longer cases (N = 90..700: several key tiles, many segments, the paper's
// branches, GQA, padded layouts) at every P = 2..4 that divides N: all of them in float, the
// 16-bit types half each (they run the same code but for the element type).
template <class T>
void longer_cases(std::int64_t head_dim, std::uint64_t seed, std::size_t start, std::size_t step) {
  const std::vector<dt::Case> cases = dt::correctness_cases(head_dim);
  for (std::size_t i = start; i < cases.size(); i += step) {
    const dt::Case& c = cases[i];
    const auto in = dt::random_device_test_inputs<T>(c.shape, c.pad, c.seq_pad, seed++);
    const auto single = dt::run_on_gpu(c.config, c.shape, in.q, in.k, in.v, c.pad, c.seq_pad);
    for (int p = 2; p <= 4; ++p) {
      if (c.shape.seq_len % p != 0) continue;
      SCOPED_TRACE(dt::describe(c) + " P = " + std::to_string(p));
      const auto first = run_gpu_ring<T>(c, in, p);
      check_ring(c, in, first, single);
      EXPECT_TRUE(dt::bitwise_equal(first, run_gpu_ring<T>(c, in, p)))
          << "not bitwise equal run to run";
    }
  }
}

TEST(RingCudaForward, LongerCasesFloat) {
  DILATED_ATTENTION_REQUIRE_DEVICE();
  longer_cases<float>(64, 40, 0, 1);
}
TEST(RingCudaForward, LongerCasesHalf) {
  DILATED_ATTENTION_REQUIRE_DEVICE();
  longer_cases<__half>(64, 50, 0, 2);  // the even cases
}
TEST(RingCudaForward, LongerCasesBfloat16) {
  DILATED_ATTENTION_REQUIRE_DEVICE();
  longer_cases<__nv_bfloat16>(96, 60, 1, 2);  // the odd ones
}

// Faults on the loopback transport (ring/transport/transport.hpp's contract): rank 1 throws at its first
// enqueue_wait (after every rank posted: its links are matched, so abandon parks them until
// their copies completed), rank 2 throws at its first post_recv (before it posted anything: the
// others' sends are withdrawn), or rank 1 passes a different causal flag (refused before anything
// moves). Every rank raises -- the faulty one its own exception, the others PeerFailure -- no
// output is written, and a consistent call right after on the same transports is exact.
TEST(RingCudaForward, LoopbackFaultsRaiseOnEveryRankAndTheNextCallIsExact) {
  DILATED_ATTENTION_REQUIRE_DEVICE();
  const dt::Case c{"faults", dt::make_config({16, 48}, {1, 2}), da::Shape{1, 48, 2, 2, 32}};
  const auto in = dt::random_device_test_inputs<float>(c.shape, 0, 0, 77);
  for (int scenario = 0; scenario < 3; ++scenario) {
    SCOPED_TRACE("scenario " + std::to_string(scenario));
    std::vector<std::string> outcome(3);
    std::vector<std::size_t> written(3, 0);
    ring::Options options;
    options.timeout = std::chrono::seconds(30);
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
          const int p = transport.rank();
          dt::DeviceBuffer<float> dq(q.storage.size()), dk(k.storage.size()), dv(v.storage.size()),
              dout(out.storage.size());
          dq.upload(q.storage);
          dk.upload(k.storage);
          dv.upload(v.storage);
          dout.upload(out.storage);
          da::cuda::check(cudaStreamSynchronize(nullptr), "uploads");
          dt::FaultyTransport faulty(transport, scenario == 0 && p == 1, scenario == 1 && p == 2);
          da::Config config = c.config;
          config.causal = scenario == 2 && p == 1;
          try {
            ring::cuda::forward<float>(
                config, c.shape, faulty,
                {on_device(q, dq.data()), on_device(k, dk.data()), on_device(v, dv.data())},
                {on_device(out, dout.data()), nullptr},
                device_options(options, static_cast<cudaStream_t>(stream)));
            da::cuda::check(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)),
                            "ring call");  // asynchronous: wait before reading
            outcome[static_cast<std::size_t>(p)] = "returned";
          } catch (const ring::PeerFailure& e) {
            outcome[static_cast<std::size_t>(p)] =
                "PeerFailure from " + std::to_string(e.failed_rank());
          } catch (const std::exception& e) {
            outcome[static_cast<std::size_t>(p)] = e.what();
          }
          std::vector<float> after;
          dout.download(after);
          for (const float value : after)
            written[static_cast<std::size_t>(p)] += std::isnan(value) ? 0 : 1;
          // The consistent call, on the same transport.
          rank_forward<float>(c, options, transport, stream, q, k, v, out, lse);
        });
    const int faulty_rank = scenario == 1 ? 2 : 1;
    const char* own = scenario == 0   ? "injected failure in enqueue_wait"
                      : scenario == 1 ? "injected failure in post_recv"
                                      : "config.causal";
    for (int p = 0; p < 3; ++p) {
      SCOPED_TRACE("rank " + std::to_string(p));
      if (p == faulty_rank)
        EXPECT_NE(outcome[static_cast<std::size_t>(p)].find(own), std::string::npos) << outcome[p];
      else
        EXPECT_EQ(outcome[static_cast<std::size_t>(p)],
                  "PeerFailure from " + std::to_string(faulty_rank));
      EXPECT_EQ(written[static_cast<std::size_t>(p)], 0u) << "a failed call wrote output";
    }
    dt::check_result(c, in, result);
  }
}

// Anywhere, no device needed: bad input is refused by the agreement before any CUDA call (the
// pointers are fake and would fault if touched), as std::invalid_argument naming the parameter.
TEST(RingCudaForward, RejectsBadInputBeforeAnyDeviceWork) {
  const da::Config config = dt::make_config({8, 16}, {1, 2});
  const auto expect_refused = [&](const da::Shape& shape, auto tamper, const char* fragment) {
    try {
      ring::run_in_process(2, [&](ring::Transport& transport) {
        da::Shape local = shape;
        local.seq_len /= 2;
        dt::FakeTensors<float> fake(local);
        tamper(fake);
        ring::cuda::forward<float>(config, shape, transport, {fake.q, fake.k, fake.v},
                                   {fake.out, fake.lse});
      });
      ADD_FAILURE() << "accepted; expected a refusal naming " << fragment;
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
    }
  };
  expect_refused(
      da::Shape{1, 32, 2, 2, 40}, [](auto&) {}, "head_dim");
  expect_refused(
      da::Shape{1, 32, 2, 2, 64}, [](auto& f) { f.k.data = nullptr; }, "k.data is null");
  expect_refused(
      da::Shape{1, 32, 2, 2, 64},
      [](auto& f) { f.q.data = reinterpret_cast<float*>(reinterpret_cast<char*>(f.q.data) + 2); },
      "q.data");
  expect_refused(
      da::Shape{1, 31, 2, 2, 64}, [](auto&) {}, "num_ranks");
}

// The deprecated positional spelling (ring::Options, a trailing stream; it still synchronises)
// gives bitwise what the grouped call gives.
TEST(RingCudaForward, DeprecatedSpellingEqualsTheGroupedCall) {
  DILATED_ATTENTION_REQUIRE_DEVICE();
  const dt::Case c = dt::ring_sweep_cases(64)[22];
  const auto in = dt::random_device_test_inputs<float>(c.shape, c.pad, c.seq_pad, 123);
  const auto grouped = run_gpu_ring<float>(c, in, 3);
  use_deprecated_spelling = true;
  const auto positional = run_gpu_ring<float>(c, in, 3);
  use_deprecated_spelling = false;
  EXPECT_TRUE(dt::bitwise_equal(grouped, positional));
}

}  // namespace
