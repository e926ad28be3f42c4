// One test per docs/semantics.md "Bad input" error, through reference::forward: each must raise std::invalid_argument
// whose message names the parameter and its value, before a single output element (O or LSE)
// is written. The CPU kernel and the ring call the same validate(); their own tests cover their
// entry points. A last group checks that valid edge cases are not rejected.

#include <dilated_attention/reference.hpp>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "support/tensors.hpp"

namespace da = dilated_attention;
namespace dt = dilated_attention::testing;
using ::testing::HasSubstr;

namespace {

constexpr double sentinel_value = 12345.5;

da::Config valid_config() {
  da::Config config;
  config.segment_lengths = {6, 4};
  config.dilation_rates = {2, 3};
  return config;
}

// A valid problem with sentinel-filled outputs. Each test breaks one thing and calls forward().
template <class T>
struct Problem {
  da::Config config = valid_config();
  da::Shape shape{2, 10, 4, 2, 3};
  dt::Inputs<T> in = dt::random_inputs<T>(shape, 7);
  dt::Tensor<T> out_tensor{shape, shape.num_heads};
  std::vector<da::lse_type_t<T>> lse_storage =
      std::vector<da::lse_type_t<T>>(dt::lse_size(shape), da::lse_type_t<T>(sentinel_value));
  // What forward() receives; tests edit these.
  da::View<const T> q = in.q.view(), k = in.k.view(), v = in.v.view();
  da::View<T> out = out_tensor.view();
  da::lse_type_t<T>* lse = lse_storage.data();

  Problem() { out_tensor.fill(T(sentinel_value)); }

  void forward() const { da::reference::forward(config, shape, {q, k, v}, da::Outputs{out, lse}); }

