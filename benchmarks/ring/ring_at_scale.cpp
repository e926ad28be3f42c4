// The ring at scale, on paper (docs/ring.md, "At scale, on paper"): for N = 2^20 tokens, LongNet's
// branches, P = 64 .. 1024, the bytes and messages every rank sends in one forward and in one
// backward, counted from
// the library's own schedule (make_step_plan, the plans the driver runs), with a latency-bandwidth
// time model for two networks, against a ring of whole shards (ring-flash-attn style) and
// LongNet's per-branch all-gather of dilated K/V. No transfer happens: this is a model.
//
// Usage: ring_at_scale [max_P]   (default 1024). Prints markdown tables.
//
// Problem: batch 1, 12 heads (MHA, LongNet-base), head_dim 64, 2-byte storage (bf16);
// branches w = 2048, 4096, 8192, 16384, 32768 with r = 1, 2, 4, 6, 12 (the LongNet paper's).
// Model: a rank's sends go out concurrently with its receives; time = messages x alpha +
// bytes / beta for the busiest rank; compute = 4 x head_dim flops per attended (query, key, head)
// at an assumed 400 TFLOP/s (the backward: 2.5 times that, five block products instead of two).
// Backward: the K/V rows go out as in the forward and the dK/dV partials of every received row
// come back in fp32 (ring/driver/backward.hpp); a whole-shard ring (ring-flash-attn) passes K/V (bf16)
// and dK/dV (fp32) round the ring; LongNet all-gathers the dilated K/V again and reduce-scatters
// their fp32 gradients.

#include <dilated_attention/pattern.hpp>
#include <dilated_attention/ring/driver/layout.hpp>
#include <dilated_attention/ring/driver/schedule.hpp>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace da = dilated_attention;
namespace ring = dilated_attention::ring;

namespace {

struct Network {
  const char* name;
  double alpha, beta;  // seconds per message, bytes per second
};

struct RankCost {
  double bytes = 0, messages = 0, flops = 0;   // K/V rows sent, their messages
  double received = 0, received_messages = 0;  // K/V rows received, their messages
};

constexpr std::int64_t model_heads = 12, head_dim_of_model = 64, element_bytes = 2,
                       gradient_element_bytes = 4;

RankCost rank_cost(const da::Config& config, const da::Shape& shape, std::int64_t num_ranks,
                   std::int64_t rank, ring::Layout layout) {
  const da::Pattern pattern(config, shape);
  RankCost cost;
  std::vector<bool> sends_to(static_cast<std::size_t>(num_ranks), false);
  std::vector<bool> receives_from(static_cast<std::size_t>(num_ranks), false);
  for (std::int64_t i = 0; i < pattern.num_branches(); ++i) {
    const da::BranchGeometry g = pattern.branch(i);
    for (std::int64_t t = 0; t < num_ranks; ++t) {
      if (!ring::step_has_work(
              {shape.seq_len, num_ranks, rank, g.w, g.r, 0, config.causal, t, layout}) &&
          !ring::step_has_work(
              {shape.seq_len, num_ranks, rank, g.w, g.r, g.r - 1, config.causal, t, layout}))
        continue;
      for (std::int64_t o = 0; o < g.r; ++o) {
        const std::int64_t heads = pattern.heads_with_offset(i, o).count;  // MHA: kv heads too
        if (heads == 0) continue;
        const ring::StepPlan plan = ring::make_step_plan(
            {shape.seq_len, num_ranks, rank, g.w, g.r, o, config.causal, t, layout});
        for (const da::Progression& unit : plan.send_rows)
          cost.bytes +=
              static_cast<double>(2 * unit.count * heads * head_dim_of_model * element_bytes);
        if (plan.sends()) sends_to[static_cast<std::size_t>(plan.send_peer)] = true;
        for (const da::Progression& unit : plan.recv_rows)
          cost.received +=
              static_cast<double>(2 * unit.count * heads * head_dim_of_model * element_bytes);
        if (plan.receives()) receives_from[static_cast<std::size_t>(plan.recv_peer)] = true;
        for (const ring::BlockPair& block : plan.blocks) {
          const double q = static_cast<double>(block.queries.count),
                       k = static_cast<double>(block.keys.count);
          const double pairs =
              config.causal && block.queries == block.keys ? q * (q + 1) / 2 : q * k;
          cost.flops += pairs * static_cast<double>(heads) * 4.0 * head_dim_of_model;
        }
      }
    }
  }
  for (const bool s : sends_to) cost.messages += s ? 1 : 0;  // one message per peer per forward
  for (const bool r : receives_from) cost.received_messages += r ? 1 : 0;
  return cost;
}

}  // namespace

