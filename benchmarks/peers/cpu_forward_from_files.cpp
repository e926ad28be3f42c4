// Our side of the peer comparison (benchmarks/peers/compare_dilated_attention_pytorch.py): reads
// q, k, v as raw little-endian float32 in the BNHD layout, runs dilated_attention::forward on
// them `--repeats` times, writes the output of the last run as raw float32 and prints one JSON
// line with the times. Nothing here knows about the peer; the script compares the files.
//
//   cpu_forward_from_files --input=DIR --output=FILE --batch=1 --seq_len=16384 --heads=8
//       --head_dim=64 --segments=2048,4096,8192 --dilations=1,2,4 --offsets=partitioned
//       --mixing=mean [--causal=false] [--repeats=5]
//
// DIR holds q.f32, k.f32 and v.f32 (num_kv_heads = heads).

#include <dilated_attention/dilated_attention.hpp>

#include "../raw_files.hpp"

#include <algorithm>
#include <chrono>
#include <ctime>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using namespace dilated_attention;

using dilated_attention::benchmarks::parse_list;
using dilated_attention::benchmarks::read_floats;

}  // namespace

int main(int argc, char** argv) {
  try {
    std::string input, output;
    Shape shape{1, 0, 8, 8, 64};
    Config config;
    config.offsets = OffsetRule::partitioned;
    config.mixing = Mixing::mean;
    int repeats = 5;
    for (int i = 1; i < argc; ++i) {
      const std::string arg = argv[i];
      const std::size_t eq = arg.find('=');
      if (arg.rfind("--", 0) != 0 || eq == std::string::npos)
        throw std::invalid_argument("unknown argument " + arg);
      const std::string key = arg.substr(2, eq - 2), value = arg.substr(eq + 1);
      if (key == "input") input = value;
      else if (key == "output") output = value;
      else if (key == "batch") shape.batch = std::stoll(value);
      else if (key == "seq_len") shape.seq_len = std::stoll(value);
      else if (key == "heads") shape.num_heads = shape.num_kv_heads = std::stoll(value);
      else if (key == "head_dim") shape.head_dim = std::stoll(value);
      else if (key == "segments") config.segment_lengths = parse_list(value);
      else if (key == "dilations") config.dilation_rates = parse_list(value);
      else if (key == "causal") config.causal = value == "true" || value == "1";
      else if (key == "repeats") repeats = std::max(1, std::stoi(value));
      else if (key == "offsets") {
        config.offsets = value == "modular" ? OffsetRule::modular
                         : value == "blocked" ? OffsetRule::blocked
                         : value == "partitioned" ? OffsetRule::partitioned
                         : throw std::invalid_argument("bad --offsets " + value);
      } else if (key == "mixing") {
        config.mixing = value == "softmax" ? Mixing::softmax
                        : value == "mean" ? Mixing::mean
                        : throw std::invalid_argument("bad --mixing " + value);
      } else throw std::invalid_argument("unknown argument " + arg);
    }
    validate(config, shape);
    const auto size = static_cast<std::size_t>(shape.batch * shape.seq_len * shape.num_heads * shape.head_dim);
    const std::vector<float> q = read_floats(input + "/q.f32", size);
    const std::vector<float> k = read_floats(input + "/k.f32", size);
    const std::vector<float> v = read_floats(input + "/v.f32", size);
    std::vector<float> out(size, 0.0f);
    std::vector<float> lse(static_cast<std::size_t>(shape.batch * shape.num_heads * shape.seq_len));

    // Wall time, and process CPU time (all threads; std::clock on Linux): on a shared machine
    // the CPU seconds of a call say what it costs better than its wall time does.
    std::vector<double> seconds, cpu_seconds;
    for (int r = 0; r < repeats; ++r) {
      const std::clock_t cpu_start = std::clock();
      const auto start = std::chrono::steady_clock::now();
      forward<float>(config, shape, contiguous_view<const float>(q.data(), shape, shape.num_heads),
                     contiguous_view<const float>(k.data(), shape, shape.num_heads),
                     contiguous_view<const float>(v.data(), shape, shape.num_heads),
                     contiguous_view<float>(out.data(), shape, shape.num_heads), lse.data());
      seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
      cpu_seconds.push_back(static_cast<double>(std::clock() - cpu_start) / CLOCKS_PER_SEC);
    }
    if (!output.empty()) {
      std::ofstream file(output, std::ios::binary);
      file.write(reinterpret_cast<const char*>(out.data()), static_cast<std::streamsize>(size * sizeof(float)));
      if (!file) throw std::runtime_error("cannot write " + output);
    }
    std::vector<double> sorted = seconds;
    std::sort(sorted.begin(), sorted.end());
    std::printf("{\"median_s\": %.6f, \"min_s\": %.6f, \"repeats\": %d, \"times_s\": [", sorted[sorted.size() / 2],
                sorted.front(), repeats);
    for (std::size_t i = 0; i < seconds.size(); ++i) std::printf("%s%.6f", i ? ", " : "", seconds[i]);
    std::printf("], \"cpu_times_s\": [");
    for (std::size_t i = 0; i < cpu_seconds.size(); ++i) std::printf("%s%.6f", i ? ", " : "", cpu_seconds[i]);
    std::printf("]}\n");
    return 0;
  } catch (const std::exception& error) {
    std::fprintf(stderr, "cpu_forward_from_files: %s\n", error.what());
    return 2;
  }
}