  bool outputs_untouched() const {
    for (const T value : out_tensor.storage)
      if (!(value == T(sentinel_value))) return false;
    for (const auto value : lse_storage)
      if (!(value == da::lse_type_t<T>(sentinel_value))) return false;
    return true;
  }
};

// Runs `call`, expects std::invalid_argument with every one of `parts` in its message.
void expect_rejected(const std::function<void()>& call, const std::vector<std::string>& parts) {
  try {
    call();
    ADD_FAILURE() << "no exception was thrown";
  } catch (const std::invalid_argument& error) {
    EXPECT_THAT(error.what(), HasSubstr("dilated_attention: "));
    for (const std::string& part : parts) EXPECT_THAT(error.what(), HasSubstr(part));
  } catch (const std::exception& error) {
    ADD_FAILURE() << "wrong exception type: " << error.what();
  }
}

template <class T>
void expect_rejected(const Problem<T>& p, const std::vector<std::string>& parts) {
  expect_rejected([&] { p.forward(); }, parts);
  EXPECT_TRUE(p.outputs_untouched()) << "an output was written before the error";
}

// ---------------------------------------------------------------------------------------------
// Config

TEST(Validation, EmptyBranchList) {
  Problem<double> p;
  p.config.segment_lengths.clear();
  p.config.dilation_rates.clear();
  expect_rejected(p, {"config.segment_lengths is empty", "at least one branch"});
}

TEST(Validation, MismatchedBranchLists) {
  Problem<double> p;
  p.config.dilation_rates = {2};
  expect_rejected(p, {"config.dilation_rates has 1 entries", "config.segment_lengths has 2"});
  p.config.dilation_rates = {2, 3, 1};
  expect_rejected(p, {"config.dilation_rates has 3 entries", "config.segment_lengths has 2"});
  p.config.segment_lengths.clear();
  expect_rejected(p, {"config.segment_lengths is empty"});
}

TEST(Validation, NonPositiveSegmentLength) {
  Problem<double> p;
  p.config.segment_lengths = {6, 0};
  expect_rejected(p, {"config.segment_lengths[1] = 0", "positive"});
  p.config.segment_lengths = {-3, 4};
  expect_rejected(p, {"config.segment_lengths[0] = -3", "positive"});
}

TEST(Validation, NonPositiveDilationRate) {
  Problem<double> p;
  p.config.dilation_rates = {2, 0};
  expect_rejected(p, {"config.dilation_rates[1] = 0", "positive"});
  p.config.dilation_rates = {-1, 3};
  expect_rejected(p, {"config.dilation_rates[0] = -1", "positive"});
}

TEST(Validation, RateAboveSegmentLength) {
  Problem<double> p;
  p.config.segment_lengths = {6, 16};
  p.config.dilation_rates = {2, 17};
  expect_rejected(p, {"config.dilation_rates[1] = 17", "config.segment_lengths[1] = 16", "r <= w"});
}

TEST(Validation, NonFiniteScale) {
  Problem<double> p;
  p.config.scale = std::numeric_limits<double>::quiet_NaN();
  expect_rejected(p, {"config.scale = nan", "finite"});
  p.config.scale = std::numeric_limits<double>::infinity();
  expect_rejected(p, {"config.scale = inf", "finite"});
  p.config.scale = -std::numeric_limits<double>::infinity();
  expect_rejected(p, {"config.scale = -inf", "finite"});
}

TEST(Validation, NegativeScale) {
  Problem<double> p;
  p.config.scale = -0.5;
  expect_rejected(p, {"config.scale = -0.5", "non-negative"});
}

TEST(Validation, UnknownEnumerators) {
  Problem<double> p;
  p.config.offsets = static_cast<da::OffsetRule>(7);
  expect_rejected(p, {"config.offsets = 7"});
  p.config.offsets = da::OffsetRule::modular;
  p.config.mixing = static_cast<da::Mixing>(9);
  expect_rejected(p, {"config.mixing = 9"});
}

// ---------------------------------------------------------------------------------------------
// Shape (the buffers stay those of the valid shape; nothing may be read or written anyway)

TEST(Validation, NonPositiveShapeFields) {
  struct Field {
    const char* name;
    std::int64_t da::Shape::*member;
  };
  const Field fields[] = {{"batch", &da::Shape::batch},
                          {"seq_len", &da::Shape::seq_len},
                          {"num_heads", &da::Shape::num_heads},
                          {"num_kv_heads", &da::Shape::num_kv_heads},
                          {"head_dim", &da::Shape::head_dim}};
  for (const Field& field : fields)
    for (const std::int64_t value : {0, -2}) {
      Problem<double> p;
      p.shape.*field.member = value;
      SCOPED_TRACE(field.name);
      expect_rejected(
          p, {std::string("shape.") + field.name + " = " + std::to_string(value), "positive"});
    }
}

TEST(Validation, HeadsNotMultipleOfKvHeads) {
  Problem<double> p;
  p.shape.num_kv_heads = 3;
  expect_rejected(p, {"shape.num_heads = 4", "shape.num_kv_heads = 3", "num_heads % num_kv_heads"});
}

TEST(Validation, PartitionedWithFewerHeadsThanBranches) {
  Problem<double> p;
  p.config.offsets = da::OffsetRule::partitioned;
  p.config.segment_lengths = {4, 6, 8};
  p.config.dilation_rates = {1, 2, 3};
  p.shape.num_heads = 2;
  expect_rejected(p, {"shape.num_heads = 2", "3 branches", "partitioned"});
}

TEST(Validation, SizeBeyondIndexRange) {
  Problem<double> p;
  p.shape = {std::int64_t{1} << 22, std::int64_t{1} << 22, std::int64_t{1} << 12, 1,
             std::int64_t{1} << 8};
  expect_rejected(p, {"shape [", "2^62"});
}

// ---------------------------------------------------------------------------------------------
// Views

TEST(Validation, NullData) {
  for (const char* name : {"q", "k", "v", "out"}) {
    Problem<double> p;
    const std::string which = name;
    if (which == "q") p.q.data = nullptr;
    if (which == "k") p.k.data = nullptr;
    if (which == "v") p.v.data = nullptr;
    if (which == "out") p.out.data = nullptr;
    SCOPED_TRACE(which);
    expect_rejected(p, {which + ".data is null"});
  }
}

TEST(Validation, NegativeStrides) {
  // A view that walks backwards from its last row: legal memory, illegal stride.
  Problem<double> p;
  p.q = {p.in.q.storage.data() + (p.shape.seq_len - 1) * p.in.q.seq_stride, p.in.q.batch_stride,
         -p.in.q.seq_stride, p.in.q.head_stride};
  expect_rejected(p, {"q strides", "seq -12", "non-negative"});

  Problem<double> r;
  r.v.head_stride = -r.v.head_stride;
  r.v.data += r.in.v.head_stride;  // head 1 first, then head 0
  expect_rejected(r, {"v strides", "head -3", "non-negative"});

  Problem<double> o;
  o.out.batch_stride = -o.out.batch_stride;
  o.out.data += o.out_tensor.batch_stride;
  expect_rejected(o, {"out strides", "batch -120", "non-negative"});
}

TEST(Validation, OutputElementsThatShareMemory) {
  Problem<double> heads;  // every head writes the same place
  heads.out.head_stride = 0;
  expect_rejected(heads, {"out strides", "head 0", "share memory"});

  Problem<double> rows;  // row x + 1 starts inside row x
  rows.out.seq_stride = rows.shape.head_dim;
  expect_rejected(rows, {"out strides", "seq 3", "share memory"});

  Problem<double> dims;  // heads closer together than head_dim
  dims.out.head_stride = dims.shape.head_dim - 1;
  expect_rejected(dims, {"out strides", "head 2", "share memory"});

  Problem<double> batches;  // both batches on the same rows
  batches.out.batch_stride = 0;
  expect_rejected(batches, {"out strides", "batch 0", "share memory"});

  Problem<double> interleaved;  // seq and head strides that collide: x * 8 + h * 3 repeats
  interleaved.out.seq_stride = 8;
  interleaved.out.head_stride = 3;
  expect_rejected(interleaved, {"out strides", "seq 8", "share memory"});
}

// Regression: strides whose span overflows int64 byte offsets used to pass validation (signed
// overflow, then writes at wrapped addresses). Now they are rejected like any other bad view.
TEST(Validation, StridesBeyondAddressRange) {
  Problem<double> out;
  out.out.batch_stride = std::int64_t{1} << 62;
  expect_rejected(out, {"out strides", "batch 4611686018427387904", "2^62"});

  Problem<double> q;
  q.q.seq_stride = std::numeric_limits<std::int64_t>::max() / 4;
  expect_rejected(q, {"q strides", "2^62"});

  Problem<double> k;  // each stride alone is fine, their sum is not
  k.k.batch_stride = std::int64_t{1} << 59;
  k.k.head_stride = std::int64_t{1} << 59;
  k.k.seq_stride = std::int64_t{1} << 55;
  expect_rejected(k, {"k strides", "2^62"});
}

// An arena holding one input and the output, the output starting `shift` elements before the
// input's last element, so that the two overlap by `shift + 1` elements.
TEST(Validation, OutputOverlapsAnInput) {
  for (const char* name : {"q", "k", "v"}) {
    Problem<double> p;
    const std::string which = name;
    const std::int64_t in_size = p.shape.batch * p.shape.seq_len * p.shape.head_dim *
                                 (which == "q" ? p.shape.num_heads : p.shape.num_kv_heads);
    const std::int64_t out_size =
        p.shape.batch * p.shape.seq_len * p.shape.num_heads * p.shape.head_dim;
    std::vector<double> arena(static_cast<std::size_t>(in_size + out_size), 1.0);
    double* input = arena.data();
    double* output = arena.data() + in_size - 1;  // one element in common
    const da::View<const double> in_view = da::contiguous_view<const double>(
        input, p.shape, which == "q" ? p.shape.num_heads : p.shape.num_kv_heads);
    if (which == "q") p.q = in_view;
    if (which == "k") p.k = in_view;
    if (which == "v") p.v = in_view;
    p.out = da::contiguous_view(output, p.shape, p.shape.num_heads);
    const std::vector<double> before = arena;
    SCOPED_TRACE(which);
    expect_rejected(p, {"out overlaps " + which, "share memory"});
    EXPECT_EQ(arena, before) << "the arena was written";
  }
  // The output written over the input it reads, exactly.
  Problem<double> same;
  same.out = same.in.q.view();
  const std::vector<double> q_before = same.in.q.storage;
  expect_rejected([&] { same.forward(); }, {"out overlaps q"});
  EXPECT_EQ(same.in.q.storage, q_before);
}

TEST(Validation, LseOverlapsOutOrAnInput) {
  {
    Problem<double> p;
    p.lse = p.out_tensor.storage.data() + 5;
    const std::vector<double> before = p.out_tensor.storage;
    expect_rejected([&] { p.forward(); }, {"lse overlaps out"});
    EXPECT_EQ(p.out_tensor.storage, before);
    for (const double value : p.lse_storage) EXPECT_EQ(value, sentinel_value);
  }
  for (const char* name : {"q", "k", "v"}) {
    Problem<double> p;
    const std::string which = name;
    dt::Tensor<double>& input = which == "q" ? p.in.q : which == "k" ? p.in.k : p.in.v;
    // The LSE array ends on the input's first element.
    std::vector<double> arena(dt::lse_size(p.shape) - 1 + input.storage.size(), sentinel_value);
    std::copy(input.storage.begin(), input.storage.end(),
              arena.begin() + static_cast<std::ptrdiff_t>(dt::lse_size(p.shape) - 1));
    const da::View<const double> moved{arena.data() + dt::lse_size(p.shape) - 1, input.batch_stride,
                                       input.seq_stride, input.head_stride};
    if (which == "q") p.q = moved;
    if (which == "k") p.k = moved;
    if (which == "v") p.v = moved;
    p.lse = arena.data();
    const std::vector<double> before = arena;
    SCOPED_TRACE(which);
    expect_rejected([&] { p.forward(); }, {"lse overlaps " + which});
    EXPECT_EQ(arena, before);
    for (const double value : p.out_tensor.storage) EXPECT_EQ(value, sentinel_value);
  }
}

// The same rules hold for float storage, whose LSE is float.
TEST(Validation, FloatStorage) {
  Problem<float> scale;
  scale.config.scale = -1.0;
  expect_rejected(scale, {"config.scale = -1"});
  Problem<float> overlap;
  overlap.lse = overlap.out_tensor.storage.data();
  expect_rejected([&] { overlap.forward(); }, {"lse overlaps out"});
  for (const float value : overlap.out_tensor.storage) EXPECT_EQ(value, float(sentinel_value));
  Problem<float> rate;
  rate.config.dilation_rates = {7, 3};
  expect_rejected(rate, {"config.dilation_rates[0] = 7", "config.segment_lengths[0] = 6"});
}

// ---------------------------------------------------------------------------------------------
// Valid edge cases must pass

TEST(Validation, AcceptsValidEdgeCases) {
  const auto accepted = [](Problem<double>& p) {
    EXPECT_NO_THROW(p.forward());
    EXPECT_FALSE(p.outputs_untouched());
  };
  {
    Problem<double> p;  // r == w, w far beyond N, one K/V head
    p.config.segment_lengths = {5, 1000};
    p.config.dilation_rates = {5, 1000};
    p.shape.num_kv_heads = 1;
    accepted(p);
  }
  {
    Problem<double> p;  // the default scale spelled 0 and -0
    p.config.scale = -0.0;
    accepted(p);
  }
  {
    Problem<double> p;  // partitioned with exactly one head per branch
    p.config.offsets = da::OffsetRule::partitioned;
    p.config.segment_lengths = {4, 6, 8, 10};
    p.config.dilation_rates = {1, 2, 3, 4};
    accepted(p);
  }
  {
    Problem<double> p;  // broadcast inputs: zero strides are fine for reading
    p.k.batch_stride = 0;
    p.v.batch_stride = 0;
    p.q.head_stride = 0;
    accepted(p);
  }
  {
    Problem<double> p;  // no LSE
    p.lse = nullptr;
    EXPECT_NO_THROW(p.forward());
  }
  {
    // Output, LSE and inputs back to back in one arena: touching, not overlapping.
    Problem<double> p;
    const std::size_t q_size = p.in.q.storage.size(), kv_size = p.in.k.storage.size();
    const std::size_t out_size = p.out_tensor.storage.size(), lse_size = dt::lse_size(p.shape);
    std::vector<double> arena(q_size + out_size + lse_size + 2 * kv_size);
    double* q = arena.data();
    double* out = q + q_size;
    double* lse = out + out_size;
    double* k = lse + lse_size;
    double* v = k + kv_size;
    std::copy(p.in.q.storage.begin(), p.in.q.storage.end(), q);
    std::copy(p.in.k.storage.begin(), p.in.k.storage.end(), k);
    std::copy(p.in.v.storage.begin(), p.in.v.storage.end(), v);
    p.q = da::contiguous_view<const double>(q, p.shape, p.shape.num_heads);
    p.k = da::contiguous_view<const double>(k, p.shape, p.shape.num_kv_heads);
    p.v = da::contiguous_view<const double>(v, p.shape, p.shape.num_kv_heads);
    p.out = da::contiguous_view(out, p.shape, p.shape.num_heads);
    p.lse = lse;
    EXPECT_NO_THROW(p.forward());
    // And the result is the one from separate buffers.
    Problem<double> separate;
    separate.forward();
    for (std::size_t j = 0; j < out_size; ++j) EXPECT_EQ(out[j], separate.out_tensor.storage[j]);
    for (std::size_t j = 0; j < lse_size; ++j) EXPECT_EQ(lse[j], separate.lse_storage[j]);
  }
  {
    Problem<double> p;  // an output with padding between heads and rows
    dt::Tensor<double> padded(p.shape, p.shape.num_heads, 2, 5);
    p.out = padded.view();
    EXPECT_NO_THROW(p.forward());
  }
  {
    Problem<double> p;  // heads outermost in memory: strides need not be ordered
    dt::Tensor<double> storage(p.shape, p.shape.num_heads);
    p.out = {storage.storage.data(), p.shape.seq_len * p.shape.head_dim, p.shape.head_dim,
             p.shape.batch * p.shape.seq_len * p.shape.head_dim};
    EXPECT_NO_THROW(p.forward());
  }
}

}  // namespace
