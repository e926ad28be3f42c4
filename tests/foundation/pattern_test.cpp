// Property tests of the pattern generator (pattern.hpp) against brute-force enumeration of every
// (query, key) pair with the formulas of docs/semantics.md "The forward"-3, as re-derived in support/dense_oracle.hpp.

#include <dilated_attention/pattern.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <tuple>
#include <vector>

#include "support/dense_oracle.hpp"
#include "support/random_config.hpp"

namespace da = dilated_attention;
namespace dt = dilated_attention::testing;

namespace {

std::vector<std::int64_t> elements(const da::Progression& p) {
  std::vector<std::int64_t> result;
  for (std::int64_t j = 0; j < p.count; ++j) result.push_back(p.at(j));
  return result;
}

// ---------------------------------------------------------------------------------------------
// Progression

TEST(Progression, HelpersMatchBruteForce) {
  for (std::int64_t first = -6; first <= 9; first += 3)
    for (std::int64_t stride = 1; stride <= 5; ++stride)
      for (std::int64_t count = 0; count <= 7; ++count) {
        const da::Progression p{first, stride, count};
        SCOPED_TRACE(::testing::Message()
                     << "first " << first << " stride " << stride << " count " << count);
        std::vector<std::int64_t> all;
        for (std::int64_t j = 0; j < count; ++j) all.push_back(first + j * stride);
        ASSERT_EQ(elements(p), all);
        EXPECT_EQ(p.empty(), count == 0);
        if (count > 0) {
          EXPECT_EQ(p.last(), all.back());
        }

        for (std::int64_t x = first - 8; x <= first + stride * count + 8; ++x) {
          const auto it = std::find(all.begin(), all.end(), x);
          EXPECT_EQ(p.contains(x), it != all.end()) << "x = " << x;
          if (it != all.end()) {
            EXPECT_EQ(p.index_of(x), it - all.begin()) << "x = " << x;
          }
          const auto up_to =
              std::count_if(all.begin(), all.end(), [&](std::int64_t e) { return e <= x; });
          EXPECT_EQ(p.count_up_to(x), up_to) << "x = " << x;
        }
        for (std::int64_t n = -2; n <= count + 2; ++n) {
          const std::int64_t kept = std::clamp<std::int64_t>(n, 0, count);
          EXPECT_EQ(elements(p.prefix(n)),
                    std::vector<std::int64_t>(all.begin(), all.begin() + kept))
              << "n = " << n;
        }
        for (std::int64_t begin = -2; begin <= count + 2; ++begin)
          for (std::int64_t end = -2; end <= count + 2; ++end) {
            std::vector<std::int64_t> want;
            for (std::int64_t j = std::max<std::int64_t>(begin, 0); j < std::min(end, count); ++j)
              want.push_back(all[static_cast<std::size_t>(j)]);
            EXPECT_EQ(elements(p.slice(begin, end)), want) << "slice " << begin << ", " << end;
          }
        for (std::int64_t lo = first - 4; lo <= first + stride * count + 4; ++lo)
          for (std::int64_t hi = lo - 2; hi <= first + stride * count + 4; ++hi) {
            std::vector<std::int64_t> want;
            for (std::int64_t e : all)
              if (e >= lo && e < hi) want.push_back(e);
            const da::Progression got = p.within(lo, hi);
            EXPECT_EQ(elements(got), want) << "within " << lo << ", " << hi;
            if (got.count > 1) {
              EXPECT_EQ(got.stride, stride);
            }
          }
      }
}

TEST(Progression, EqualityComparesTheElements) {
  EXPECT_EQ((da::Progression{3, 2, 4}), (da::Progression{3, 2, 4}));
  EXPECT_NE((da::Progression{3, 2, 4}), (da::Progression{3, 3, 4}));
  EXPECT_NE((da::Progression{3, 2, 4}), (da::Progression{4, 2, 4}));
  EXPECT_NE((da::Progression{3, 2, 4}), (da::Progression{3, 2, 3}));
  // The stride of a single element and the start of an empty set do not matter.
  EXPECT_EQ((da::Progression{5, 1, 1}), (da::Progression{5, 7, 1}));
  EXPECT_EQ((da::Progression{5, 1, 0}), (da::Progression{-2, 3, 0}));
}

TEST(Progression, LargePositionsDoNotOverflow) {
  const std::int64_t w = std::int64_t{1} << 20, n = (std::int64_t{1} << 40) + 12345;
  const da::BranchGeometry g{w, 7, n};
  EXPECT_EQ(g.num_segments(), (n + w - 1) / w);
  EXPECT_EQ(g.segment_length(g.num_segments() - 1), 12345);
  const std::int64_t x = n - 1;  // in the short last segment, in-segment index 12344
  EXPECT_EQ(g.in_segment(x), 12344);
  const da::Progression keys = g.keys(x, 12344 % 7, true);
  EXPECT_EQ(keys.first, g.segment_begin(g.num_segments() - 1) + 12344 % 7);
  EXPECT_EQ(keys.last(), x);
  EXPECT_EQ(keys.count, 12344 / 7 + 1);
}

// ---------------------------------------------------------------------------------------------
// Offsets and partitions

TEST(Offsets, ModularIsHeadModRate) {
  for (std::int64_t heads = 1; heads <= 30; ++heads)
    for (std::int64_t rate = 1; rate <= 13; ++rate)
      for (std::int64_t h = 0; h < heads; ++h)
        EXPECT_EQ(da::head_offset(da::OffsetRule::modular, 0, 1, rate, h, heads), h % rate);
}

TEST(Offsets, BlockedFollowsTorchscale) {
  // torchscale pads the heads to a multiple of r and splits them as (r2 h): offset r2 is shared
  // by a block of ceil(H / r) consecutive heads, i.e. o(h) = floor(h / ceil(H / r)).
  for (std::int64_t heads = 1; heads <= 40; ++heads)
    for (std::int64_t rate = 1; rate <= 16; ++rate) {
      const std::int64_t padded = (heads + rate - 1) / rate * rate;
      const std::int64_t per_offset = padded / rate;
      for (std::int64_t h = 0; h < heads; ++h) {
        const std::int64_t got = da::head_offset(da::OffsetRule::blocked, 0, 1, rate, h, heads);
        EXPECT_EQ(got, h / per_offset) << "H " << heads << " r " << rate << " h " << h;
        EXPECT_GE(got, 0);
        EXPECT_LT(got, rate);
      }
    }
  // A worked example: 12 heads, r = 5: ceil(12/5) = 3 heads per offset, offsets 0..3.
  const std::int64_t want[12] = {0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3};
  for (std::int64_t h = 0; h < 12; ++h)
    EXPECT_EQ(da::head_offset(da::OffsetRule::blocked, 0, 1, 5, h, 12), want[h]);
}

TEST(Offsets, PartitionRangesFollowSpec) {
  for (std::int64_t heads = 1; heads <= 40; ++heads)
    for (std::int64_t groups = 1; groups <= heads; ++groups) {
      std::int64_t begin = 0;
      for (std::int64_t g = 0; g < groups; ++g) {
        const std::int64_t size = heads / groups + (g < heads % groups ? 1 : 0);
        ASSERT_EQ(da::partition_begin(g, heads, groups), begin)
            << heads << " " << groups << " " << g;
        for (std::int64_t h = begin; h < begin + size; ++h)
          ASSERT_EQ(da::partition_of(h, heads, groups), g) << heads << " " << groups << " " << h;
        begin += size;
      }
      EXPECT_EQ(begin, heads);
      EXPECT_EQ(da::partition_begin(groups, heads, groups), heads);
    }
}

TEST(Offsets, PartitionedHeadRunsExactlyItsGroupsBranch) {
  // 7 heads over 3 branches: groups of 3, 2, 2; offsets g mod r_g with r = {1, 2, 5}.
  const std::int64_t rates[3] = {1, 2, 5};
  const std::int64_t want[7] = {0, 0, 0, 1, 1, 2, 2};  // the group = the branch it runs
  for (std::int64_t h = 0; h < 7; ++h)
    for (std::int64_t i = 0; i < 3; ++i) {
      const std::int64_t got = da::head_offset(da::OffsetRule::partitioned, i, 3, rates[i], h, 7);
      EXPECT_EQ(got, i == want[h] ? i % rates[i] : -1) << "h " << h << " branch " << i;
    }
}

// A hand-worked pattern, so that the oracle and the library cannot share one misreading:
// w = 6, r = 4, N = 14 (segments [0,6), [6,12), [12,14)), modular offsets, 3 heads.
TEST(PatternExample, HandWorkedKeys) {
  da::Config config;
  config.segment_lengths = {6};
  config.dilation_rates = {4};
  const da::Shape shape{1, 14, 3, 3, 2};
  const da::Pattern pattern(config, shape);
  // Head 1, offset 1: rows {1, 5}, {7, 11}, {13}.
  EXPECT_EQ(elements(pattern.keys(0, 1, 5)), (std::vector<std::int64_t>{1, 5}));
  EXPECT_EQ(elements(pattern.keys(0, 1, 7)), (std::vector<std::int64_t>{7, 11}));
  EXPECT_EQ(elements(pattern.keys(0, 1, 13)), (std::vector<std::int64_t>{13}));
  EXPECT_TRUE(pattern.keys(0, 1, 6).empty());
  // Head 2, offset 2: rows {2}, {8}, and nothing in the short last segment.
  EXPECT_EQ(elements(pattern.keys(0, 2, 2)), (std::vector<std::int64_t>{2}));
  EXPECT_TRUE(pattern.keys(0, 2, 12).empty());
  EXPECT_TRUE(pattern.keys(0, 2, 13).empty());
  // Head 0: {0, 4}, {6, 10}, {12}.
  EXPECT_EQ(elements(pattern.keys(0, 0, 4)), (std::vector<std::int64_t>{0, 4}));
  EXPECT_EQ(elements(pattern.keys(0, 0, 12)), (std::vector<std::int64_t>{12}));
  // Blocks: offsets 0 and 1 in all three segments, offset 2 in the first two; offset 3 has no
  // head. Pairs: head 0: 4+4+1, head 1: 4+4+1, head 2: 1+1.
  EXPECT_EQ(pattern.blocks().size(), 8u);
  EXPECT_EQ(pattern.attended_pairs(), 20);
  EXPECT_DOUBLE_EQ(pattern.useful_flops(), 4.0 * 2 * 20);
  config.causal = true;
  const da::Pattern causal(config, shape);
  EXPECT_EQ(elements(causal.keys(0, 1, 5)), (std::vector<std::int64_t>{1, 5}));
  EXPECT_EQ(elements(causal.keys(0, 1, 1)), (std::vector<std::int64_t>{1}));
  EXPECT_EQ(causal.attended_pairs(), 3 + 3 + 1 + 3 + 3 + 1 + 1 + 1);
}

// ---------------------------------------------------------------------------------------------
// Random configurations against brute force

class PatternProperty : public ::testing::TestWithParam<std::tuple<da::OffsetRule, bool>> {};

void check_against_brute_force(const dt::Problem& problem) {
  const da::Config& config = problem.config;
  const da::Shape& shape = problem.shape;
  SCOPED_TRACE(dt::describe(problem));
  const da::Pattern pattern(config, shape);
  const std::int64_t n = shape.seq_len, heads = shape.num_heads;
  const std::int64_t branches = static_cast<std::int64_t>(config.segment_lengths.size());
  ASSERT_EQ(pattern.num_branches(), branches);

  // Offsets, and heads_with_offset as their exact inverse.
  for (std::int64_t i = 0; i < branches; ++i) {
    const std::int64_t r = config.dilation_rates[static_cast<std::size_t>(i)];
    for (std::int64_t h = 0; h < heads; ++h)
      ASSERT_EQ(pattern.offset(i, h),
                dt::oracle_offset(config, heads, static_cast<std::size_t>(i), h))
          << "branch " << i << " head " << h;
    for (std::int64_t o = 0; o < r; ++o) {
      std::vector<std::int64_t> want;
      for (std::int64_t h = 0; h < heads; ++h)
        if (pattern.offset(i, h) == o) want.push_back(h);
      ASSERT_EQ(elements(pattern.heads_with_offset(i, o)), want)
          << "branch " << i << " offset " << o;
    }
  }

  // Keys and multiplicity for every (head, query, key).
  std::int64_t pairs = 0;
  for (std::int64_t h = 0; h < heads; ++h) {
    const std::vector<int> counts = dt::count_matrix(config, shape, h);
    for (std::int64_t x = 0; x < n; ++x) {
      for (std::int64_t i = 0; i < branches; ++i) {
        std::vector<std::int64_t> want;
        for (std::int64_t y = 0; y < n; ++y)
          if (dt::oracle_attends(config, heads, static_cast<std::size_t>(i), h, x, y))
            want.push_back(y);
        const da::Progression keys = pattern.keys(i, h, x);
        ASSERT_EQ(elements(keys), want) << "branch " << i << " head " << h << " query " << x;
      }
      for (std::int64_t y = 0; y < n; ++y) {
        const int c = counts[static_cast<std::size_t>(x * n + y)];
        ASSERT_EQ(pattern.multiplicity(h, x, y), c)
            << "head " << h << " query " << x << " key " << y;
        pairs += c;
      }
    }
  }

  // Blocks: ordered, inside one segment, and together they cover every (branch, head, selected
  // row) exactly once; each block's rows are the keys of each of its rows.
  const std::vector<da::Block> blocks = pattern.blocks();
  std::vector<int> covered(static_cast<std::size_t>(branches * heads * n), 0);
  for (std::size_t j = 0; j < blocks.size(); ++j) {
    const da::Block& block = blocks[j];
    SCOPED_TRACE(::testing::Message() << "block " << j << ": branch " << block.branch << " segment "
                                      << block.segment << " offset " << block.offset);
    if (j > 0) {
      const da::Block& before = blocks[j - 1];
      ASSERT_LT(std::make_tuple(before.branch, before.segment, before.offset),
                std::make_tuple(block.branch, block.segment, block.offset));
    }
    ASSERT_GE(block.branch, 0);
    ASSERT_LT(block.branch, branches);
    const std::int64_t w = config.segment_lengths[static_cast<std::size_t>(block.branch)];
    const std::int64_t r = config.dilation_rates[static_cast<std::size_t>(block.branch)];
    ASSERT_FALSE(block.rows.empty());
    ASSERT_FALSE(block.heads.empty());
    ASSERT_GE(block.offset, 0);
    ASSERT_LT(block.offset, r);
    const std::int64_t seg_begin = block.segment * w, seg_end = std::min(seg_begin + w, n);
    ASSERT_EQ(block.rows.first - seg_begin, block.offset);
    if (block.rows.count > 1) {
      ASSERT_EQ(block.rows.stride, r);
    }
    ASSERT_GE(block.rows.first, seg_begin);
    ASSERT_LT(block.rows.last(), seg_end);  // never straddles a segment
    for (std::int64_t h : elements(block.heads)) {
      ASSERT_GE(h, 0);
      ASSERT_LT(h, heads);
      ASSERT_EQ(pattern.offset(block.branch, h), block.offset) << "head " << h;
      for (std::int64_t x : elements(block.rows)) {
        ++covered[static_cast<std::size_t>((block.branch * heads + h) * n + x)];
        const da::Progression keys = pattern.keys(block.branch, h, x);
        const da::Progression want =
            config.causal ? block.rows.prefix(block.rows.index_of(x) + 1) : block.rows;
        ASSERT_EQ(keys, want) << "head " << h << " row " << x;
      }
    }
  }
  for (std::int64_t i = 0; i < branches; ++i)
    for (std::int64_t h = 0; h < heads; ++h)
      for (std::int64_t x = 0; x < n; ++x)
        ASSERT_EQ(covered[static_cast<std::size_t>((i * heads + h) * n + x)],
                  dt::oracle_selected(config, heads, static_cast<std::size_t>(i), h, x) ? 1 : 0)
            << "branch " << i << " head " << h << " row " << x;

  // Work: one pair per (batch, head, query, key, branch) with key in K_i(query, head).
  EXPECT_EQ(pattern.attended_pairs(), pairs * shape.batch);
  EXPECT_EQ(pattern.useful_flops(),
            4.0 * static_cast<double>(shape.head_dim) * static_cast<double>(pairs * shape.batch));

  // Geometry of each branch.
  for (std::int64_t i = 0; i < branches; ++i) {
    const da::BranchGeometry g = pattern.branch(i);
    std::int64_t total = 0;
    for (std::int64_t s = 0; s < g.num_segments(); ++s) {
      EXPECT_EQ(g.segment_begin(s), total);
      EXPECT_GT(g.segment_length(s), 0);
      total += g.segment_length(s);
    }
    EXPECT_EQ(total, n);
    for (std::int64_t x = 0; x < n; ++x) EXPECT_EQ(g.in_segment(x), x - g.segment_of(x) * g.w);
  }
}

TEST_P(PatternProperty, MatchesBruteForceOnRandomConfigs) {
  const auto [rule, causal] = GetParam();
  std::mt19937_64 engine(0x5eed + static_cast<int>(rule) * 2 + (causal ? 1 : 0));
  dt::RandomConfigLimits limits;
  limits.max_batch = 3;
  limits.max_seq_len = 80;
  for (int trial = 0; trial < 100; ++trial) {
    const dt::Problem problem = dt::random_problem(engine, rule, causal, limits);
    check_against_brute_force(problem);
    if (::testing::Test::HasFatalFailure()) return;
  }
}

// Hand-picked corners: one position; w = 1; r = w; a rate larger than the last segment; more
// heads than H mod G; the paper's branch set at a length shorter than every segment.
TEST_P(PatternProperty, MatchesBruteForceOnCorners) {
  const da::OffsetRule rule = std::get<0>(GetParam());
  const bool causal = std::get<1>(GetParam());
  const auto problem = [&](std::vector<std::int64_t> w, std::vector<std::int64_t> r,
                           da::Shape shape) {
    dt::Problem p;
    p.config.segment_lengths = std::move(w);
    p.config.dilation_rates = std::move(r);
    p.config.causal = causal;
    p.config.offsets = rule;
    p.shape = shape;
    return p;
  };
  check_against_brute_force(problem({1}, {1}, {1, 1, 1, 1, 1}));
  check_against_brute_force(problem({1, 3}, {1, 3}, {2, 10, 5, 5, 3}));
  check_against_brute_force(problem({8, 8}, {7, 7}, {1, 17, 4, 2, 1}));
  check_against_brute_force(problem({5, 9, 4}, {5, 2, 3}, {1, 23, 7, 7, 2}));
  check_against_brute_force(
      problem({2048, 4096, 8192, 16384, 32768}, {1, 2, 4, 6, 12}, {1, 40, 12, 12, 8}));
  check_against_brute_force(problem({16, 32, 64}, {1, 2, 4}, {1, 70, 12, 3, 1}));
}

std::string rule_and_causality_name(
    const ::testing::TestParamInfo<PatternProperty::ParamType>& param) {
  return std::string(da::to_string(std::get<0>(param.param))) +
         (std::get<1>(param.param) ? "Causal" : "Full");
}

INSTANTIATE_TEST_SUITE_P(AllRules, PatternProperty,
                         ::testing::Combine(::testing::Values(da::OffsetRule::modular,
                                                              da::OffsetRule::blocked,
                                                              da::OffsetRule::partitioned),
                                            ::testing::Bool()),
                         rule_and_causality_name);

TEST(Pattern, ConstructorValidates) {
  da::Config config;
  config.segment_lengths = {4};
  config.dilation_rates = {5};
  EXPECT_THROW(da::Pattern(config, da::Shape{1, 8, 2, 2, 4}), std::invalid_argument);
}

}  // namespace

