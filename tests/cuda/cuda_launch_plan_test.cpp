// The CUDA launch plan, on the host: the work units and tiles that the kernels iterate cover
// exactly the blocks of the pattern, every query once, with exactly its keys, and no tile that
// holds no attended key. Plain C++ (no CUDA needed): launch_plan.hpp is host+device code, and the
// kernels call these very functions, so these tests check the kernels' own bounds.

#include <dilated_attention/cuda/launch_plan.hpp>
#include <dilated_attention/cuda/query_window.hpp>

#include <gtest/gtest.h>

#include "support/random_config.hpp"

#include <algorithm>
#include <map>
#include <set>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

namespace {

namespace da = dilated_attention;
namespace dc = dilated_attention::cuda;

struct PlanCase {
  da::Config config;
  da::Shape shape;
};

using da::testing::make_config;

std::vector<PlanCase> plan_cases() {
  using R = da::OffsetRule;
  std::vector<PlanCase> cases;
  for (bool causal : {false, true}) {
    cases.push_back({make_config({512}, {1}, causal, R::modular), {1, 200, 2, 2, 64}});
    cases.push_back({make_config({48}, {1}, causal, R::modular), {1, 150, 2, 1, 64}});
    cases.push_back({make_config({40}, {3}, causal, R::modular), {1, 130, 4, 4, 64}});
    cases.push_back({make_config({5, 13}, {2, 3}, causal, R::modular), {1, 90, 3, 3, 32}});
    cases.push_back(
        {make_config({20, 50, 120}, {1, 3, 7}, causal, R::modular), {2, 200, 5, 5, 96}});
    cases.push_back({make_config({16, 64}, {2, 4}, causal, R::blocked), {1, 160, 5, 5, 64}});
    cases.push_back(
        {make_config({32, 64, 128}, {1, 2, 4}, causal, R::partitioned), {1, 150, 5, 5, 128}});
    cases.push_back(
        {make_config({2048, 4096, 8192, 16384, 32768}, {1, 2, 4, 6, 12}, causal, R::modular),
         {1, 700, 12, 12, 64}});
    cases.push_back({make_config({7}, {7}, causal, R::blocked), {1, 1, 3, 3, 64}});
    cases.push_back({make_config({64, 64}, {2, 2}, causal, R::modular), {1, 129, 2, 2, 64}});
    // Strided windows (R > 1): lcm of the rates 2, 4 and 6.
    cases.push_back({make_config({256, 512}, {1, 2}, causal, R::modular), {1, 1000, 2, 2, 64}});
    cases.push_back({make_config({256, 512}, {2, 4}, causal, R::blocked), {1, 700, 3, 3, 64}});
    cases.push_back(
        {make_config({768, 1536}, {2, 3}, causal, R::partitioned), {2, 2000, 3, 3, 64}});
  }
  return cases;
}

// The plan of a case on fake, distinct addresses (the plan only records pointers).
dc::LaunchPlan plan_for(const da::Config& config, const da::Shape& shape) {
  auto at = [](int i) {
    return reinterpret_cast<float*>(std::uintptr_t{1} << 40 | std::uintptr_t(i) << 36);
  };
  return dc::make_launch_plan<float>(
      config, shape, da::contiguous_view<const float>(at(0), shape, shape.num_heads),
      da::contiguous_view<const float>(at(1), shape, shape.num_kv_heads),
      da::contiguous_view<const float>(at(2), shape, shape.num_kv_heads),
      da::contiguous_view(at(3), shape, shape.num_heads), nullptr, dc::KernelKind::tensor_core);
}

// The work of one (head, branch) over all stride-R windows, as the backward kernels enumerate it.
template <class Visit>
void for_each_work(const dc::ForwardParams& params, std::int64_t head, int branch, Visit&& visit) {
  const da::BranchGeometry geometry = params.branch(branch);
  const std::int64_t offset = params.offset(branch, head);
  if (offset < 0) return;
  for (std::int64_t window = 0; window < params.windows; ++window) {
    const da::Progression rows = dc::window_rows(params, window);
    if (rows.empty()) continue;
    const dc::SegmentRange segments = dc::segments_overlapping(geometry, rows);
    for (std::int64_t s = segments.first; s <= segments.last; ++s) {
      const dc::SegmentWork work = dc::segment_work(geometry, s, offset, params.causal, rows);
      if (!work.empty()) visit(window, rows, s, offset, work);
    }
  }
}

TEST(CudaLaunchPlan, WorkCoversEachBlockQueryOnceWithExactlyItsKeys) {
  for (const PlanCase& c : plan_cases()) {
    const da::Pattern pattern(c.config, c.shape);
    SCOPED_TRACE("N " + std::to_string(c.shape.seq_len) + " H " +
                 std::to_string(c.shape.num_heads) + " G " +
                 std::to_string(pattern.num_branches()) + (c.config.causal ? " causal" : ""));
    // (branch, head, segment, x) from the pattern's blocks ...
    std::set<std::tuple<std::int64_t, std::int64_t, std::int64_t, std::int64_t>> expected, seen;
    for (const da::Block& block : pattern.blocks())
      for (std::int64_t hi = 0; hi < block.heads.count; ++hi)
        for (std::int64_t j = 0; j < block.rows.count; ++j)
          expected.insert({block.branch, block.heads.at(hi), block.segment, block.rows.at(j)});
    // ... against the same from the work units, each exactly once.
    std::int64_t pairs = 0;
    const dc::LaunchPlan plan = plan_for(c.config, c.shape);
    // Every position belongs to exactly one window.
    std::vector<int> owners(static_cast<std::size_t>(c.shape.seq_len), 0);
    for (std::int64_t window = 0; window < plan.params.windows; ++window) {
      const da::Progression rows = dc::window_rows(plan.params, window);
      EXPECT_LE(rows.count, dc::block_window_rows);
      for (std::int64_t j = 0; j < rows.count; ++j) ++owners[static_cast<std::size_t>(rows.at(j))];
    }
    EXPECT_EQ(std::count(owners.begin(), owners.end(), 1), c.shape.seq_len);
    for (std::int64_t h = 0; h < c.shape.num_heads; ++h)
      for (int i = 0; i < static_cast<int>(pattern.num_branches()); ++i)
        for_each_work(
            plan.params, h, i,
            [&](std::int64_t, const da::Progression& rows, std::int64_t s, std::int64_t offset,
                const dc::SegmentWork& work) {
              EXPECT_EQ(work.keys, pattern.branch(i).rows(s, offset));
              std::int64_t widest = 0;
              for (std::int64_t q = 0; q < work.queries.count; ++q) {
                const std::int64_t x = work.queries.at(q);
                EXPECT_TRUE(rows.contains(x)) << "query " << x << " outside its window";
                EXPECT_TRUE(seen.insert({i, h, s, x}).second) << "query " << x << " twice";
                const std::int64_t limit = dc::key_limit(work.keys, x, c.config.causal);
                EXPECT_EQ(work.keys.prefix(limit), pattern.keys(i, h, x)) << "x " << x;
                EXPECT_LE(limit, work.key_count);
                widest = std::max(widest, limit);
                pairs += limit;
              }
              // Streamed keys are exactly those some query attends: no empty tile.
              EXPECT_EQ(work.key_count, widest);
              EXPECT_EQ(work.tiles(), (widest + dc::key_stage_rows - 1) / dc::key_stage_rows);
            });
    EXPECT_EQ(seen, expected);
    EXPECT_EQ(pairs * c.shape.batch, pattern.attended_pairs());
  }
}

// The work of one (head, branch) over all query windows, as the forward kernel enumerates it.
template <class Visit>
void for_each_query_work(const dc::ForwardParams& params, std::int64_t head, int branch,
                         Visit&& visit) {
  const da::BranchGeometry geometry = params.branch(branch);
  const std::int64_t offset = params.offset(branch, head);
  if (offset < 0) return;
  for (std::int64_t index = 0; index < params.windows; ++index) {
    const dc::QueryWindow window = dc::query_window(params, index);
    if (window.empty()) continue;
    const dc::SegmentRange segments = dc::segments_overlapping(geometry, window);
    for (std::int64_t s = segments.first; s <= segments.last; ++s) {
      const da::Progression keys = geometry.rows(s, offset);
      const dc::QueryWork work =
          dc::query_work(keys, dc::selected_rows(keys, window), window, params.causal);
      if (!work.empty()) visit(window, s, offset, work);
    }
  }
}

TEST(CudaLaunchPlan, QueryWindowsCoverEachPositionOnceWithinTheGrid) {
  for (const PlanCase& c : plan_cases()) {
    const dc::LaunchPlan plan = plan_for(c.config, c.shape);
    const dc::ForwardParams& p = plan.params;
    SCOPED_TRACE("N " + std::to_string(c.shape.seq_len) + " R " + std::to_string(p.row_stride));
    std::vector<int> owners(static_cast<std::size_t>(c.shape.seq_len), 0);
    std::int64_t non_empty = 0, last_non_empty = -1;
    for (std::int64_t index = 0; index < p.windows; ++index) {
      const dc::QueryWindow window = dc::query_window(p, index);
      EXPECT_LE(window.count, dc::block_window_rows);
      if (window.empty()) continue;
      ++non_empty;
      last_non_empty = index;
      EXPECT_EQ(window.residues, dc::window_residues(p.row_stride));
      for (int row = 0; row < window.count; ++row) {
        const std::int64_t x = window.position(row);
        ASSERT_GE(x, 0);
        ASSERT_LT(x, c.shape.seq_len);
        if (row > 0) {
          EXPECT_LT(window.position(row - 1), x) << "rows in position order";
        }
        ++owners[static_cast<std::size_t>(x)];
      }
    }
    EXPECT_EQ(std::count(owners.begin(), owners.end(), 1), c.shape.seq_len);
    // The query windows are the first query_window_count indices, within the shared grid.
    EXPECT_EQ(non_empty, dc::query_window_count(c.shape.seq_len, p.row_stride));
    EXPECT_EQ(last_non_empty + 1, non_empty);
    EXPECT_LE(non_empty, p.windows);
  }
  // The bound holds for every length and stride, not only the cases'.
  for (std::int64_t r : {1, 2, 3, 4, 6, 8, 12, 24, 60, 64})
    for (std::int64_t n = 1; n < 3000; n += 7) {
      const std::int64_t chunks =
          ((n + r - 1) / r + dc::block_window_rows - 1) / dc::block_window_rows;
      EXPECT_LE(dc::query_window_count(n, r), r * chunks) << "N " << n << " R " << r;
    }
}

TEST(CudaLaunchPlan, QueryWorkCoversEachBlockQueryOnceInFullSlices) {
  for (const PlanCase& c : plan_cases()) {
    const da::Pattern pattern(c.config, c.shape);
    SCOPED_TRACE("N " + std::to_string(c.shape.seq_len) + " H " +
                 std::to_string(c.shape.num_heads) + " G " +
                 std::to_string(pattern.num_branches()) + (c.config.causal ? " causal" : ""));
    std::set<std::tuple<std::int64_t, std::int64_t, std::int64_t, std::int64_t>> expected, seen;
    for (const da::Block& block : pattern.blocks())
      for (std::int64_t hi = 0; hi < block.heads.count; ++hi)
        for (std::int64_t j = 0; j < block.rows.count; ++j)
          expected.insert({block.branch, block.heads.at(hi), block.segment, block.rows.at(j)});
    const dc::LaunchPlan plan = plan_for(c.config, c.shape);
    const bool causal = c.config.causal;
    std::int64_t pairs = 0;
    for (std::int64_t h = 0; h < c.shape.num_heads; ++h)
      for (int i = 0; i < static_cast<int>(pattern.num_branches()); ++i)
        for_each_query_work(
            plan.params, h, i,
            [&](const dc::QueryWindow& window, std::int64_t s, std::int64_t offset,
                const dc::QueryWork& work) {
              EXPECT_EQ(work.keys, pattern.branch(i).rows(s, offset));
              std::int64_t widest = 0;
              for (int n = 0; n < work.queries; ++n) {
                const int row = dc::nth_set_bit(work.rows, n);
                ASSERT_LT(row, window.count);
                if (n > 0) {
                  EXPECT_LT(dc::nth_set_bit(work.rows, n - 1), row);
                }
                const std::int64_t x = window.position(row);
                EXPECT_TRUE(seen.insert({i, h, s, x}).second) << "query " << x << " twice";
                const std::int64_t limit = dc::key_limit(work.keys, x, causal);
                EXPECT_GT(limit, 0);
                EXPECT_EQ(dc::selected_key_limit(work.keys, x, causal), limit);
                EXPECT_EQ(work.keys.prefix(limit), pattern.keys(i, h, x)) << "x " << x;
                // A warp streams up to its slice's limit: never less than any of its rows needs.
                EXPECT_LE(limit, dc::slice_key_limit(work, window, n / dc::slice_rows, causal));
                widest = std::max(widest, limit);
                pairs += limit;
              }
              for (int slice = 0; slice < work.slices(); ++slice) {
                const std::int64_t slice_limit = dc::slice_key_limit(work, window, slice, causal);
                EXPECT_LE(slice_limit, work.key_count);
                // The limit is attained by a row of the slice (no key step beyond it).
                const int last = std::min(work.queries, (slice + 1) * dc::slice_rows) - 1;
                EXPECT_EQ(slice_limit,
                          dc::key_limit(work.keys,
                                        window.position(dc::nth_set_bit(work.rows, last)), causal));
              }
              EXPECT_EQ(dc::slice_key_limit(work, window, work.slices(), causal), 0);
              EXPECT_EQ(work.key_count, widest);  // no empty tile
              // With R = lcm of the rates a branch selects whole residue classes of the window, so
              // every slice but a window's cut-off end is full.
              if (window.count == dc::block_window_rows) {
                bool lcm = true;
                for (int b = 0; b < static_cast<int>(pattern.num_branches()); ++b)
                  lcm = lcm && plan.params.row_stride % pattern.branch(b).r == 0;
                const da::BranchGeometry g = pattern.branch(i);
                const bool inside = g.segment_of(window.position(0)) ==
                                    g.segment_of(window.position(window.count - 1));
                if (lcm && plan.params.row_stride > 1 && inside) {
                  EXPECT_EQ(work.queries % dc::slice_rows, 0) << "R " << plan.params.row_stride;
                }
              }
            });
    EXPECT_EQ(seen, expected);
    EXPECT_EQ(pairs * c.shape.batch, pattern.attended_pairs());
  }
}

TEST(CudaLaunchPlan, PackedRowsAndSliceKeySteps) {
  EXPECT_EQ(dc::popcount64(0), 0);
  EXPECT_EQ(dc::popcount64(~std::uint64_t{0}), 64);
  const std::uint64_t mask =
      (std::uint64_t{1} << 3) | (std::uint64_t{1} << 40) | (std::uint64_t{1} << 63);
  EXPECT_EQ(dc::nth_set_bit(mask, 0), 3);
  EXPECT_EQ(dc::nth_set_bit(mask, 1), 40);
  EXPECT_EQ(dc::nth_set_bit(mask, 2), 63);
  for (int n = 0; n < 64; ++n) EXPECT_EQ(dc::nth_set_bit(~std::uint64_t{0}, n), n);
  EXPECT_EQ(dc::slice_tile_keys(0, 0), 0);
  EXPECT_EQ(dc::slice_tile_keys(1, 0), 16);
  EXPECT_EQ(dc::slice_tile_keys(17, 0), 32);
  EXPECT_EQ(dc::slice_tile_keys(64, 0), 64);
  EXPECT_EQ(dc::slice_tile_keys(64, 1), 0);
  EXPECT_EQ(dc::slice_tile_keys(65, 1), 16);
  EXPECT_EQ(dc::slice_tile_keys(1000, 3), 64);
  // A rate past 2^31 (r <= w, w unbounded): the block's first row only, in 32-bit arithmetic too.
  const da::BranchGeometry huge{std::int64_t{1} << 40, (std::int64_t{1} << 32) + 5, 1000};
  const da::Progression lone = huge.rows(0, 7);
  ASSERT_EQ(lone.count, 1);
  dc::QueryWindow dense;
  dense.count = 64;
  dense.base = 0;
  for (int row = 0; row < 64; ++row) EXPECT_EQ(dc::selects(lone, dense, row), row == 7) << row;
  EXPECT_EQ(dc::selected_key_limit(lone, 7, true), 1);
  EXPECT_EQ(dc::selected_key_limit(lone, 7, false), 1);
  const da::Progression power{3, std::int64_t{1} << 32, 1};  // would truncate to a stride of 0
  EXPECT_TRUE(dc::selects(power, dense, 3));
  EXPECT_FALSE(dc::selects(power, dense, 4));
  EXPECT_EQ(dc::selected_key_limit(power, 3, true), 1);
  // R = 12 (the paper's rates): K = 4 residues, 16 rows each; R = 6: 2 residues; R = 3: 1.
  EXPECT_EQ(dc::window_residues(12), 4);
  EXPECT_EQ(dc::window_residues(6), 2);
  EXPECT_EQ(dc::window_residues(3), 1);
  EXPECT_EQ(dc::window_residues(1), 1);
  // A window of the paper's config: positions 192 c + 4 g + 12 j + k.
  const da::Config config = make_config({2048, 4096}, {4, 12});
  const dc::ForwardParams p = plan_for(config, {1, 5000, 2, 2, 64}).params;
  ASSERT_EQ(p.row_stride, 12);
  const dc::QueryWindow window = dc::query_window(p, 4);  // chunk 1, residues 4..7
  EXPECT_EQ(window.base, 192 + 4);
  EXPECT_EQ(window.count, 64);
  EXPECT_EQ(window.position(0), 196);
  EXPECT_EQ(window.position(5), 196 + 12 + 1);
  EXPECT_EQ(window.position(63), 196 + 12 * 15 + 3);
  // The rate-12 branch of head 1 (offset 1... positions 12 m + 1) selects nothing in residues
  // 4..7 of segment 0; head 0 of the rate-4 branch selects residue 4 (or 8): 16 rows.
  const da::BranchGeometry rate4 = p.branch(0), rate12 = p.branch(1);
  EXPECT_EQ(dc::popcount64(dc::selected_rows(rate12.rows(0, 1), window)), 0);
  EXPECT_EQ(dc::popcount64(dc::selected_rows(rate12.rows(0, 5), window)), 16);
  EXPECT_EQ(dc::popcount64(dc::selected_rows(rate4.rows(0, 0), window)), 16);
  // The end of the sequence cuts a window inside its residues.
  const dc::ForwardParams q = plan_for(config, {1, 12 * 16 + 6, 2, 2, 64}).params;
  EXPECT_EQ(dc::query_window(q, 3).count, 4);  // 192..195
  EXPECT_EQ(dc::query_window(q, 4).count, 2);  // 196, 197
  EXPECT_EQ(dc::query_window(q, 5).count, 0);
}

TEST(CudaLaunchPlan, WindowStrideIsTheLcmOfTheRatesWhenAWindowFitsASegment) {
  using R = da::OffsetRule;
  EXPECT_EQ(dc::choose_row_stride(make_config({2048, 4096, 8192}, {1, 2, 4}, false, R::modular)),
            4);
  EXPECT_EQ(dc::choose_row_stride(
                make_config({2048, 4096, 8192, 16384, 32768}, {1, 2, 4, 6, 12}, false, R::modular)),
            12);
  EXPECT_EQ(dc::choose_row_stride(make_config({4096}, {1}, false, R::modular)), 1);
  EXPECT_EQ(dc::choose_row_stride(make_config({40}, {3}, false, R::modular)), 1);   // 64*3 > 40
  EXPECT_EQ(dc::choose_row_stride(make_config({192}, {3}, false, R::modular)), 3);  // 64*3 = 192
  EXPECT_EQ(dc::choose_row_stride(make_config({1 << 20, 1 << 20}, {65, 2}, false, R::modular)), 1);
  // With R = lcm, every query tile is full use: each window's queries in a segment are all of
  // its rows there, or none (no masked rows for any branch).
  const da::Config config = make_config({1024, 2048}, {2, 4}, true, R::blocked);
  const da::Shape shape{1, 3000, 6, 3, 64};
  const dc::LaunchPlan plan = plan_for(config, shape);
  ASSERT_EQ(plan.params.row_stride, 4);
  for (std::int64_t h = 0; h < shape.num_heads; ++h)
    for (int i = 0; i < 2; ++i)
      for_each_work(
          plan.params, h, i,
          [&](std::int64_t, const da::Progression& rows, std::int64_t s, std::int64_t,
              const dc::SegmentWork& work) {
            const da::BranchGeometry g = plan.params.branch(i);
            EXPECT_EQ(work.queries,
                      rows.within(g.segment_begin(s), g.segment_begin(s) + g.segment_length(s)));
          });
}

TEST(CudaLaunchPlan, RowsOutsideABlockAttendNothing) {
  const da::BranchGeometry geometry{40, 3, 130};
  const da::Progression keys = geometry.rows(1, 2);  // positions 42, 45, ..., 78
  EXPECT_EQ(dc::key_limit(keys, 41, false), 0);
  EXPECT_EQ(dc::key_limit(keys, 43, true), 0);
  EXPECT_EQ(dc::key_limit(keys, 42, true), 1);
  EXPECT_EQ(dc::key_limit(keys, 45, false), keys.count);
  EXPECT_EQ(dc::key_limit(keys, 200, false), 0);
}

TEST(CudaLaunchPlan, GridMapsOneBlockToEachWorkUnit) {
  const da::Shape shape{3, 200, 5, 5, 64};
  std::vector<float> buffer(static_cast<std::size_t>(4 * 3 * 200 * 5 * 64 + 16));
  float* base = buffer.data();
  const std::int64_t size = 3 * 200 * 5 * 64;
  const auto q = da::contiguous_view<const float>(base, shape, 5);
  const auto k = da::contiguous_view<const float>(base + size, shape, 5);
  const auto v = da::contiguous_view<const float>(base + 2 * size, shape, 5);
  const auto out = da::contiguous_view(base + 3 * size, shape, 5);
  const da::Config config = make_config({64}, {1}, false, da::OffsetRule::modular);
  const dc::LaunchPlan plan = dc::make_launch_plan<float>(config, shape, q, k, v, out, nullptr,
                                                          dc::KernelKind::tensor_core);
  EXPECT_EQ(plan.params.row_stride, 1);
  EXPECT_EQ(plan.params.windows, 4);
  EXPECT_EQ(plan.blocks, 4 * 5 * 3);
  EXPECT_EQ(plan.threads, dc::block_threads);
  std::set<std::tuple<std::int64_t, std::int64_t, std::int64_t>> units;
  for (std::int64_t block = 0; block < plan.blocks; ++block) {
    const dc::WorkUnit unit = dc::work_unit(plan.params, block);
    EXPECT_LT(unit.batch, 3);
    EXPECT_LT(unit.head, 5);
    EXPECT_LT(unit.window, 4);
    units.insert({unit.batch, unit.head, unit.window});
  }
  EXPECT_EQ(static_cast<std::int64_t>(units.size()), plan.blocks);
  // Neighbouring blocks share (batch, head): windows vary fastest.
  EXPECT_EQ(dc::work_unit(plan.params, 1).window, 1);
  EXPECT_EQ(dc::work_unit(plan.params, 1).head, 0);
}

TEST(CudaLaunchPlan, ParametersCarryTheConfigAndLayout) {
  const da::Shape shape{1, 100, 6, 3, 128};
  std::vector<float> buffer(1 << 20);
  float* base = buffer.data();
  while (reinterpret_cast<std::uintptr_t>(base) % 16 != 0) ++base;
  const auto q = da::contiguous_view<const float>(base, shape, 6);
  const auto k = da::contiguous_view<const float>(base + 100000, shape, 3);
  const auto v = da::contiguous_view<const float>(base + 200000, shape, 3);
  const auto out = da::contiguous_view(base + 300000, shape, 6);
  da::Config config =
      make_config({32, 64}, {1, 2}, true, da::OffsetRule::blocked, da::Mixing::mean);
  config.scale = 0.25;
  dc::LaunchPlan plan = dc::make_launch_plan<float>(config, shape, q, k, v, out, nullptr,
                                                    dc::KernelKind::tensor_core);
  EXPECT_EQ(plan.params.num_branches, 2);
  EXPECT_EQ(plan.params.branches[1].w, 64);
  EXPECT_EQ(plan.params.branches[1].r, 2);
  EXPECT_TRUE(plan.params.causal);
  EXPECT_EQ(plan.params.offsets, da::OffsetRule::blocked);
  EXPECT_EQ(plan.params.mixing, da::Mixing::mean);
  EXPECT_FLOAT_EQ(plan.params.scale_log2, 0.25f * 1.44269504f);
  EXPECT_EQ(plan.params.kv_head(5), 2);
  EXPECT_EQ(plan.params.k_seq, 3 * 128);
  EXPECT_TRUE(plan.params.q_vector && plan.params.k_vector && plan.params.v_vector);
  // Shared memory: Q + 2 K + 2 V stages of 64 rows with pitch D + 8, plus one fp32 record of
  // D + 2 values per window row, for either mixing; fits the 227 KiB of an H100 and the 163 KiB
  // of an A100.
  EXPECT_EQ(plan.shared_bytes, std::size_t{136 * 2 * 64 * 5 + 64 * 130 * 4});
  EXPECT_LE(plan.shared_bytes, std::size_t{163 * 1024});
  config.mixing = da::Mixing::softmax;
  plan = dc::make_launch_plan<float>(config, shape, q, k, v, out, nullptr,
                                     dc::KernelKind::tensor_core);
  EXPECT_EQ(plan.shared_bytes, std::size_t{136 * 2 * 64 * 5 + 64 * 130 * 4});
  // The backward's dQ kernel keeps the layout without records.
  EXPECT_EQ(dc::detail::tensor_core_shared_bytes(128, da::Mixing::softmax),
            std::size_t{136 * 2 * 64 * 5});
  EXPECT_TRUE(plan.params.o_vector);

  // 16-byte transfers are decided per tensor: a head stride that is not a multiple of 16 bytes
  // turns them off for that tensor only (for out: its 16-byte stores).
  auto odd = out;
  odd.head_stride = 129;
  odd.seq_stride = 6 * 129;
  odd.batch_stride = 100 * 6 * 129;
  plan = dc::make_launch_plan<float>(config, shape, q, k, v, odd, nullptr,
                                     dc::KernelKind::tensor_core);
  EXPECT_TRUE(plan.params.q_vector && plan.params.k_vector && plan.params.v_vector);
  EXPECT_FALSE(plan.params.o_vector);
  auto odd_k = k;
  odd_k.head_stride = 129;
  odd_k.seq_stride = 3 * 129;
  odd_k.batch_stride = 100 * 3 * 129;
  plan = dc::make_launch_plan<float>(config, shape, q, odd_k, v, out, nullptr,
                                     dc::KernelKind::tensor_core);
  EXPECT_TRUE(plan.params.q_vector);
  EXPECT_FALSE(plan.params.k_vector);
  EXPECT_TRUE(plan.params.v_vector);
  // The stride of a size-1 dimension is never applied: batch 1 with an odd batch stride, or a
  // single kv head with an odd head stride, keeps 16-byte transfers.
  auto odd_batch = v;
  odd_batch.batch_stride = 12345;
  plan = dc::make_launch_plan<float>(config, shape, q, k, odd_batch, out, nullptr,
                                     dc::KernelKind::tensor_core);
  EXPECT_TRUE(plan.params.v_vector);
  const da::Shape one_kv_head{1, 100, 6, 1, 128};
  auto single = da::contiguous_view<const float>(base + 200000, one_kv_head, 1);
  single.head_stride = 7;
  plan = dc::make_launch_plan<float>(config, one_kv_head, q, single, single, out, nullptr,
                                     dc::KernelKind::tensor_core);
  EXPECT_TRUE(plan.params.k_vector && plan.params.v_vector);
  auto shifted = q;
  shifted.data = q.data + 1;  // 4 bytes off 16
  plan = dc::make_launch_plan<float>(config, shape, shifted, k, v, out, nullptr,
                                     dc::KernelKind::tensor_core);
  EXPECT_FALSE(plan.params.q_vector);

  plan = dc::make_launch_plan<float>(config, shape, q, k, v, out, nullptr, dc::KernelKind::simt);
  EXPECT_EQ(plan.threads, 128);
  EXPECT_EQ(plan.blocks, (1 * 6 * 100 + 3) / 4);
}

TEST(CudaLaunchPlan, BackendLimitsAreInvalidArguments) {
  const da::Config config = make_config({32}, {1}, false, da::OffsetRule::modular);
  for (std::int64_t head_dim : {16, 80, 256}) {
    try {
      dc::check_backend_limits(config, {1, 64, 2, 2, head_dim});
      ADD_FAILURE() << "head_dim " << head_dim << " accepted";
    } catch (const std::invalid_argument& error) {
      const std::string message = error.what();
      EXPECT_NE(message.find("head_dim = " + std::to_string(head_dim)), std::string::npos)
          << message;
      EXPECT_NE(message.find("{32, 64, 96, 128}"), std::string::npos) << message;
    }
  }
  for (std::int64_t head_dim : {32, 64, 96, 128})
    EXPECT_NO_THROW(dc::check_backend_limits(config, {1, 64, 2, 2, head_dim}));
  const da::Config many =
      make_config(std::vector<std::int64_t>(17, 8), std::vector<std::int64_t>(17, 1), false,
                  da::OffsetRule::modular);
  EXPECT_THROW(dc::check_backend_limits(many, {1, 64, 20, 20, 64}), std::invalid_argument);
  EXPECT_THROW(dc::check_backend_limits(config, {1, std::int64_t{1} << 31, 1, 1, 64}),
               std::invalid_argument);
}

// Host-side launch checks (launch_checks.hpp): shared memory against the device's limit,
// alignment of every pointer the kernels dereference, and the attribute cache.
TEST(CudaLaunchChecks, SharedMemoryBeyondTheDeviceLimitIsAnInvalidArgument) {
  const da::Shape shape{1, 100, 2, 2, 128};
  const da::Config mean = make_config({64}, {1}, false, da::OffsetRule::modular, da::Mixing::mean);
  std::vector<float> buffer(1 << 16);
  const auto view = da::contiguous_view<const float>(buffer.data(), shape, 2);
  const auto out = da::contiguous_view(buffer.data() + 30000, shape, 2);
  const dc::LaunchPlan plan = dc::make_launch_plan<float>(mean, shape, view, view, view, out,
                                                          nullptr, dc::KernelKind::tensor_core);
  EXPECT_EQ(plan.shared_bytes, std::size_t{117 * 1024 + 512});
  // sm_86 / sm_89 allow 99 KiB per block, A100 163 KiB, H100/H200 227 KiB.
  try {
    dc::check_shared_memory(plan.shared_bytes, 99 * 1024, mean, shape,
                            "dilated_attention::cuda::forward");
    ADD_FAILURE() << "117.5 KiB accepted on a 99 KiB device";
  } catch (const std::invalid_argument& error) {
    const std::string message = error.what();
    for (const char* fragment :
         {"head_dim = 128", "mixing = mean", "120320 bytes", "at most 101376"})
      EXPECT_NE(message.find(fragment), std::string::npos) << message;
  }
  EXPECT_NO_THROW(dc::check_shared_memory(plan.shared_bytes, 163 * 1024, mean, shape, "forward"));
  EXPECT_NO_THROW(dc::check_shared_memory(plan.shared_bytes, 227 * 1024, mean, shape, "forward"));
  EXPECT_NO_THROW(
      dc::check_shared_memory(plan.shared_bytes, plan.shared_bytes, mean, shape, "forward"));
}

TEST(CudaLaunchChecks, MisalignedPointersAreInvalidArguments) {
  const da::Shape shape{1, 40, 2, 2, 64};
  const da::Config config = make_config({16}, {1}, false, da::OffsetRule::modular);
  alignas(16) static float buffer[4 * 40 * 2 * 64 + 64];
  const auto good = da::contiguous_view<const float>(buffer, shape, 2);
  const auto out = da::contiguous_view(buffer + 2 * 40 * 2 * 64, shape, 2);
  float* lse = buffer + 4 * 40 * 2 * 64 - 100;
  auto expect_rejected = [&](auto call, const char* name) {
    try {
      call();
      ADD_FAILURE() << name << " misaligned but accepted";
    } catch (const std::invalid_argument& error) {
      const std::string message = error.what();
      EXPECT_NE(message.find(std::string(name) + " = "), std::string::npos) << message;
      EXPECT_NE(message.find("not aligned to 4 bytes"), std::string::npos) << message;
    }
  };
  const auto shifted = [](const float* p) {
    return reinterpret_cast<const float*>(reinterpret_cast<const char*>(p) + 2);
  };
  auto bad_q = good;
  bad_q.data = shifted(good.data);
  expect_rejected(
      [&] {
        dc::make_launch_plan<float>(config, shape, bad_q, good, good, out, lse,
                                    dc::KernelKind::simt);
      },
      "q.data");
  auto bad_out = out;
  bad_out.data = const_cast<float*>(shifted(out.data));
  expect_rejected(
      [&] {
        dc::make_launch_plan<float>(config, shape, good, good, good, bad_out, lse,
                                    dc::KernelKind::simt);
      },
      "out.data");
  float* bad_lse = const_cast<float*>(shifted(lse));
  expect_rejected(
      [&] {
        dc::make_launch_plan<float>(config, shape, good, good, good, out, bad_lse,
                                    dc::KernelKind::simt);
      },
      "lse");
  EXPECT_NO_THROW(
      dc::make_launch_plan<float>(config, shape, good, good, good, out, lse, dc::KernelKind::simt));
  EXPECT_NO_THROW(dc::make_launch_plan<float>(config, shape, good, good, good, out, nullptr,
                                              dc::KernelKind::simt));
}

TEST(CudaLaunchChecks, SharedMemoryGrantsAskOncePerDeviceAndLargerSize) {
  dc::SharedMemoryGrants grants;
  EXPECT_TRUE(grants.covers(0, 48 * 1024));  // the default needs no attribute
  EXPECT_FALSE(grants.covers(0, 85 * 1024));
  grants.record(0, 85 * 1024);
  EXPECT_TRUE(grants.covers(0, 85 * 1024));
  EXPECT_TRUE(grants.covers(0, 61 * 1024));
  EXPECT_FALSE(grants.covers(0, 117 * 1024));  // a larger size asks again
  EXPECT_FALSE(grants.covers(1, 85 * 1024));   // per device
  grants.record(0, 61 * 1024);                 // never shrinks
  EXPECT_TRUE(grants.covers(0, 85 * 1024));
  EXPECT_FALSE(
      grants.covers(dc::SharedMemoryGrants::max_devices, 85 * 1024));  // untracked: always ask
  grants.record(dc::SharedMemoryGrants::max_devices, 85 * 1024);
  EXPECT_FALSE(grants.covers(dc::SharedMemoryGrants::max_devices, 85 * 1024));
}

}  // namespace

