#pragma once
// Fault scenarios shared by the in-process fault test (ring_faults_test.cpp) and the MPI test
// (ring_mpi_test.cpp): one rank gets a different causal flag, different segment lengths, a
// different head_dim, a null pointer, or an exception mid-forward; each rank records how its call
// ended. After every scenario the same transport runs a consistent call, which must be exact.

#include <dilated_attention/dilated_attention.hpp>
#include <dilated_attention/ring.hpp>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "support/tensors.hpp"

namespace dilated_attention::testing {

enum class Fault { none, causal, segments, head_dim, null_q, throw_mid_forward, throw_at_first_post, throw_in_progress };

inline const char* fault_name(Fault fault) {
  switch (fault) {
    case Fault::none: return "none";
    case Fault::causal: return "causal";
    case Fault::segments: return "segments";
    case Fault::head_dim: return "head_dim";
    case Fault::null_q: return "null_q";
    case Fault::throw_mid_forward: return "throw_mid_forward";
    case Fault::throw_at_first_post: return "throw_at_first_post";
    case Fault::throw_in_progress: return "throw_in_progress";
  }
  return "?";
}

// What the faulty rank's std::invalid_argument must name.
inline const char* fault_parameter(Fault fault) {
  switch (fault) {
    case Fault::causal: return "config.causal";
    case Fault::segments: return "config.segment_lengths";
    case Fault::head_dim: return "shape.head_dim";
    case Fault::null_q: return "q.data";
    default: return "";
  }
}

// Throws at the first wait() (an exception mid-forward, after this rank posted its exchanges),
// at the first post_recv (before it posted anything: the others' sends to it then have no
// receiver, and MPI cannot cancel a rendezvous send, so they are parked), or at the first
// progress() (inside the compute phase, while other compute threads of the rank are running).
class ThrowingTransport final : public ring::TransportAdapter {
 public:
  ThrowingTransport(ring::Transport& inner, bool in_wait, bool in_post, bool in_progress)
      : TransportAdapter(inner), in_wait_(in_wait), in_post_(in_post), in_progress_(in_progress) {}
  void progress() override {
    if (in_progress_) {
      in_progress_ = false;
      throw std::runtime_error("injected failure in progress");
    }
    TransportAdapter::progress();
  }
  void wait(Ticket ticket) override {
    if (in_wait_) {
      in_wait_ = false;
      throw std::runtime_error("injected failure in wait");
    }
    TransportAdapter::wait(ticket);
  }
  Ticket post_recv(int peer, int tag, void* data, std::size_t bytes) override {
    if (in_post_) {
      in_post_ = false;
      throw std::runtime_error("injected failure in post_recv");
    }
    return TransportAdapter::post_recv(peer, tag, data, bytes);
  }

