// Our side of the GPU peer comparison (benchmarks/peers/cuda_sdpa_and_peer.py): reads q, k, v as
// raw little-endian float32 in the BNHD layout, converts them to the storage type, runs
// dilated_attention::cuda::forward `--repeats` times timed with CUDA events (after one warm-up),
// writes the output of the last run as raw float32 and prints one JSON line with the times.
//
//   cuda_forward_from_files --input=DIR --output=FILE --dtype=bf16|fp16|fp32 --batch=1
//       --seq_len=32768 --heads=12 --head_dim=64 --segments=2048,4096,8192 --dilations=1,2,4
//       --offsets=partitioned --mixing=mean [--causal=false] [--repeats=10]
//
// DIR holds q.f32, k.f32 and v.f32 (num_kv_heads = heads).

#include <dilated_attention/cuda.cuh>

#include "../peers/raw_files.hpp"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

namespace da = dilated_attention;

using dilated_attention::benchmarks::parse_list;
using dilated_attention::benchmarks::read_floats;

template <class T>
T* upload(const std::vector<float>& host) {
  std::vector<T> converted(host.size());
  for (std::size_t i = 0; i < host.size(); ++i) converted[i] = T(host[i]);
  T* device = nullptr;
  da::cuda::check(cudaMalloc(&device, converted.size() * sizeof(T)), "cudaMalloc");
  da::cuda::check(
      cudaMemcpy(device, converted.data(), converted.size() * sizeof(T), cudaMemcpyHostToDevice),
      "cudaMemcpy");
  return device;
}

template <class T>
int run(const std::map<std::string, std::string>& args, const da::Config& config,
        const da::Shape& shape) {
  const auto count =
      static_cast<std::size_t>(shape.batch * shape.seq_len * shape.num_heads * shape.head_dim);
  const std::string input = args.at("input");
  T* q = upload<T>(read_floats(input + "/q.f32", count));
  T* k = upload<T>(read_floats(input + "/k.f32", count));
  T* v = upload<T>(read_floats(input + "/v.f32", count));
  T* out = nullptr;
  da::cuda::check(cudaMalloc(&out, count * sizeof(T)), "cudaMalloc");
  const int repeats = args.count("repeats") ? std::stoi(args.at("repeats")) : 10;
  const auto view = [&](T* data) { return da::contiguous_view(data, shape, shape.num_heads); };
  cudaEvent_t start, stop;
  da::cuda::check(cudaEventCreate(&start), "cudaEventCreate");
  da::cuda::check(cudaEventCreate(&stop), "cudaEventCreate");
  std::vector<float> times;
  for (int i = -1; i < repeats; ++i) {  // i = -1: warm-up
    da::cuda::check(cudaEventRecord(start), "cudaEventRecord");
    da::cuda::forward<T>(config, shape, {view(q), view(k), view(v)}, {view(out)});
    da::cuda::check(cudaEventRecord(stop), "cudaEventRecord");
    da::cuda::check(cudaEventSynchronize(stop), "cudaEventSynchronize");
    float ms = 0.f;
    da::cuda::check(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
    if (i >= 0) times.push_back(ms);
  }
  std::vector<T> result(count);
  da::cuda::check(cudaMemcpy(result.data(), out, count * sizeof(T), cudaMemcpyDeviceToHost),
                  "cudaMemcpy");
  std::vector<float> widened(count);
  for (std::size_t i = 0; i < count; ++i) widened[i] = static_cast<float>(result[i]);
  std::ofstream file(args.at("output"), std::ios::binary);
  file.write(reinterpret_cast<const char*>(widened.data()),
             static_cast<std::streamsize>(count * sizeof(float)));
  std::vector<float> sorted = times;
  std::sort(sorted.begin(), sorted.end());
  cudaDeviceProp props{};
  da::cuda::check(cudaGetDeviceProperties(&props, 0), "cudaGetDeviceProperties");
  std::printf(
      "{\"implementation\": \"dilated_attention::cuda::forward\", \"device\": \"%s\", "
      "\"median_ms\": %.6f, \"useful_flops\": %.6e, \"times_ms\": [",
      props.name, sorted[sorted.size() / 2], da::Pattern(config, shape).useful_flops());
  for (std::size_t i = 0; i < times.size(); ++i) std::printf("%s%.6f", i ? ", " : "", times[i]);
  std::printf("]}\n");
  cudaFree(q), cudaFree(k), cudaFree(v), cudaFree(out);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    std::map<std::string, std::string> args;
    for (int i = 1; i < argc; ++i) {
      const std::string arg = argv[i];
      const auto eq = arg.find('=');
      if (arg.rfind("--", 0) != 0 || eq == std::string::npos)
        throw std::invalid_argument("arguments are --name=value, got " + arg);
      args[arg.substr(2, eq - 2)] = arg.substr(eq + 1);
    }
    da::Config config;
    config.segment_lengths = parse_list(args.at("segments"));
    config.dilation_rates = parse_list(args.at("dilations"));
    config.causal = args.count("causal") && args.at("causal") == "true";
    const std::string offsets = args.count("offsets") ? args.at("offsets") : "modular";
    config.offsets = offsets == "partitioned" ? da::OffsetRule::partitioned
                     : offsets == "blocked"   ? da::OffsetRule::blocked
                                              : da::OffsetRule::modular;
    config.mixing = args.count("mixing") && args.at("mixing") == "mean" ? da::Mixing::mean
                                                                        : da::Mixing::softmax;
    const std::int64_t heads = std::stoll(args.at("heads"));
    const da::Shape shape{std::stoll(args.at("batch")), std::stoll(args.at("seq_len")), heads,
                          heads, std::stoll(args.at("head_dim"))};
    const std::string dtype = args.count("dtype") ? args.at("dtype") : "bf16";
    if (dtype == "bf16") return run<__nv_bfloat16>(args, config, shape);
    if (dtype == "fp16") return run<__half>(args, config, shape);
    if (dtype == "fp32") return run<float>(args, config, shape);
    throw std::invalid_argument("--dtype must be bf16, fp16 or fp32");
  } catch (const std::exception& error) {
    std::fprintf(stderr, "cuda_forward_from_files: %s\n", error.what());
    return 1;
  }
}