namespace {

// Tensor-core work of the forward kernel, exactly as it issues it: for every (window, branch,
// segment) with queries, every slice with queries (a warp) multiplies 16 rows by the keys of each
// streamed tile up to its own limit in 16-key steps (slice_tile_keys), for S = QK^T and for P.V
// alike. Counted in (row, key) pairs, against the attended pairs.
double tensor_work_over_useful(const da::Config& config, const da::Shape& shape) {
  std::vector<float> buffer(16);
  const auto view = da::View<const float>{buffer.data(), 0, 0, 0};
  const auto out = da::View<float>{buffer.data() + 8, 0, 0, 0};
  const dc::ForwardParams p = dc::make_launch_plan<float>(config, shape, view, view, view, out,
                                                          nullptr, dc::KernelKind::tensor_core)
                                  .params;
  double work = 0.0;
  for (std::int64_t head = 0; head < shape.num_heads; ++head)
    for (int i = 0; i < p.num_branches; ++i)
      for_each_query_work(p, head, i,
                          [&](const dc::QueryWindow& window, std::int64_t, std::int64_t,
                              const dc::QueryWork& unit) {
                            for (int slice = 0; slice < dc::block_warps; ++slice) {
                              const std::int64_t limit =
                                  dc::slice_key_limit(unit, window, slice, p.causal);
                              for (std::int64_t tile = 0; tile < unit.tiles(); ++tile)
                                work += double(dc::slice_rows) * dc::slice_tile_keys(limit, tile);
                            }
                          });
  return work * double(shape.batch) / double(da::Pattern(config, shape).attended_pairs());
}

}  // namespace