int main(int argc, char** argv) {
  const std::int64_t max_ranks = argc > 1 ? std::atoll(argv[1]) : 1024;
  da::Config config;
  config.segment_lengths = {2048, 4096, 8192, 16384, 32768};
  config.dilation_rates = {1, 2, 4, 6, 12};
  const da::Shape shape{1, std::int64_t{1} << 20, model_heads, model_heads, head_dim_of_model};
  const Network networks[] = {{"100 Gb/s (12.5 GB/s, 5 us)", 5e-6, 12.5e9},
                              {"NVLink-class (450 GB/s, 3 us)", 3e-6, 450e9}};
  const double flops_per_second = 400e12;

  const double gradient_ratio =
      static_cast<double>(gradient_element_bytes) / static_cast<double>(element_bytes);
  for (const bool backward : {false, true})
    for (const bool causal : {false, true}) {
      config.causal = causal;
      std::printf("\n### %s %s, N = 2^20, 12 heads x 64, bf16%s\n\n",
                  causal ? "Causal" : "Non-causal", backward ? "backward" : "forward",
                  backward ? " (fp32 gradients)" : "");
      std::printf(
          "| P | layout | MiB sent, busiest rank (mean) | messages, busiest | whole-shard ring MiB "
          "/ msgs | "
          "LongNet all-gather MiB / msgs | compute, busiest | comm 100 Gb/s: ours / whole / "
          "all-gather | "
          "comm NVLink: ours / whole / all-gather |\n|---|---|---|---|---|---|---|---|---|\n");
      for (std::int64_t num_ranks = 64; num_ranks <= max_ranks; num_ranks *= 4) {
        const std::int64_t length = shape.seq_len / num_ranks;
        // Whole-shard ring: every other shard's K and V passes through every rank once (backward:
        // with its dK and dV, in a second message per step).
        double whole_bytes = static_cast<double>((num_ranks - 1) * 2 * length * model_heads *
                                                 head_dim_of_model * element_bytes);
        double whole_messages = static_cast<double>(num_ranks - 1);
        if (backward) {
          whole_bytes *= 1 + gradient_ratio;
          whole_messages *= 2;
        }
        // LongNet: per branch, an all-gather of the dilated K/V (L/r rows per head) within each
        // segment's group of w/L ranks (ring all-gather: group - 1 steps); no causal skipping.
        // Backward: the all-gather again and a reduce-scatter of the fp32 gradients.
        double gather_bytes = 0, gather_messages = 0;
        for (std::size_t i = 0; i < config.segment_lengths.size(); ++i) {
          const std::int64_t group = std::max<std::int64_t>(
              1, std::min(config.segment_lengths[i], shape.seq_len) / length);
          gather_bytes += static_cast<double>((group - 1) * 2 * model_heads * head_dim_of_model *
                                              element_bytes) *
                          static_cast<double>(length) /
                          static_cast<double>(config.dilation_rates[i]);
          gather_messages += static_cast<double>(group - 1);
        }
        if (backward) {
          gather_bytes *= 1 + gradient_ratio;
          gather_messages *= 2;
        }
        for (const ring::Layout layout : {ring::Layout::contiguous, ring::Layout::zigzag}) {
          RankCost busiest, total;
          double most_flops = 0;
          for (std::int64_t p = 0; p < num_ranks; ++p) {
            RankCost c = rank_cost(config, shape, num_ranks, p, layout);
            if (backward) {  // the partials of every received row go back to their owner
              c.bytes += c.received * gradient_ratio;
              c.messages += c.received_messages;
              c.flops *= 2.5;
            }
            busiest.bytes = std::max(busiest.bytes, c.bytes);
            busiest.messages = std::max(busiest.messages, c.messages);
            most_flops = std::max(most_flops, c.flops);
            total.bytes += c.bytes;
          }
          const auto time = [](double messages, double bytes, const Network& n) {
            return messages * n.alpha + bytes / n.beta;
          };
          std::printf("| %lld | %s | %.1f (%.1f) | %.0f | %.0f / %.0f | %.1f / %.0f | %.2f ms |",
                      static_cast<long long>(num_ranks), ring::to_string(layout),
                      busiest.bytes / 1048576.0,
                      total.bytes / static_cast<double>(num_ranks) / 1048576.0, busiest.messages,
                      whole_bytes / 1048576.0, whole_messages, gather_bytes / 1048576.0,
                      gather_messages, most_flops / flops_per_second * 1e3);
          for (const Network& n : networks)
            std::printf(" %.2f / %.1f / %.2f ms |", time(busiest.messages, busiest.bytes, n) * 1e3,
                        time(whole_messages, whole_bytes, n) * 1e3,
                        time(gather_messages, gather_bytes, n) * 1e3);
          std::printf("\n");
          std::fflush(stdout);
        }
      }
    }
  std::printf("\nNetworks: %s; %s. Compute at %.0f TFLOP/s.\n", networks[0].name, networks[1].name,
              flops_per_second / 1e12);
  return 0;
}
