#pragma once
// The command line both CPU peer drivers (benchmarks/peers/cpu_forward_from_files.cpp and
// cpu_backward_from_files.cpp) take, parsed in one place so the forward and the backward
// comparison describe a run the same way, plus the wall/CPU timer both report with.

#include <dilated_attention/dilated_attention.hpp>

#include "raw_files.hpp"

#include <algorithm>
#include <chrono>
#include <ctime>
#include <stdexcept>
#include <string>
#include <utility>

namespace dilated_attention::benchmarks {

// One run as the Python harness describes it: where the raw float32 files are, the shape
// (num_kv_heads = heads), the configuration and how many timed calls to make.
struct PeerRun {
  std::string input, output;
  Shape shape{1, 0, 8, 8, 64};
  Config config;
  int repeats = 1;
};

// --input=DIR --output=PATH --batch= --seq_len= --heads= --head_dim= --segments=a,b,c
// --dilations=a,b,c --offsets=modular|blocked|partitioned --mixing=softmax|mean --causal=
// --repeats= ; anything else is rejected. Offsets default to partitioned, mixing to mean.
inline PeerRun parse_peer_run(int argc, char** argv, int default_repeats) {
  PeerRun run;
  run.config.offsets = OffsetRule::partitioned;
  run.config.mixing = Mixing::mean;
  run.repeats = default_repeats;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const std::size_t eq = arg.find('=');
    if (arg.rfind("--", 0) != 0 || eq == std::string::npos)
      throw std::invalid_argument("unknown argument " + arg);
    const std::string key = arg.substr(2, eq - 2), value = arg.substr(eq + 1);
    if (key == "input")
      run.input = value;
    else if (key == "output")
      run.output = value;
    else if (key == "batch")
      run.shape.batch = std::stoll(value);
    else if (key == "seq_len")
      run.shape.seq_len = std::stoll(value);
    else if (key == "heads")
      run.shape.num_heads = run.shape.num_kv_heads = std::stoll(value);
    else if (key == "head_dim")
      run.shape.head_dim = std::stoll(value);
    else if (key == "segments")
      run.config.segment_lengths = parse_list(value);
    else if (key == "dilations")
      run.config.dilation_rates = parse_list(value);
    else if (key == "causal")
      run.config.causal = value == "true" || value == "1";
    else if (key == "repeats")
      run.repeats = std::max(1, std::stoi(value));
    else if (key == "offsets") {
      run.config.offsets = value == "modular"   ? OffsetRule::modular
                           : value == "blocked" ? OffsetRule::blocked
                           : value == "partitioned"
                               ? OffsetRule::partitioned
                               : throw std::invalid_argument("bad --offsets " + value);
    } else if (key == "mixing") {
      run.config.mixing = value == "softmax" ? Mixing::softmax
                          : value == "mean"  ? Mixing::mean
                                             : throw std::invalid_argument("bad --mixing " + value);
    } else
      throw std::invalid_argument("unknown argument " + arg);
  }
  validate(run.config, run.shape);
  return run;
}

// Wall seconds and process CPU seconds (all threads; std::clock on Linux) of one call: on a
// shared machine the CPU seconds of a call say what it costs better than its wall time does.
template <class Call>
std::pair<double, double> timed(const Call& call) {
  const std::clock_t cpu_start = std::clock();
  const auto start = std::chrono::steady_clock::now();
  call();
  return {std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(),
          static_cast<double>(std::clock() - cpu_start) / CLOCKS_PER_SEC};
}

}  // namespace dilated_attention::benchmarks
