// Checked views (View::extent, docs/semantics.md "Bad input"): a view that knows the length of its buffer is
// bounds-checked by validate(). Every entry point must reject a view whose highest reachable
// element lies past the end of its buffer -- for q, k, v and out, and for reference::backward's
// gradients and d_out too -- with std::invalid_argument
// naming the parameter and both numbers, before a single output element (O or LSE) is written;
// a buffer of exactly the right length, padded strides included, is accepted and gives the same
// numbers as the unchecked view. The four-value spelling `View<T>{ptr, bs, ss, hs}` stays
// unchecked (this file is compiled with -Werror=missing-field-initializers: it must not warn).

#include <dilated_attention/dilated_attention.hpp>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace da = dilated_attention;
using ::testing::HasSubstr;

namespace {

// contiguous_view of a temporary vector would dangle: it is deleted, not merely discouraged.
template <class V, class = void>
struct accepts_vector : std::false_type {};
template <class V>
struct accepts_vector<V,
                      std::void_t<decltype(da::contiguous_view(std::declval<V>(), da::Shape{}, 1))>>
    : std::true_type {};
static_assert(accepts_vector<std::vector<float>&>::value);
static_assert(accepts_vector<const std::vector<float>&>::value);
static_assert(!accepts_vector<std::vector<float>&&>::value);
static_assert(std::is_same_v<decltype(da::contiguous_view(std::declval<const std::vector<float>&>(),
                                                          da::Shape{}, 1)),
                             da::View<const float>>);
static_assert(std::is_aggregate_v<da::View<float>>);

TEST(CheckedView, SpellingsAndConstConversion) {
  std::vector<float> buffer(100);
  const da::View<float> plain{buffer.data(), 50, 10, 5};  // the aggregate spelling: unchecked
  EXPECT_EQ(plain.extent, -1);
  const da::View<float> checked = da::checked_view(buffer.data(), 77, 50, 10, 5);
  EXPECT_EQ(checked.extent, 77);
  const da::View<const float> read_only = checked;  // the conversion keeps the extent
  EXPECT_EQ(read_only.extent, 77);
  EXPECT_EQ(read_only.data, buffer.data());
  EXPECT_EQ(read_only.head_stride, 5);

  const da::Shape shape{2, 5, 2, 2, 5};
  const da::View<float> from_vector = da::contiguous_view(buffer, shape, shape.num_heads);
  const da::View<float> from_pointer = da::contiguous_view(buffer.data(), shape, shape.num_heads);
  EXPECT_EQ(from_vector.extent, 100);
  EXPECT_EQ(from_pointer.extent, -1);
  EXPECT_EQ(from_vector.batch_stride, from_pointer.batch_stride);
  EXPECT_EQ(from_vector.seq_stride, from_pointer.seq_stride);
  EXPECT_EQ(from_vector.head_stride, from_pointer.head_stride);
  const std::vector<float>& const_buffer = buffer;
  EXPECT_EQ(da::contiguous_view(const_buffer, shape, shape.num_heads).extent, 100);
}

constexpr double sentinel = 4321.25;
enum class Entry { reference, cpu };
const char* name_of(Entry entry) { return entry == Entry::reference ? "reference" : "cpu"; }

// One problem: q, k, v, out in padded layouts (head stride D + 1, seq stride heads * (D + 1) + 2),
// each in a buffer of exactly the elements its view reaches plus `slack[i]` (negative: too short).
template <class T>
struct Problem {
  da::Config config;
  da::Shape shape{2, 11, 4, 2, 3};
  std::vector<T> buffers[4];  // q, k, v, out
  std::int64_t highest[4] = {};
  std::vector<da::lse_type_t<T>> lse;

  explicit Problem(const std::int64_t (&slack)[4]) {
    config.segment_lengths = {4, 8};
    config.dilation_rates = {1, 2};
    config.causal = true;
    std::mt19937 rng(3);
    std::normal_distribution<double> normal;
    for (int i = 0; i < 4; ++i) {
      const std::int64_t heads = (i == 1 || i == 2) ? shape.num_kv_heads : shape.num_heads;
      const da::View<T> v = view(i);
      highest[i] = (shape.batch - 1) * v.batch_stride + (shape.seq_len - 1) * v.seq_stride +
                   (heads - 1) * v.head_stride + shape.head_dim - 1;
      buffers[i].resize(
          static_cast<std::size_t>(highest[i] + 1 + std::max<std::int64_t>(slack[i], 0)));
      for (T& x : buffers[i]) x = i == 3 ? T(sentinel) : static_cast<T>(normal(rng));
      // A too-short buffer is simulated by telling the view a smaller extent than the vector has,
      // so that nothing reads out of bounds even if the check failed.
      extents[i] = highest[i] + 1 + slack[i];
    }
    lse.assign(static_cast<std::size_t>(shape.batch * shape.num_heads * shape.seq_len),
               da::lse_type_t<T>(sentinel));
  }

