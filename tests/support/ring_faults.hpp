#pragma once
// Fault scenarios shared by the in-process fault test (ring_faults_test.cpp) and the MPI test
// (ring_mpi_test.cpp): one rank gets a different causal flag, different segment lengths, a
// different head_dim, a null pointer, calls the other operation (forward instead of backward or
// the reverse), or throws mid-call; each rank records how its call -- a ring::forward or a
// ring::backward -- ended. After every scenario the same transport runs a consistent call, which
// must be exact.

#include <dilated_attention/dilated_attention.hpp>
#include <dilated_attention/ring.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "support/tensors.hpp"

namespace dilated_attention::testing {

enum class Fault {
  none,
  causal,
  segments,
  head_dim,
  null_q,
  null_lse,
  other_operation,
  throw_mid_forward,
  throw_at_first_post,
  throw_in_progress,
  throw_returning_gradients
};

// Which ring call the scenario makes.
enum class Call { forward, backward };

inline const char* fault_name(Fault fault) {
  switch (fault) {
    case Fault::none: return "none";
    case Fault::causal: return "causal";
    case Fault::segments: return "segments";
    case Fault::head_dim: return "head_dim";
    case Fault::null_q: return "null_q";
    case Fault::null_lse: return "null_lse";
    case Fault::other_operation: return "other_operation";
    case Fault::throw_mid_forward: return "throw_mid_forward";
    case Fault::throw_at_first_post: return "throw_at_first_post";
    case Fault::throw_in_progress: return "throw_in_progress";
    case Fault::throw_returning_gradients: return "throw_returning_gradients";
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
    case Fault::null_lse: return "lse";
    case Fault::other_operation: return "operation (0 forward, 1 backward) = ";
    default: return "";
  }
}

// Throws at the first wait() (an exception mid-forward, after this rank posted its exchanges),
// at the first post_recv (before it posted anything: the others' sends to it then have no
// receiver, and MPI cannot cancel a rendezvous send, so they are parked), or at the first
// progress() (inside the compute phase, while other compute threads of the rank are running).
// A backward can also throw when it sends its first dK/dV partials back (tag 1: after its
// gradient blocks ran, while its own partials are on their way to it).
class ThrowingTransport final : public ring::TransportAdapter {
 public:
  ThrowingTransport(ring::Transport& inner, bool in_wait, bool in_post, bool in_progress,
                    bool in_gradient_send = false)
      : TransportAdapter(inner),
        in_wait_(in_wait),
        in_post_(in_post),
        in_progress_(in_progress),
        in_gradient_send_(in_gradient_send) {}
  Ticket post_send(int peer, int tag, const void* data, std::size_t bytes) override {
    if (in_gradient_send_ && tag == 1) {
      in_gradient_send_ = false;
      throw std::runtime_error("injected failure returning gradients");
    }
    return TransportAdapter::post_send(peer, tag, data, bytes);
  }
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
  bool in_wait_, in_post_, in_progress_, in_gradient_send_;
};

struct Outcome {
  enum Kind { ok, invalid_argument, peer_failure, other } kind = ok;
  std::string message;
  int failed_rank = -1;
  double max_error = 0;  // ok only: against the single-device forward (or backward)
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
  // The backward's inputs and the single-device gradients.
  Tensor<double> d_out, d_q, d_k, d_v;
  std::vector<double> lse;
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
    lse.resize(static_cast<std::size_t>(shape.batch * shape.num_heads * shape.seq_len));
    forward<double>(config, shape, {q.view(), k.view(), v.view()}, {expected.view(), lse.data()});
    d_out = Tensor<double>(shape, shape.num_heads);
    d_out.fill_random(8);
    d_q = Tensor<double>(shape, shape.num_heads);
    d_k = Tensor<double>(shape, shape.num_kv_heads);
    d_v = Tensor<double>(shape, shape.num_kv_heads);
    backward<double>(config, shape, {q.view(), k.view(), v.view()}, {expected.view(), lse.data()},
                     d_out.view(), {d_q.view(), d_k.view(), d_v.view()});
  }
};