// for_each_block_in visits, per head and window, exactly the blocks of Pattern::blocks() that the
// head takes part in and that have rows in the window, in branch then segment order, with those
// rows.
TEST(Pattern, ForEachBlockInMatchesBlocks) {
  for (const da::OffsetRule rule :
       {da::OffsetRule::modular, da::OffsetRule::blocked, da::OffsetRule::partitioned}) {
    da::Config config;
    config.segment_lengths = {4, 10, 24};
    config.dilation_rates = {1, 2, 3};
    config.offsets = rule;
    const da::Shape shape{1, 29, 5, 5, 4};
    const da::Pattern pattern(config, shape);
    for (std::int64_t h = 0; h < shape.num_heads; ++h)
      for (std::int64_t lo = 0; lo < shape.seq_len; lo += 3)
        for (const std::int64_t hi : {lo + 1, lo + 7, shape.seq_len}) {
          if (hi > shape.seq_len) continue;
          std::vector<std::tuple<std::int64_t, std::int64_t, std::int64_t, std::int64_t>> expected,
              got;
          for (const da::Block& block : pattern.blocks()) {
            const da::Progression inside = block.rows.within(lo, hi);
            if (block.heads.contains(h) && !inside.empty())
              expected.emplace_back(block.branch, block.rows.first, inside.first, inside.count);
          }
          pattern.for_each_block_in(
              h, lo, hi,
              [&](std::int64_t i, const da::Progression& block, const da::Progression& inside) {
                EXPECT_EQ(block.within(lo, hi), inside);
                got.emplace_back(i, block.first, inside.first, inside.count);
              });
          EXPECT_EQ(got, expected)
              << da::to_string(rule) << " head " << h << " [" << lo << ", " << hi << ")";
        }
  }
}

