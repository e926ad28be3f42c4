#pragma once
// What a ring call takes besides its tensors (Options) and what it reports (Stats), shared by
// ring::forward and ring::backward (docs/semantics.md "Entry points", docs/ring.md).

#include <chrono>
#include <cstdint>
#include <vector>

#include "../../config.hpp"
#include "../../cpu/threads.hpp"
#include "layout.hpp"
#include "pattern_cache.hpp"
#include "schedule.hpp"
#include "../transport/transport.hpp"

namespace dilated_attention::ring {

// The settings every ring call takes, whatever the device: what the driver
// (ring/driver/forward.hpp, ring/driver/backward.hpp) and the call protocol (ring/driver/call.hpp)
// read. Each entry point's options derive from it and add `device`, the options of the device's
// own calls: ring::Options (the CPU: CpuOptions) and ring::cuda::Options (ring/cuda/options.cuh:
// the stream).
struct CommonOptions {
  PatternCache* cache = nullptr;  // nullptr: default_pattern_cache()
  // The longest a rank blocks on one transfer or on the agreement before it raises
  // TransferTimeout (docs/ring.md, "Failures": what the other ranks see).
  Transport::Duration timeout = std::chrono::minutes(5);
  // Overlap. post_early: post every non-empty exchange before computing anything (false: one
  // step ahead, in step order, as the first version did). drive_progress: call the transport's
  // progress() between compute blocks. drive_progress only changes timing; post_early = false
  // also computes the steps in step order rather than nearest-first, which changes the order in
  // which partials merge (rounding only, still deterministic).
  bool post_early = true;
  bool drive_progress = true;
  // Which global rows this rank's views hold (ring/driver/layout.hpp). Every rank must pass the same.
  Layout layout = Layout::contiguous;
};

// The options of the CPU ring (ring::forward, ring::backward): the common settings and the CPU
// kernel's options for this rank's compute, with the single-device meaning of every field
// (device.num_threads = 0: DILATED_ATTENTION_NUM_THREADS, else the CPUs this process may use;
// negative: rejected; device.isa as CpuOptions::isa). The default is ONE thread per rank, not
// the single-device default of "all CPUs": the ranks of a ring are often threads of one process
// (InProcessWorld, or several MPI ranks per node), and P ranks each taking every CPU would
// oversubscribe the machine P times. Set device.num_threads to the CPUs one rank may use, or 0
// when a rank has the machine to itself.
//
// (Options::num_threads of 0.1 is gone: a second field for the same setting could disagree with
// device.num_threads; write options.device.num_threads.)
struct Options : CommonOptions {
  CpuOptions device{/*num_threads=*/1};
};

// What one rank did in one call; the tests check these against closed-form counts. The K/V
// fields count the rows that travel out (forward and backward alike); the gradient fields count
// the dK/dV partials that travel back in a backward (0 in a forward).
struct Stats {
  std::int64_t bytes_sent = 0, bytes_received = 0;  // K/V rows
  std::vector<std::int64_t> bytes_sent_per_branch;  // K/V rows, one entry per branch
  std::int64_t sends_posted = 0, recvs_posted = 0;  // K/V messages, over steps 1..P-1
  std::int64_t sends_skipped = 0, recvs_skipped = 0;
  std::int64_t gradient_bytes_sent = 0, gradient_bytes_received = 0;  // dK/dV partials
  std::int64_t gradient_sends = 0, gradient_recvs = 0;                // their messages
  std::int64_t blocks_computed = 0;  // block computations (a backward counts both of its passes)
  double wait_seconds = 0;           // time blocked in Transport::wait
  std::int64_t progress_calls = 0;   // Transport::progress() calls between blocks
};

// What every ring entry point checks before its tensors (docs/semantics.md "Bad input"): the partition,
// the layout, the config against the GLOBAL shape, and the options. Returns this rank's local
// shape (seq_len = N / P), against which the entry point then checks its views.
inline Shape validate_ring_call(const Config& config, const Shape& global,
                                const Transport& transport, const CommonOptions& options) {
  validate_partition(global.seq_len, transport.size(), transport.rank());
  validate_layout(options.layout, global.seq_len, transport.size());
  validate(config, global);
  if (options.timeout.count() <= 0)
    dilated_attention::detail::reject("options.timeout = ", options.timeout.count(),
                                      " ms: must be positive");
  Shape local = global;
  local.seq_len = global.seq_len / transport.size();
  return local;
}

}  // namespace dilated_attention::ring

namespace dilated_attention::ring::detail {

// The CPU ring's thread count: options.device.num_threads with the single-device meaning
// (0: the environment variable, else the CPUs this process may use); negative is rejected,
// naming the ring's field.
inline int resolve_ring_threads(const Options& options) {
  if (options.device.num_threads < 0)
    dilated_attention::detail::reject("options.device.num_threads = ", options.device.num_threads,
                                      ": must be positive, or 0 for the default");
  return cpu::resolve_num_threads(options.device);
}

}  // namespace dilated_attention::ring::detail