// One ring call (`call`) on `transport`; rank `faulty` carries `fault`.
inline Outcome run_fault_call(const FaultProblem& problem, ring::Transport& transport, Fault fault,
                              int faulty, const ring::Options& options = {},
                              Call call = Call::forward) {
  const int me = transport.rank();
  const bool mine = fault != Fault::none && me == faulty;
  Config config = problem.config;
  Shape shape = problem.shape;
  if (mine && fault == Fault::causal) config.causal = !config.causal;
  if (mine && fault == Fault::segments) config.segment_lengths = {6, 12};
  if (mine && fault == Fault::head_dim) shape.head_dim = 4;
  if (mine && fault == Fault::other_operation)
    call = call == Call::forward ? Call::backward : Call::forward;
  const std::int64_t length = shape.seq_len / transport.size(), begin = me * length;
  const auto shard = [&](auto view) {
    return decltype(view){view.data + begin * view.seq_stride, view.batch_stride, view.seq_stride,
                          view.head_stride};
  };
  // The outputs start at 7 everywhere: a failed call must leave them so.
  Tensor<double> out(problem.shape, problem.shape.num_heads),
      d_q(problem.shape, problem.shape.num_heads), d_k(problem.shape, problem.shape.num_kv_heads),
      d_v(problem.shape, problem.shape.num_kv_heads);
  for (Tensor<double>* t : {&out, &d_q, &d_k, &d_v}) t->fill(7.0);
  View<const double> q = shard(problem.q.view());
  if (mine && fault == Fault::null_q) q.data = nullptr;
  std::vector<double> lse(problem.lse.size() / static_cast<std::size_t>(transport.size()));
  for (std::int64_t bh = 0; bh < shape.batch * shape.num_heads; ++bh)
    for (std::int64_t x = 0; x < length; ++x)
      lse[static_cast<std::size_t>(bh * length + x)] =
          problem.lse[static_cast<std::size_t>(bh * problem.shape.seq_len + begin + x)];
  const double* lse_data = mine && fault == Fault::null_lse ? nullptr : lse.data();
  ThrowingTransport wrapped(transport, mine && fault == Fault::throw_mid_forward,
                            mine && fault == Fault::throw_at_first_post,
                            mine && fault == Fault::throw_in_progress,
                            mine && fault == Fault::throw_returning_gradients);
  Outcome outcome;
  // The largest difference over this rank's rows of `got` against `want`.
  const auto error = [&](const Tensor<double>& got, const Tensor<double>& want) {
    for (std::int64_t x = begin; x < begin + length; ++x)
      for (std::int64_t h = 0; h < got.heads; ++h)
        for (std::int64_t d = 0; d < shape.head_dim; ++d) {
          const double diff = std::fabs(got.at(0, x, h, d) - want.at(0, x, h, d));
          outcome.max_error = std::isnan(diff) ? INFINITY : std::fmax(outcome.max_error, diff);
        }
  };
  const auto start = std::chrono::steady_clock::now();
  try {
    if (call == Call::forward) {
      ring::forward<double>(config, shape, wrapped,
                            {q, shard(problem.k.view()), shard(problem.v.view())},
                            {shard(out.view()), nullptr}, options);
      error(out, problem.expected);
    } else {
      ring::backward<double>(
          config, shape, wrapped, {q, shard(problem.k.view()), shard(problem.v.view())},
          {shard(problem.expected.view()), lse_data}, shard(problem.d_out.view()),
          {shard(d_q.view()), shard(d_k.view()), shard(d_v.view())}, options);
      error(d_q, problem.d_q);
      error(d_k, problem.d_k);
      error(d_v, problem.d_v);
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
  if (outcome.kind != Outcome::ok)
    for (const Tensor<double>* t : {&out, &d_q, &d_k, &d_v})
      if (std::any_of(t->storage.begin(), t->storage.end(),
                      [](double value) { return value != 7.0; })) {
        outcome.message += " [output was written]";
        outcome.kind = Outcome::other;
        break;
      }
  return outcome;
}

// "" when the outcome is what rank `me` must see for `fault` on rank `faulty`; else why not.
inline std::string judge(const Outcome& outcome, Fault fault, int faulty, int me) {
  const auto has = [&](const std::string& text) {
    return outcome.message.find(text) != std::string::npos;
  };
  // A hang would last options.timeout (5 minutes); a call here takes well under a second alone,
  // up to ~10 s on an oversubscribed machine.
  if (outcome.seconds > 30) return "took " + std::to_string(outcome.seconds) + " s";
  if (fault == Fault::none) {
    if (outcome.kind != Outcome::ok) return std::string("raised: ") + outcome.message;
    return outcome.max_error <= 1e-12 ? "" : "max error " + std::to_string(outcome.max_error);
  }
  if (me == faulty) {
    if (fault == Fault::throw_mid_forward || fault == Fault::throw_at_first_post ||
        fault == Fault::throw_in_progress || fault == Fault::throw_returning_gradients)
      return outcome.kind == Outcome::other && has("injected")
                 ? ""
                 : "expected the injected error, got " + std::string(kind_name(outcome.kind)) +
                       ": " + outcome.message;
    return outcome.kind == Outcome::invalid_argument && has(fault_parameter(fault))
               ? ""
               : "expected invalid_argument naming " + std::string(fault_parameter(fault)) +
                     ", got " + kind_name(outcome.kind) + ": " + outcome.message;
  }
  if (outcome.kind != Outcome::peer_failure || outcome.failed_rank != faulty ||
      !has("rank " + std::to_string(faulty)))
    return "expected PeerFailure naming rank " + std::to_string(faulty) + ", got " +
           kind_name(outcome.kind) + ": " + outcome.message;
  return "";
}

}  // namespace dilated_attention::testing
