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

#include "peer_run_arguments.hpp"

#include <algorithm>
#include <cstdio>
#include <exception>
#include <string>
#include <utility>
#include <vector>

using namespace dilated_attention;
using namespace dilated_attention::benchmarks;

int main(int argc, char** argv) {
  try {
    const auto run = parse_peer_run(argc, argv, /*default_repeats=*/5);
    const Shape& shape = run.shape;
    const Config& config = run.config;
    const int repeats = run.repeats;
    const auto size = static_cast<std::size_t>(shape.batch * shape.seq_len * shape.num_heads * shape.head_dim);
    const std::vector<float> q = read_floats(run.input + "/q.f32", size);
    const std::vector<float> k = read_floats(run.input + "/k.f32", size);
    const std::vector<float> v = read_floats(run.input + "/v.f32", size);
    std::vector<float> out(size, 0.0f);
    std::vector<float> lse(static_cast<std::size_t>(shape.batch * shape.num_heads * shape.seq_len));

    // Wall time, and process CPU time of each call (see timed()).
    std::vector<double> seconds, cpu_seconds;
    for (int r = 0; r < repeats; ++r) {
      const auto time = timed([&] {
        forward<float>(config, shape,
                       {contiguous_view<const float>(q.data(), shape, shape.num_heads),
                        contiguous_view<const float>(k.data(), shape, shape.num_heads),
                        contiguous_view<const float>(v.data(), shape, shape.num_heads)},
                       {contiguous_view<float>(out.data(), shape, shape.num_heads), lse.data()});
      });
      seconds.push_back(time.first);
      cpu_seconds.push_back(time.second);
    }
    if (!run.output.empty()) write_floats(run.output, out);
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
