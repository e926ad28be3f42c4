#pragma once
// Random (Config, Shape) pairs for property tests, biased towards the awkward cases: segment
// lengths that do not divide the sequence, rates that do not divide the segment, head counts
// that are multiples of neither the branch count nor the rates, short last segments.

#include <dilated_attention/config.hpp>

#include <algorithm>
#include <cstdint>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace dilated_attention::testing {

struct RandomConfigLimits {
  std::int64_t max_branches = 4;
  std::int64_t max_segment = 24;
  std::int64_t max_seq_len = 64;
  std::int64_t max_heads = 9;
  std::int64_t max_head_dim = 4;
  std::int64_t max_batch = 1;
};

struct Problem {
  Config config;
  Shape shape;
};

inline std::int64_t uniform(std::mt19937_64& engine, std::int64_t lo, std::int64_t hi) {
  return std::uniform_int_distribution<std::int64_t>(lo, hi)(engine);
}

// A valid problem for the given offset rule and causality. The rates are drawn so that most of
// them do not divide their segment length, and seq_len mostly is not a multiple of any w.
inline Problem random_problem(std::mt19937_64& engine, OffsetRule rule, bool causal,
                              const RandomConfigLimits& limits = {}) {
  Problem p;
  p.config.causal = causal;
  p.config.offsets = rule;
  const std::int64_t branches = uniform(engine, 1, limits.max_branches);
  for (std::int64_t i = 0; i < branches; ++i) {
    const std::int64_t w = uniform(engine, 1, limits.max_segment);
    std::int64_t r = uniform(engine, 1, w);
    // Prefer a rate that leaves a remainder: retry a few times.
    for (int attempt = 0; attempt < 3 && w % r == 0 && w > 2; ++attempt) r = uniform(engine, 1, w);
    p.config.segment_lengths.push_back(w);
    p.config.dilation_rates.push_back(r);
  }
  p.shape.batch = uniform(engine, 1, limits.max_batch);
  p.shape.seq_len = uniform(engine, 1, limits.max_seq_len);
  p.shape.head_dim = uniform(engine, 1, limits.max_head_dim);
  p.shape.num_heads = uniform(engine, rule == OffsetRule::partitioned ? branches : 1,
                              std::max(limits.max_heads, branches));
  // A divisor of num_heads for grouped-query attention; often num_heads itself.
  std::int64_t kv = p.shape.num_heads;
  if (uniform(engine, 0, 1) == 1) {
    kv = uniform(engine, 1, p.shape.num_heads);
    while (p.shape.num_heads % kv != 0) --kv;
  }
  p.shape.num_kv_heads = kv;
  return p;
}

// A one-line description for failure messages (SCOPED_TRACE).
inline std::string describe(const Config& config, const Shape& shape) {
  std::ostringstream out;
  out << "w = {";
  for (std::size_t i = 0; i < config.segment_lengths.size(); ++i)
    out << (i ? ", " : "") << config.segment_lengths[i];
  out << "}, r = {";
  for (std::size_t i = 0; i < config.dilation_rates.size(); ++i)
    out << (i ? ", " : "") << config.dilation_rates[i];
  out << "}, " << to_string(config.offsets) << ", " << to_string(config.mixing)
      << (config.causal ? ", causal" : ", not causal") << ", scale " << config.scale
      << "; shape [B " << shape.batch << ", N " << shape.seq_len << ", H " << shape.num_heads
      << ", Hkv " << shape.num_kv_heads << ", D " << shape.head_dim << "]";
  return out.str();
}
inline std::string describe(const Problem& p) { return describe(p.config, p.shape); }

// A hand-written config in one line: make_config({2048, 4096}, {1, 2}, /*causal=*/true).
inline Config make_config(std::vector<std::int64_t> w, std::vector<std::int64_t> r,
                          bool causal = false, OffsetRule offsets = OffsetRule::modular,
                          Mixing mixing = Mixing::softmax) {
  Config config;
  config.segment_lengths = std::move(w);
  config.dilation_rates = std::move(r);
  config.causal = causal;
  config.offsets = offsets;
  config.mixing = mixing;
  return config;
}

}  // namespace dilated_attention::testing
