// The library's own C++ calls on raw files, for tests/torch/test_bitwise.py: the operators must
// return exactly these bits. Built with the same optimisation as the extension (-O3, see
// tests/torch/CMakeLists.txt) and no Torch.
//
//   torch_library_calls DIR float|double B N H HKV D w1,w2,.. r1,r2,.. causal(0|1)
//                       modular|blocked|partitioned softmax|mean
//
// DIR holds q.bin, k.bin, v.bin, d_out.bin (contiguous BNHD, the element type); writes out.bin,
// lse.bin ([B, H, N], float for float, double for double), d_q.bin, d_k.bin, d_v.bin.

#include <dilated_attention/dilated_attention.hpp>

#include <cstdio>
#include <exception>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace da = dilated_attention;

namespace {

std::vector<std::int64_t> parse_list(const std::string& text) {
  std::vector<std::int64_t> values;
  std::stringstream stream(text);
  for (std::string item; std::getline(stream, item, ',');) values.push_back(std::stoll(item));
  return values;
}

template <class T>
std::vector<T> read(const std::string& path, std::size_t count) {
  std::vector<T> data(count);
  std::ifstream file(path, std::ios::binary);
  if (!file.read(reinterpret_cast<char*>(data.data()),
                 static_cast<std::streamsize>(count * sizeof(T))))
    throw std::runtime_error("cannot read " + path);
  return data;
}

template <class T>
void write(const std::string& path, const std::vector<T>& data) {
  std::ofstream file(path, std::ios::binary);
  file.write(reinterpret_cast<const char*>(data.data()),
             static_cast<std::streamsize>(data.size() * sizeof(T)));
  if (!file) throw std::runtime_error("cannot write " + path);
}

template <class T>
void run(const std::string& dir, const da::Config& config, const da::Shape& shape) {
  const auto q_count =
      static_cast<std::size_t>(shape.batch * shape.seq_len * shape.num_heads * shape.head_dim);
  const auto kv_count =
      static_cast<std::size_t>(shape.batch * shape.seq_len * shape.num_kv_heads * shape.head_dim);
  const auto q = read<T>(dir + "/q.bin", q_count), k = read<T>(dir + "/k.bin", kv_count),
             v = read<T>(dir + "/v.bin", kv_count), d_out = read<T>(dir + "/d_out.bin", q_count);
  std::vector<T> out(q_count), d_q(q_count), d_k(kv_count), d_v(kv_count);
  std::vector<da::lse_type_t<T>> lse(
      static_cast<std::size_t>(shape.batch * shape.num_heads * shape.seq_len));
  const auto H = shape.num_heads, Hkv = shape.num_kv_heads;
  const da::Inputs<T> inputs{da::contiguous_view(q, shape, H), da::contiguous_view(k, shape, Hkv),
                             da::contiguous_view(v, shape, Hkv)};
  da::forward<T>(config, shape, inputs, {da::contiguous_view(out, shape, H), lse.data()});
  da::backward<T>(config, shape, inputs,
                  {da::contiguous_view(std::as_const(out), shape, H), lse.data()},
                  da::contiguous_view(d_out, shape, H),
                  {da::contiguous_view(d_q, shape, H), da::contiguous_view(d_k, shape, Hkv),
                   da::contiguous_view(d_v, shape, Hkv)});
  write(dir + "/out.bin", out);
  write(dir + "/lse.bin", lse);
  write(dir + "/d_q.bin", d_q);
  write(dir + "/d_k.bin", d_k);
  write(dir + "/d_v.bin", d_v);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc != 13) throw std::invalid_argument("usage: see tests/torch/library_calls.cpp");
    const std::string dir = argv[1], type = argv[2];
    const da::Shape shape{std::stoll(argv[3]), std::stoll(argv[4]), std::stoll(argv[5]),
                          std::stoll(argv[6]), std::stoll(argv[7])};
    da::Config config;
    config.segment_lengths = parse_list(argv[8]);
    config.dilation_rates = parse_list(argv[9]);
    config.causal = std::string(argv[10]) == "1";
    const std::string rule = argv[11], mixing = argv[12];
    config.offsets = rule == "modular"   ? da::OffsetRule::modular
                     : rule == "blocked" ? da::OffsetRule::blocked
                                         : da::OffsetRule::partitioned;
    config.mixing = mixing == "mean" ? da::Mixing::mean : da::Mixing::softmax;
    if (type == "float")
      run<float>(dir, config, shape);
    else if (type == "double")
      run<double>(dir, config, shape);
    else
      throw std::invalid_argument("type must be float or double");
  } catch (const std::exception& error) {
    std::fprintf(stderr, "torch_library_calls: %s\n", error.what());
    return 1;
  }
  return 0;
}
