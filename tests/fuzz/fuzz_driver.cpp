// A seeded random driver for tests/fuzz/fuzz_cpu.cpp, for builds without libFuzzer (g++, CI):
// replays every file of the corpus directories given, then feeds random inputs from a fixed seed
// to the same LLVMFuzzerTestOneInput until a count or a time limit is reached. Any failure
// aborts inside the target, after printing what went wrong; the input that caused it is written
// to fuzz-crash.bin in the working directory first, so that it can be replayed:
//   fuzz_driver [--seed=N] [--runs=N] [--seconds=S] [--max-len=N] [CORPUS_DIR_OR_FILE...]
// Defaults: seed 1, runs 1000, seconds 30, max-len 96.

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size);

namespace {

// The input being run, saved before each run so that a crash leaves it behind.
void run_one(const std::vector<std::uint8_t>& input, bool save) {
  if (save) {
    std::ofstream file("fuzz-crash.bin", std::ios::binary | std::ios::trunc);
    file.write(reinterpret_cast<const char*>(input.data()),
               static_cast<std::streamsize>(input.size()));
  }
  LLVMFuzzerTestOneInput(input.data(), input.size());
}

std::vector<std::uint8_t> read(const std::filesystem::path& path) {
  std::ifstream file(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>()};
}

}  // namespace

int main(int argc, char** argv) {
  std::uint64_t seed = 1;
  long runs = 1000, max_len = 96;
  double seconds = 30;
  std::vector<std::filesystem::path> corpus;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("--seed=", 0) == 0)
      seed = std::strtoull(arg.c_str() + 7, nullptr, 10);
    else if (arg.rfind("--runs=", 0) == 0)
      runs = std::strtol(arg.c_str() + 7, nullptr, 10);
    else if (arg.rfind("--seconds=", 0) == 0)
      seconds = std::strtod(arg.c_str() + 10, nullptr);
    else if (arg.rfind("--max-len=", 0) == 0)
      max_len = std::strtol(arg.c_str() + 10, nullptr, 10);
    else if (arg.rfind("--", 0) == 0) {
      std::fprintf(stderr, "fuzz_driver: unknown option %s\n", arg.c_str());
      return 2;
    } else
      corpus.emplace_back(arg);
  }
  const bool save = std::getenv("FUZZ_DRIVER_NO_SAVE") == nullptr;

  long replayed = 0;
  for (const auto& entry : corpus) {
    std::vector<std::filesystem::path> files;
    if (std::filesystem::is_directory(entry)) {
      for (const auto& file : std::filesystem::directory_iterator(entry))
        if (file.is_regular_file()) files.push_back(file.path());
    } else if (std::filesystem::exists(entry)) {
      files.push_back(entry);
    } else {
      std::fprintf(stderr, "fuzz_driver: %s does not exist\n", entry.string().c_str());
      return 2;
    }
    std::sort(files.begin(), files.end());
    for (const auto& file : files) {
      run_one(read(file), save);
      ++replayed;
    }
  }

  const auto start = std::chrono::steady_clock::now();
  std::mt19937_64 engine(seed);
  long generated = 0;
  for (; generated < runs; ++generated) {
    if (std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() > seconds)
      break;
    std::vector<std::uint8_t> input(
        static_cast<std::size_t>(engine() % static_cast<std::uint64_t>(max_len + 1)));
    for (auto& byte : input) byte = static_cast<std::uint8_t>(engine());
    run_one(input, save);
  }
  const double elapsed =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (save) std::remove("fuzz-crash.bin");
  std::printf(
      "fuzz_driver: %ld corpus inputs replayed, %ld random inputs (seed %llu) in %.1f s, no "
      "failure\n",
      replayed, generated, static_cast<unsigned long long>(seed), elapsed);
  return 0;
}
