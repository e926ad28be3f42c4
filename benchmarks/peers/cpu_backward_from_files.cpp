// Our side of the backward peer comparison (benchmarks/peers/compare_backward_pytorch.py): reads
// q, k, v and d_out as raw little-endian float32 in the BNHD layout, runs dilated_attention::forward
// once (out, lse) and dilated_attention::backward `--repeats` times, writes the gradients of the
// last run (dq.f32, dk.f32, dv.f32 in the output folder) and prints one JSON line with the times
// of the forward and of each backward call. Nothing here knows about the peer.
//
//   cpu_backward_from_files --input=DIR --output=DIR --batch=1 --seq_len=16384 --heads=8
//       --head_dim=64 --segments=2048,4096,8192 --dilations=1,2,4 --offsets=partitioned
//       --mixing=mean [--causal=false] [--repeats=2]
//
// DIR holds q.f32, k.f32, v.f32 and d_out.f32 (num_kv_heads = heads).

#include <dilated_attention/dilated_attention.hpp>

#include "peer_run_arguments.hpp"

#include <cstdio>
#include <exception>
#include <string>
#include <utility>
#include <vector>

using namespace dilated_attention;
using namespace dilated_attention::benchmarks;

int main(int argc, char** argv) {
  try {
    const auto run = parse_peer_run(argc, argv, /*default_repeats=*/2);
    const std::string& input = run.input;
    const std::string& output = run.output;
    const Shape& shape = run.shape;
    const Config& config = run.config;
    const auto size = static_cast<std::size_t>(shape.batch * shape.seq_len * shape.num_heads * shape.head_dim);
    const std::vector<float> q = read_floats(input + "/q.f32", size);
    const std::vector<float> k = read_floats(input + "/k.f32", size);
    const std::vector<float> v = read_floats(input + "/v.f32", size);
    const std::vector<float> d_out = read_floats(input + "/d_out.f32", size);
    std::vector<float> out(size), dq(size), dk(size), dv(size);
    std::vector<float> lse(static_cast<std::size_t>(shape.batch * shape.num_heads * shape.seq_len));
    auto view = [&](const std::vector<float>& t) { return contiguous_view<const float>(t.data(), shape, shape.num_heads); };
    auto mutable_view = [&](std::vector<float>& t) { return contiguous_view<float>(t.data(), shape, shape.num_heads); };

    const auto forward_time = timed([&] {
      forward<float>(config, shape, {view(q), view(k), view(v)}, {mutable_view(out), lse.data()});
    });
    std::vector<std::pair<double, double>> times;
    for (int r = 0; r < run.repeats; ++r)
      times.push_back(timed([&] {
        backward<float>(config, shape, {view(q), view(k), view(v)}, {view(out), lse.data()},
                        view(d_out), {mutable_view(dq), mutable_view(dk), mutable_view(dv)});
      }));
    if (!output.empty()) {
      write_floats(output + "/dq.f32", dq);
      write_floats(output + "/dk.f32", dk);
      write_floats(output + "/dv.f32", dv);
    }
    std::printf("{\"forward_s\": %.6f, \"forward_cpu_s\": %.6f, \"times_s\": [", forward_time.first,
                forward_time.second);
    for (std::size_t i = 0; i < times.size(); ++i) std::printf("%s%.6f", i ? ", " : "", times[i].first);
    std::printf("], \"cpu_times_s\": [");
    for (std::size_t i = 0; i < times.size(); ++i) std::printf("%s%.6f", i ? ", " : "", times[i].second);
    std::printf("]}\n");
    return 0;
  } catch (const std::exception& error) {
    std::fprintf(stderr, "cpu_backward_from_files: %s\n", error.what());
    return 2;
  }
}
