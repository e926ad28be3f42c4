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

#include "../raw_files.hpp"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using namespace dilated_attention;
using dilated_attention::benchmarks::parse_list;
using dilated_attention::benchmarks::read_floats;

void write_floats(const std::string& path, const std::vector<float>& data) {
  std::ofstream file(path, std::ios::binary);
  file.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size() * sizeof(float)));
  if (!file) throw std::runtime_error("cannot write " + path);
}

// Wall and process CPU seconds (all threads) of one call.
template <class Call>
std::pair<double, double> timed(const Call& call) {
  const std::clock_t cpu_start = std::clock();
  const auto start = std::chrono::steady_clock::now();
  call();
  return {std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(),
          static_cast<double>(std::clock() - cpu_start) / CLOCKS_PER_SEC};
}

}  // namespace

int main(int argc, char** argv) {
  try {
    std::string input, output;
    Shape shape{1, 0, 8, 8, 64};
    Config config;
    config.offsets = OffsetRule::partitioned;
    config.mixing = Mixing::mean;
    int repeats = 2;
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
    const std::vector<float> d_out = read_floats(input + "/d_out.f32", size);
    std::vector<float> out(size), dq(size), dk(size), dv(size);
    std::vector<float> lse(static_cast<std::size_t>(shape.batch * shape.num_heads * shape.seq_len));
    auto view = [&](const std::vector<float>& t) { return contiguous_view<const float>(t.data(), shape, shape.num_heads); };
    auto mutable_view = [&](std::vector<float>& t) { return contiguous_view<float>(t.data(), shape, shape.num_heads); };

    const auto forward_time = timed([&] {
      forward<float>(config, shape, view(q), view(k), view(v), mutable_view(out), lse.data());
    });
    std::vector<std::pair<double, double>> times;
    for (int r = 0; r < repeats; ++r)
      times.push_back(timed([&] {
        backward<float>(config, shape, view(q), view(k), view(v), view(out), lse.data(), view(d_out),
                        mutable_view(dq), mutable_view(dk), mutable_view(dv));
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