// sole_branch against brute force over the blocks: the branch whose blocks alone hold the head,
// -1 when no block does, -2 when blocks of several branches do; selects_any, the mean mixing's
// statistics branch and whether mean recomputes any head's statistics agree.
TEST(Pattern, SoleBranchMatchesBlocks) {
  struct Case {
    std::vector<std::int64_t> w, r;
    std::int64_t n, heads;
  };
  const std::vector<Case> cases = {{{4, 10, 24}, {1, 2, 3}, 29, 5},
                                   {{20, 10}, {12, 1}, 10, 13},
                                   {{20, 16}, {12, 12}, 10, 12},
                                   {{50}, {3}, 7, 4},
                                   {{9, 9, 9}, {9, 5, 2}, 3, 7}};
  for (const da::OffsetRule rule :
       {da::OffsetRule::modular, da::OffsetRule::blocked, da::OffsetRule::partitioned})
    for (const Case& c : cases) {
      if (rule == da::OffsetRule::partitioned && c.heads < static_cast<std::int64_t>(c.w.size()))
        continue;
      da::Config config;
      config.segment_lengths = c.w;
      config.dilation_rates = c.r;
      config.offsets = rule;
      const da::Pattern pattern(config, da::Shape{1, c.n, c.heads, 1, 4});
      const std::vector<da::Block> blocks = pattern.blocks();
      bool several_anywhere = false;
      for (std::int64_t h = 0; h < c.heads; ++h) {
        std::vector<std::int64_t> branches;
        for (const da::Block& block : blocks)
          if (block.heads.contains(h) &&
              std::find(branches.begin(), branches.end(), block.branch) == branches.end())
            branches.push_back(block.branch);
        const std::int64_t want = branches.empty()       ? -1
                                  : branches.size() == 1 ? branches.front()
                                                         : -2;
        EXPECT_EQ(pattern.sole_branch(h), want) << "head " << h << ", n " << c.n;
        EXPECT_EQ(pattern.mean_statistics_branch(h),
                  branches.size() > 1 ? -1 : (branches.empty() ? 0 : branches.front()));
        several_anywhere = several_anywhere || branches.size() > 1;
        for (std::int64_t i = 0; i < pattern.num_branches(); ++i)
          EXPECT_EQ(pattern.selects_any(i, h),
                    std::find(branches.begin(), branches.end(), i) != branches.end());
      }
      EXPECT_EQ(pattern.mean_recomputes_statistics(), several_anywhere) << "n " << c.n;
    }
}