 private:
  bool in_wait_, in_post_, in_progress_;
};

struct Outcome {
  enum Kind { ok, invalid_argument, peer_failure, other } kind = ok;
  std::string message;
  int failed_rank = -1;
  double max_error = 0;  // ok only: against the single-device forward
  double seconds = 0;
};

inline const char* kind_name(Outcome::Kind kind) {
  switch (kind) {
    case Outcome::ok: return "ok";
    case Outcome::invalid_argument: return "invalid_argument";
    case Outcome::peer_failure: return "PeerFailure";
    case Outcome::other: return "other";
  }
  return "?";
}

// The problem every scenario runs: one segment over the whole sequence (so every rank exchanges
// with every other), N = 24 (shards of 12, 8, 6 at P = 2, 3, 4) or 1200 (MHA, 150 KB per message at P = 2), GQA.
struct FaultProblem {
  Config config;
  Shape shape{1, 24, 4, 2, 8};
  Tensor<double> q, k, v, expected;
  // Large enough (big = true) that MPI moves the messages by rendezvous: those are the sends that
  // MPI cannot cancel once posted.
  explicit FaultProblem(bool big = false) {
    if (big) shape = {1, 1200, 1, 1, 16};
    config.segment_lengths = {6, shape.seq_len};
    config.dilation_rates = {1, 2};
    q = Tensor<double>(shape, shape.num_heads);
    k = Tensor<double>(shape, shape.num_kv_heads);
    v = Tensor<double>(shape, shape.num_kv_heads);
    expected = Tensor<double>(shape, shape.num_heads);
    q.fill_random(5);
    k.fill_random(6);
    v.fill_random(7);
    forward<double>(config, shape, q.view(), k.view(), v.view(), expected.view());
  }
};

// One ring call on `transport`; rank `faulty` carries `fault`.
inline Outcome run_fault_call(const FaultProblem& problem, ring::Transport& transport, Fault fault,
                              int faulty, const ring::Options& options = {}) {
  const int me = transport.rank();
  const bool mine = fault != Fault::none && me == faulty;
  Config config = problem.config;
  Shape shape = problem.shape;
  if (mine && fault == Fault::causal) config.causal = !config.causal;
  if (mine && fault == Fault::segments) config.segment_lengths = {6, 12};
  if (mine && fault == Fault::head_dim) shape.head_dim = 4;
  const std::int64_t length = shape.seq_len / transport.size(), begin = me * length;
  const auto shard = [&](View<const double> view) {
    return View<const double>{view.data + begin * view.seq_stride, view.batch_stride, view.seq_stride,
                              view.head_stride};
  };
  Tensor<double> out(problem.shape, shape.num_heads);
  out.fill(7.0);
  View<const double> q = shard(problem.q.view());
  if (mine && fault == Fault::null_q) q.data = nullptr;
  const View<double> out_view{out.storage.data() + begin * out.seq_stride, out.batch_stride,
                              out.seq_stride, out.head_stride};
  ThrowingTransport wrapped(transport, mine && fault == Fault::throw_mid_forward,
                            mine && fault == Fault::throw_at_first_post, mine && fault == Fault::throw_in_progress);
  Outcome outcome;
  const auto start = std::chrono::steady_clock::now();
  try {
    ring::forward<double>(config, shape, wrapped, q, shard(problem.k.view()), shard(problem.v.view()),
                          out_view, nullptr, options);
    for (std::int64_t x = begin; x < begin + length; ++x)
      for (std::int64_t h = 0; h < shape.num_heads; ++h)
        for (std::int64_t d = 0; d < shape.head_dim; ++d) {
          const double diff = std::fabs(out.at(0, x, h, d) - problem.expected.at(0, x, h, d));
          outcome.max_error = std::isnan(diff) ? INFINITY : std::fmax(outcome.max_error, diff);
        }
  } catch (const std::invalid_argument& e) {
    outcome.kind = Outcome::invalid_argument;
    outcome.message = e.what();
  } catch (const ring::PeerFailure& e) {
    outcome.kind = Outcome::peer_failure;
    outcome.message = e.what();
    outcome.failed_rank = e.failed_rank();
  } catch (const std::exception& e) {
    outcome.kind = Outcome::other;
    outcome.message = e.what();
  }
  outcome.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  // A failed call must not have touched the output.
  if (outcome.kind != Outcome::ok)
    for (double value : out.storage)
      if (value != 7.0) {
        outcome.message += " [output was written]";
        outcome.kind = Outcome::other;
        break;
      }
  return outcome;
}

// "" when the outcome is what rank `me` must see for `fault` on rank `faulty`; else why not.
inline std::string judge(const Outcome& outcome, Fault fault, int faulty, int me) {
  const auto has = [&](const std::string& text) { return outcome.message.find(text) != std::string::npos; };
  // A hang would last options.timeout (5 minutes); a call here takes well under a second alone,
  // up to ~10 s on an oversubscribed machine.
  if (outcome.seconds > 30) return "took " + std::to_string(outcome.seconds) + " s";
  if (fault == Fault::none) {
    if (outcome.kind != Outcome::ok) return std::string("raised: ") + outcome.message;
    return outcome.max_error <= 1e-12 ? "" : "max error " + std::to_string(outcome.max_error);
  }
  if (me == faulty) {
    if (fault == Fault::throw_mid_forward || fault == Fault::throw_at_first_post ||
        fault == Fault::throw_in_progress)
      return outcome.kind == Outcome::other && has("injected") ? "" : "expected the injected error, got " +
                 std::string(kind_name(outcome.kind)) + ": " + outcome.message;
    return outcome.kind == Outcome::invalid_argument && has(fault_parameter(fault))
               ? ""
               : "expected invalid_argument naming " + std::string(fault_parameter(fault)) + ", got " +
                     kind_name(outcome.kind) + ": " + outcome.message;
  }
  if (outcome.kind != Outcome::peer_failure || outcome.failed_rank != faulty ||
      !has("rank " + std::to_string(faulty)))
    return "expected PeerFailure naming rank " + std::to_string(faulty) + ", got " +
           kind_name(outcome.kind) + ": " + outcome.message;
  return "";
}

}  // namespace dilated_attention::testing