  da::View<T> view(int i) {
    const std::int64_t heads = (i == 1 || i == 2) ? shape.num_kv_heads : shape.num_heads;
    const std::int64_t head_stride = shape.head_dim + 1, seq_stride = heads * head_stride + 2;
    return da::checked_view(buffers[i].data(), extents[i], shape.seq_len * seq_stride, seq_stride,
                            head_stride);
  }

  void forward(Entry entry) {
    const da::View<const T> q = view(0), k = view(1), v = view(2);
    if (entry == Entry::reference)
      da::reference::forward<T>(config, shape, {q, k, v}, {view(3), lse.data()});
    else
      da::forward<T>(config, shape, {q, k, v}, {view(3), lse.data()});
  }

  bool outputs_untouched() const {
    for (const T x : buffers[3])
      if (!(x == T(sentinel))) return false;
    for (const auto x : lse)
      if (!(x == da::lse_type_t<T>(sentinel))) return false;
    return true;
  }

  std::int64_t extents[4] = {};
};

const char* const tensor_names[4] = {"q", "k", "v", "out"};

template <class T>
void check_entry(Entry entry) {
  SCOPED_TRACE(name_of(entry));
  // Exactly long enough: accepted, and the same numbers as unchecked views of the same memory.
  Problem<T> exact({0, 0, 0, 0});
  ASSERT_NO_THROW(exact.forward(entry));
  Problem<T> unchecked({0, 0, 0, 0});
  for (auto& e : unchecked.extents) e = -1;
  unchecked.forward(entry);
  EXPECT_EQ(exact.buffers[3], unchecked.buffers[3]);
  EXPECT_EQ(exact.lse, unchecked.lse);
  EXPECT_FALSE(exact.outputs_untouched());

  // One element short, then far too short, in each tensor in turn.
  for (const std::int64_t shortfall : {1, 40}) {
    for (int i = 0; i < 4; ++i) {
      SCOPED_TRACE(std::string(tensor_names[i]) + " short by " + std::to_string(shortfall));
      std::int64_t slack[4] = {0, 0, 0, 0};
      slack[i] = -shortfall;
      Problem<T> p(slack);
      try {
        p.forward(entry);
        ADD_FAILURE() << "no exception was thrown";
      } catch (const std::invalid_argument& error) {
        EXPECT_THAT(error.what(), HasSubstr(std::string(tensor_names[i]) + " reaches element " +
                                            std::to_string(p.highest[i])));
        EXPECT_THAT(error.what(), HasSubstr("holds " + std::to_string(p.extents[i]) + " elements"));
        EXPECT_THAT(error.what(), HasSubstr(std::string(tensor_names[i]) + ".extent"));
      }
      EXPECT_TRUE(p.outputs_untouched()) << "an output was written before the error";
    }
  }

  // Room to spare is fine.
  Problem<T> roomy({5, 0, 9, 1});
  EXPECT_NO_THROW(roomy.forward(entry));

  // An extent below -1 is neither unknown nor a length.
  Problem<T> negative({0, 0, 0, 0});
  negative.extents[2] = -2;
  try {
    negative.forward(entry);
    ADD_FAILURE() << "no exception was thrown";
  } catch (const std::invalid_argument& error) {
    EXPECT_THAT(error.what(), HasSubstr("v.extent = -2"));
  }
  EXPECT_TRUE(negative.outputs_untouched());
}

TEST(CheckedView, ReferenceRejectsShortBuffersBeforeWriting) {
  check_entry<double>(Entry::reference);
}
TEST(CheckedView, CpuFloatRejectsShortBuffersBeforeWriting) { check_entry<float>(Entry::cpu); }
TEST(CheckedView, CpuDoubleRejectsShortBuffersBeforeWriting) { check_entry<double>(Entry::cpu); }

// reference::backward checks its seven views the same way (validate_backward shares check_view):
// each one a single element short is rejected before any gradient is written.
TEST(CheckedView, ReferenceBackwardRejectsShortBuffersBeforeWriting) {
  da::Config config;
  config.segment_lengths = {4, 6};
  config.dilation_rates = {1, 2};
  const da::Shape shape{1, 9, 4, 2, 3};
  const std::size_t q_size = 1 * 9 * 4 * 3, kv_size = 1 * 9 * 2 * 3;
  std::mt19937 rng(5);
  std::normal_distribution<double> normal;
  auto random = [&](std::size_t n) {
    std::vector<double> x(n);
    for (double& e : x) e = normal(rng);
    return x;
  };
  const std::vector<double> q = random(q_size), k = random(kv_size), v = random(kv_size),
                            d_out = random(q_size);
  std::vector<double> out(q_size),
      lse(static_cast<std::size_t>(shape.batch * shape.num_heads * shape.seq_len));
  da::reference::forward<double>(config, shape,
                                 {da::contiguous_view(q, shape, shape.num_heads),
                                  da::contiguous_view(k, shape, shape.num_kv_heads),
                                  da::contiguous_view(v, shape, shape.num_kv_heads)},
                                 {da::contiguous_view(out, shape, shape.num_heads), lse.data()});
  const char* const names[7] = {"q", "k", "v", "out", "d_out", "d_q", "d_k"};
  for (int shortened = -1; shortened < 8; ++shortened) {
    const char* name = shortened < 0 ? "none" : shortened < 7 ? names[shortened] : "d_v";
    SCOPED_TRACE(std::string("short: ") + name);
    std::vector<double> d_q(q_size, sentinel), d_k(kv_size, sentinel), d_v(kv_size, sentinel);
    auto view = [&](auto& buffer, std::int64_t heads, int index) {
      auto checked = da::contiguous_view(buffer, shape, heads);
      if (index == shortened) --checked.extent;
      return checked;
    };
    auto call = [&] {
      da::reference::backward<double>(
          config, shape,
          {view(q, shape.num_heads, 0), view(k, shape.num_kv_heads, 1),
           view(v, shape.num_kv_heads, 2)},
          {view(out, shape.num_heads, 3), lse.data()}, view(d_out, shape.num_heads, 4),
          {view(d_q, shape.num_heads, 5), view(d_k, shape.num_kv_heads, 6),
           view(d_v, shape.num_kv_heads, 7)});
    };
    if (shortened < 0) {
      ASSERT_NO_THROW(call());
      EXPECT_NE(d_q[0], sentinel);
      continue;
    }
    const std::int64_t buffer = (shortened == 1 || shortened == 2 || shortened >= 6)
                                    ? static_cast<std::int64_t>(kv_size)
                                    : static_cast<std::int64_t>(q_size);
    try {
      call();
      ADD_FAILURE() << "no exception was thrown";
    } catch (const std::invalid_argument& error) {
      EXPECT_THAT(error.what(),
                  HasSubstr(std::string(name) + " reaches element " + std::to_string(buffer - 1)));
      EXPECT_THAT(error.what(), HasSubstr("holds " + std::to_string(buffer - 1) + " elements"));
    }
    for (const auto* gradient : {&d_q, &d_k, &d_v})
      for (const double x : *gradient) ASSERT_EQ(x, sentinel) << "a gradient was written";
  }
}

// The case that motivated the check: a q view laid out for head_dim 128 over a buffer sized for
// head_dim 64 reads past its end; with the vector's size attached the call refuses.
TEST(CheckedView, ViewForAWiderHeadIsRejected) {
  da::Config config;
  config.segment_lengths = {16};
  config.dilation_rates = {1};
  const da::Shape shape{1, 32, 2, 2, 64};
  const da::Shape wide{1, 32, 2, 2, 128};
  const std::size_t elements = 1 * 32 * 2 * 64;
  std::vector<float> q(elements, 0.5f), k(elements, 0.25f), v(elements, 1.0f),
      out(elements, float(sentinel));
  try {
    da::forward<float>(config, shape,
                       {da::contiguous_view(q, wide, wide.num_heads),
                        da::contiguous_view(k, shape, shape.num_kv_heads),
                        da::contiguous_view(v, shape, shape.num_kv_heads)},
                       {da::contiguous_view(out, shape, shape.num_heads)});
    ADD_FAILURE() << "no exception was thrown";
  } catch (const std::invalid_argument& error) {
    // Last element reached: row 31 at seq stride 256, head 1 at head stride 128, element 63.
    EXPECT_THAT(error.what(),
                HasSubstr("q reaches element " + std::to_string(31 * 256 + 128 + 63)));
    EXPECT_THAT(error.what(), HasSubstr("holds " + std::to_string(elements) + " elements"));
  }
  for (const float x : out) ASSERT_EQ(x, float(sentinel));
  // The right view over the same buffer is accepted.
  EXPECT_NO_THROW(da::forward<float>(config, shape,
                                     {da::contiguous_view(q, shape, shape.num_heads),
                                      da::contiguous_view(k, shape, shape.num_kv_heads),
                                      da::contiguous_view(v, shape, shape.num_kv_heads)},
                                     {da::contiguous_view(out, shape, shape.num_heads)}));
}

}  // namespace
