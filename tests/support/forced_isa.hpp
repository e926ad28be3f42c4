#pragma once
// Test support for the CPU kernels' instruction-set paths: a fixture that runs a test once per
// path (skipping the ones this build or CPU cannot run), the names those runs get, the global
// environment that skips a whole run when DILATED_ATTENTION_CPU_ISA names an unrunnable path
// (CTest reruns the CPU test files per path), and a scoped setting of that variable.
// Test code only.

#include <dilated_attention/dilated_attention.hpp>

#include <gtest/gtest.h>

#include "support/random_config.hpp"

#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace dilated_attention::testing {

// When DILATED_ATTENTION_CPU_ISA names a path this machine cannot run, every test is skipped
// (CTest: <program>.isa.<name>, SKIP_REGULAR_EXPRESSION "isa-unsupported").
class ForcedIsaEnvironment : public ::testing::Environment {
 public:
  explicit ForcedIsaEnvironment(const char* program) : program_(program) {}
  void SetUp() override {
    const char* text = std::getenv("DILATED_ATTENTION_CPU_ISA");
    if (text == nullptr || *text == '\0') return;
    try {
      const CpuIsa isa = cpu::resolve_isa(CpuIsa::automatic);
      std::printf("%s: DILATED_ATTENTION_CPU_ISA=%s runs the %s kernels\n", program_, text, to_string(isa));
    } catch (const std::invalid_argument& error) {
      GTEST_SKIP() << "isa-unsupported: " << error.what();
    }
  }

 private:
  const char* program_;
};

inline std::string isa_name(const ::testing::TestParamInfo<CpuIsa>& param) { return to_string(param.param); }

// Every path, for INSTANTIATE_TEST_SUITE_P(Isa, <fixture>, every_isa(), isa_name).
inline auto every_isa() { return ::testing::Values(CpuIsa::generic, CpuIsa::avx2, CpuIsa::avx512, CpuIsa::neon); }

// A test run once per path: skipped where the path is not compiled in or the CPU lacks it;
// options(threads) forces the path.
class ForcedIsaTest : public ::testing::TestWithParam<CpuIsa> {
 protected:
  void SetUp() override {
    if (!cpu::isa_supported(GetParam()))
      GTEST_SKIP() << to_string(GetParam()) << " kernels: not compiled into this build or not supported by this CPU";
  }
  CpuOptions options(int threads = 0) const { return CpuOptions{threads, GetParam()}; }
};

// The awkward sweep each path is checked on: segments {7, 45, 301} with rates {3, 4, 7} (N is
// then a multiple of no w, r divides no w), every offset rule x both mixings x causal or not, head
// widths alternating 72 and 40 (no multiple of any vector or register tile).
// call(config, head_dim, case_index) once per case, case_index counting from 0.
template <class Call>
void for_each_awkward_case(const Call& call) {
  int cases = 0;
  for (OffsetRule rule : {OffsetRule::modular, OffsetRule::blocked, OffsetRule::partitioned})
    for (Mixing mixing : {Mixing::softmax, Mixing::mean})
      for (bool causal : {false, true}) {
        const Config config = make_config({7, 45, 301}, {3, 4, 7}, causal, rule, mixing);
        call(config, static_cast<std::int64_t>(cases % 2 ? 40 : 72), cases);
        ++cases;
      }
}

// call() with DILATED_ATTENTION_CPU_ISA set to `isa`, the variable restored (or unset) after.
template <class Call>
auto with_isa_variable(CpuIsa isa, const Call& call) {
  const char* saved = std::getenv("DILATED_ATTENTION_CPU_ISA");
  const std::string saved_value = saved ? saved : "";
  ::setenv("DILATED_ATTENTION_CPU_ISA", to_string(isa), 1);
  auto result = call();
  if (saved) ::setenv("DILATED_ATTENTION_CPU_ISA", saved_value.c_str(), 1);
  else ::unsetenv("DILATED_ATTENTION_CPU_ISA");
  return result;
}

}  // namespace dilated_attention::testing
