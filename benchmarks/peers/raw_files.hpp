#pragma once
// The file side of the peer comparisons: the Python harness writes inputs as raw float32 files
// and a comma-separated config; the C++ drivers (CPU and CUDA) read them with these helpers,
// so both sides reject a truncated or oversized file the same way.

#include <cstdint>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace dilated_attention::benchmarks {

// "2048,4096,8192" -> {2048, 4096, 8192}
inline std::vector<std::int64_t> parse_list(const std::string& text) {
  std::vector<std::int64_t> values;
  std::stringstream stream(text);
  std::string item;
  while (std::getline(stream, item, ',')) values.push_back(std::stoll(item));
  return values;
}

// Exactly `count` float32 values, or an exception that names the file.
inline std::vector<float> read_floats(const std::string& path, std::size_t count) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw std::runtime_error("cannot open " + path);
  std::vector<float> data(count);
  file.read(reinterpret_cast<char*>(data.data()),
            static_cast<std::streamsize>(count * sizeof(float)));
  if (file.gcount() != static_cast<std::streamsize>(count * sizeof(float)) || file.peek() != EOF)
    throw std::runtime_error(path + " does not hold exactly " + std::to_string(count) +
                             " float32 values");
  return data;
}

// All of `data` as raw float32, or an exception that names the file.
inline void write_floats(const std::string& path, const std::vector<float>& data) {
  std::ofstream file(path, std::ios::binary);
  file.write(reinterpret_cast<const char*>(data.data()),
             static_cast<std::streamsize>(data.size() * sizeof(float)));
  if (!file) throw std::runtime_error("cannot write " + path);
}

}  // namespace dilated_attention::benchmarks