// The exact ratio of tensor-core work to useful work (attended pairs) of the forward's tiling, for
// LongNet's configurations: the project's target is <= 1.05 (docs/cuda.md, "Where work is still
// wasted"), recorded and guarded.
TEST(CudaLaunchPlan, TensorWorkOverUsefulWorkOfLongNetConfigs) {
  struct Row {
    const char* name;
    da::Config config;
    double ceiling;
  };
  const std::vector<Row> rows = {
      {"paper r = 1,2,4,6,12", make_config({2048, 4096, 8192, 16384, 32768}, {1, 2, 4, 6, 12}),
       1.05},
      {"paper r = 1,2,4,6,12 causal",
       make_config({2048, 4096, 8192, 16384, 32768}, {1, 2, 4, 6, 12}, true), 1.05},
      {"LongNet r = 1,2,4", make_config({2048, 4096, 8192}, {1, 2, 4}), 1.05},
      {"LongNet r = 1,2,4 causal", make_config({2048, 4096, 8192}, {1, 2, 4}, true), 1.05},
  };
  for (const Row& row : rows) {
    const double ratio = tensor_work_over_useful(row.config, {1, 65536, 12, 12, 128});
    std::printf("%-32s tensor work / useful = %.4f\n", row.name, ratio);
    ::testing::Test::RecordProperty(row.name, std::to_string(ratio));
    EXPECT_GE(ratio, 1.0) << row.name;
    EXPECT_LE(ratio, row.ceiling) << row.name;
  }
}
