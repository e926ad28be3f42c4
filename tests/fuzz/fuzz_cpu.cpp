// Fuzz target over validate() and the fast CPU forward and backward (float and double).
//
// The bytes decode into a small problem: a config of 1-3 branches (w in 1..40, r in 1..w, now
// and then an invalid one: zero or negative lengths, r > w, mismatched branch lists, a NaN,
// infinite or negative scale, an enum value outside the enum), a shape (batch 1-2, seq 1-48,
// heads / kv heads, head_dim 1-16, now and then zero, negative or H % Hkv != 0), a layout per
// tensor (contiguous, padded, broadcast stride 0 on an input, self-overlapping output, negative
// stride, an extent one element too small, an output inside an input), causal, offset rule,
// mixing, thread count, and values (normal, +-inf, NaN, 1e30, denormals, all equal). Then:
//   * nothing crashes, and every rejection is std::invalid_argument (anything else aborts);
//   * validate(), reference::forward and cpu::forward accept or reject together, and so do
//     validate_backward(), reference::backward and cpu::backward;
//   * a call that throws leaves every output buffer bitwise equal to its sentinel fill;
//   * finite accepted inputs: cpu::forward equals reference::forward and cpu::backward equals
//     reference::backward, to 1e-10 (double) or 2e-5 (float) relative to the tensor's scale;
//   * non-finite inputs (docs/semantics.md, "Non-finite inputs"): no exception, no crash; a row
//     the reference finds finite is finite and equal in the fast forward, and a row the reference
//     finds non-finite is non-finite in the fast forward (and has a non-finite LSE or output).
// tests/fuzz/fuzz_driver.cpp replays a corpus and random inputs through the same entry point;
// tests/fuzz/fuzz.cmake builds both that driver and, with clang, a libFuzzer binary.

#include <dilated_attention/dilated_attention.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

namespace da = dilated_attention;

// Reads the input byte by byte; past the end every read is 0, so short inputs decode to the
// simplest (valid, contiguous, normal-valued) problem.
struct Bytes {
  const std::uint8_t* data;
  std::size_t size, at = 0;
  std::uint8_t next() { return at < size ? data[at++] : 0; }
  // An integer in [lo, hi].
  std::int64_t range(std::int64_t lo, std::int64_t hi) {
    const std::uint16_t v = static_cast<std::uint16_t>(next() | (next() << 8));
    return lo + static_cast<std::int64_t>(v % static_cast<std::uint64_t>(hi - lo + 1));
  }
  // True with probability about 1/n; false past the end.
  bool one_in(int n) {
    if (at >= size) return false;
    return next() % n == 0;
  }
};

// splitmix64, for the bulk of the values.
struct Random {
  std::uint64_t state;
  std::uint64_t next() {
    std::uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform(double lo, double hi) { return lo + (hi - lo) * (next() >> 11) * 0x1p-53; }
};

// What is being checked, printed by fail().
std::string current;

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "fuzz_cpu: %s\n  problem: %s\n", what, current.c_str());
  std::abort();
}

// How a tensor's view is laid out.
enum class Layout {
  contiguous,
  padded,
  broadcast,
  overlapping,
  negative,
  too_small,
  unknown_extent,
  inside_input,
  count
};

struct TensorSpec {
  Layout layout = Layout::contiguous;
  std::int64_t pad_head = 0, pad_seq = 0;
  int broadcast_dim = 0;
};

struct Problem {
  da::Config config;
  da::Shape shape{1, 1, 1, 1, 1};
  TensorSpec q, k, v, out, d_out, d_q, d_k, d_v;
  bool lse_null = false, backward_lse_null = false;
  int threads = 1;
  da::CpuIsa isa = da::CpuIsa::automatic;
  // Values.
  int value_mode = 0;  // 0 normal, 1 all equal, 2 tiny (denormal) values
  struct Special {
    int tensor;  // 0 q, 1 k, 2 v, 3 d_out
    std::uint32_t index;
    int kind;  // 0 +inf, 1 -inf, 2 NaN, 3 1e30, 4 -1e30, 5 denormal
  };
  std::vector<Special> specials;
  std::uint64_t seed = 0;
};

TensorSpec decode_layout(Bytes& in, bool input) {
  TensorSpec spec;
  const int pick = in.next() % 24;
  if (pick < 10)
    spec.layout = Layout::contiguous;
  else if (pick < 15)
    spec.layout = Layout::padded;
  else if (pick < 17)
    spec.layout = Layout::unknown_extent;
  else if (pick == 17)
    spec.layout = input ? Layout::broadcast : Layout::overlapping;
  else if (pick == 18)
    spec.layout = Layout::broadcast;  // on an output: rejected unless trivial
  else if (pick == 19)
    spec.layout = Layout::negative;
  else if (pick == 20)
    spec.layout = Layout::too_small;
  else if (pick == 21)
    spec.layout = input ? Layout::padded : Layout::inside_input;
  else
    spec.layout = Layout::padded;
  spec.pad_head = in.range(0, 3);
  spec.pad_seq = in.range(0, 2);
  spec.broadcast_dim = static_cast<int>(in.range(0, 2));
  return spec;
}

Problem decode(const std::uint8_t* data, std::size_t size) {
  Bytes in{data, size};
  Problem p;
  const std::int64_t branches = in.range(1, 3);
  for (std::int64_t i = 0; i < branches; ++i) {
    std::int64_t w = in.range(1, 40);
    std::int64_t r = in.range(1, w);
    if (in.one_in(24)) w = in.range(-2, 0);
    if (in.one_in(24)) r = in.one_in(2) ? in.range(-2, 0) : w + in.range(1, 3);
    p.config.segment_lengths.push_back(w);
    p.config.dilation_rates.push_back(r);
  }
  if (in.one_in(32)) p.config.dilation_rates.push_back(1);
  if (in.one_in(48)) p.config.dilation_rates.pop_back();
  if (in.one_in(64)) p.config.segment_lengths.clear();
  p.config.causal = in.next() & 1;
  const int offsets = in.next() % 16, mixing = in.next() % 16;
  p.config.offsets = static_cast<da::OffsetRule>(offsets < 15 ? offsets % 3 : 3 + in.next());
  p.config.mixing = static_cast<da::Mixing>(mixing < 15 ? mixing % 2 : 2 + in.next());
  switch (in.next() % 16) {
    case 0: p.config.scale = std::numeric_limits<double>::quiet_NaN(); break;
    case 1: p.config.scale = -0.5; break;
    case 2: p.config.scale = std::numeric_limits<double>::infinity(); break;
    case 3:
    case 4:
    case 5: p.config.scale = 0.05 + 0.01 * static_cast<double>(in.range(0, 195)); break;
    default: p.config.scale = 0.0;
  }

  const std::int64_t kv = in.range(1, 3), group = in.range(1, 3);
  p.shape = {in.range(1, 2), in.range(1, 48), kv * group, kv, in.range(1, 16)};
  switch (in.next() % 32) {
    case 0: p.shape.batch = in.range(-1, 0); break;
    case 1: p.shape.seq_len = in.range(-1, 0); break;
    case 2: p.shape.num_heads = in.range(-1, 0); break;
    case 3: p.shape.num_kv_heads = in.range(-1, 0); break;
    case 4: p.shape.head_dim = in.range(-1, 0); break;
    case 5: p.shape.num_kv_heads = p.shape.num_heads + 1; break;  // H % Hkv != 0
    case 6:
      if (p.shape.num_kv_heads == 2) p.shape.num_heads = 3;
      break;
    default: break;
  }

  p.q = decode_layout(in, true);
  p.k = decode_layout(in, true);
  p.v = decode_layout(in, true);
  p.out = decode_layout(in, false);
  p.d_out = decode_layout(in, true);
  p.d_q = decode_layout(in, false);
  p.d_k = decode_layout(in, false);
  p.d_v = decode_layout(in, false);
  p.lse_null = in.one_in(8);
  p.backward_lse_null = in.one_in(32);
  p.threads = static_cast<int>(in.range(1, 3));
  p.isa = in.one_in(3) ? da::CpuIsa::generic : da::CpuIsa::automatic;

  const int values = in.next() % 16;
  p.value_mode = values == 0 ? 1 : (values == 1 ? 2 : 0);
  const std::int64_t specials = in.one_in(2) ? 0 : in.range(0, 3);
  for (std::int64_t i = 0; i < specials; ++i) {
    Problem::Special s;
    s.tensor = static_cast<int>(in.range(0, 3));
    s.index = static_cast<std::uint32_t>(in.range(0, 65535));
    s.kind = static_cast<int>(in.range(0, 5));
    p.specials.push_back(s);
  }
  p.seed = 0x243F6A8885A308D3ull;
  for (std::size_t i = 0; i < size; ++i) p.seed = (p.seed ^ data[i]) * 0x100000001B3ull;
  return p;
}

std::string describe(const Problem& p, const char* type) {
  std::ostringstream s;
  s << type << " w=[";
  for (auto w : p.config.segment_lengths) s << w << " ";
  s << "] r=[";
  for (auto r : p.config.dilation_rates) s << r << " ";
  s << "] causal=" << p.config.causal << " offsets=" << static_cast<int>(p.config.offsets)
    << " mixing=" << static_cast<int>(p.config.mixing) << " scale=" << p.config.scale << " shape=["
    << p.shape.batch << " " << p.shape.seq_len << " " << p.shape.num_heads << " "
    << p.shape.num_kv_heads << " " << p.shape.head_dim << "] layouts(q k v out dout dq dk dv)=";
  for (const TensorSpec* t : {&p.q, &p.k, &p.v, &p.out, &p.d_out, &p.d_q, &p.d_k, &p.d_v})
    s << static_cast<int>(t->layout) << "/" << t->pad_head << t->pad_seq << t->broadcast_dim << " ";
  s << "lse_null=" << p.lse_null << " threads=" << p.threads << " isa=" << static_cast<int>(p.isa)
    << " values=" << p.value_mode << " specials(tensor:index:kind)=";
  for (const auto& sp : p.specials) s << sp.tensor << ":" << sp.index << ":" << sp.kind << " ";
  return s.str();
}

bool shape_positive(const da::Shape& s) {
  return s.batch > 0 && s.seq_len > 0 && s.num_heads > 0 && s.num_kv_heads > 0 && s.head_dim > 0;
}

// A tensor's buffer and its view. The buffer always holds every element the view can reach
// (except for Layout::too_small, whose extent says so and must be rejected).
template <class T>
struct Buffer {
  std::vector<T> storage;
  da::View<T> view{nullptr, 0, 0, 0};
};

// Builds the view of `spec` for `heads` heads; `input_base`, when given, is where an
// inside_input output points (an input's buffer, so that validate() must see the overlap).
template <class T>
void make_view(Buffer<T>& buffer, const TensorSpec& spec, const da::Shape& shape,
               std::int64_t heads, T* input_base = nullptr, std::int64_t input_size = 0) {
  const bool positive = shape_positive(shape) && heads > 0;
  const std::int64_t dim = positive ? shape.head_dim : 1, n = positive ? shape.seq_len : 1,
                     b = positive ? shape.batch : 1, h = positive ? heads : 1;
  std::int64_t hs = dim, ss = h * dim, bs = n * h * dim;
  switch (spec.layout) {
    case Layout::padded:
    case Layout::unknown_extent:
    case Layout::too_small:
    case Layout::inside_input:
      hs = dim + spec.pad_head;
      ss = h * hs + spec.pad_seq * dim;
      bs = n * ss + spec.pad_seq;
      break;
    case Layout::broadcast:
      if (spec.broadcast_dim == 0)
        bs = 0;
      else if (spec.broadcast_dim == 1)
        ss = 0;
      else
        hs = 0;
      break;
    case Layout::overlapping:
      hs = std::max<std::int64_t>(0, dim - 1);  // heads share their last elements (when h > 1)
      ss = h * dim;
      bs = n * ss;
      break;
    case Layout::negative:
      if (spec.broadcast_dim == 0)
        bs = -bs;
      else if (spec.broadcast_dim == 1)
        ss = -ss;
      else
        hs = -hs;
      break;
    default: break;
  }
  const std::int64_t highest = (b - 1) * std::max<std::int64_t>(bs, 0) +
                               (n - 1) * std::max<std::int64_t>(ss, 0) +
                               (h - 1) * std::max<std::int64_t>(hs, 0) + dim - 1;
  if (spec.layout == Layout::inside_input && input_base != nullptr) {
    buffer.storage.clear();
    buffer.view = da::View<T>{input_base, bs, ss, hs, input_size};
    return;
  }
  const std::int64_t count = spec.layout == Layout::too_small ? highest : highest + 1;
  buffer.storage.assign(static_cast<std::size_t>(std::max<std::int64_t>(count, 1)), T(0));
  const std::int64_t extent = spec.layout == Layout::unknown_extent ? -1 : count;
  buffer.view = da::View<T>{buffer.storage.data(), bs, ss, hs, extent};
}

double special_value(int kind) {
  switch (kind) {
    case 0: return std::numeric_limits<double>::infinity();
    case 1: return -std::numeric_limits<double>::infinity();
    case 2: return std::numeric_limits<double>::quiet_NaN();
    case 3: return 1e30;
    case 4: return -1e30;
    default: return 1e-310;  // denormal in double; flushes to 0 in float
  }
}

template <class T>
void fill(Buffer<T>& buffer, Random& random, int mode, int tensor, const Problem& p) {
  const double constant = random.uniform(-1, 1);
  for (T& x : buffer.storage) {
    if (mode == 1)
      x = static_cast<T>(constant);
    else if (mode == 2)
      x = static_cast<T>(random.uniform(-1, 1) * 1e-39);
    else
      x = static_cast<T>(random.uniform(-2, 2));
  }
  if (buffer.storage.empty()) return;
  for (const Problem::Special& s : p.specials)
    if (s.tensor == tensor)
      buffer.storage[s.index % buffer.storage.size()] = static_cast<T>(special_value(s.kind));
}

// Counts of what non-finite inputs did, printed at exit when FUZZ_CPU_STATS is set.
struct Stats {
  long clean_rows = 0, tainted_rows = 0, tainted_fast_nonfinite = 0, tainted_ref_nonfinite = 0,
       tainted_disagree = 0, tainted_fast_nan = 0, calls = 0, forward_accepted = 0,
       forward_compared = 0, backward_accepted = 0, backward_compared = 0;
  ~Stats() {
    if (std::getenv("FUZZ_CPU_STATS") != nullptr)
      std::fprintf(stderr,
                   "fuzz_cpu stats: rows reading only finite values next to non-finite ones %ld; "
                   "rows reading a non-finite value %ld: fast non-finite %ld (NaN %ld), reference "
                   "non-finite %ld, finiteness differs %ld; checks %ld: forward accepted %ld, "
                   "compared %ld; backward accepted %ld, compared %ld\n",
                   clean_rows, tainted_rows, tainted_fast_nonfinite, tainted_fast_nan,
                   tainted_ref_nonfinite, tainted_disagree, calls, forward_accepted,
                   forward_compared, backward_accepted, backward_compared);
  }
};
Stats& stats() {
  static Stats s;
  return s;
}

template <class T>
bool all_finite(const std::vector<T>& values) {
  for (T x : values)
    if (!std::isfinite(static_cast<double>(x))) return false;
  return true;
}
template <class T>
double max_abs(const std::vector<T>& values) {
  double m = 0;
  for (T x : values) m = std::max(m, std::abs(static_cast<double>(x)));
  return m;
}

// The sentinel every output buffer holds before a call; a call that throws must leave it.
template <class T>
T sentinel() {
  return static_cast<T>(-1234.5);
}
// Bitwise equality (NaN equals itself here).
template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}
template <class T>
bool untouched(const std::vector<T>& values) {
  const T s = sentinel<T>();
  for (const T& x : values)
    if (std::memcmp(&x, &s, sizeof(T)) != 0) return false;
  return true;
}

// Runs `call`; returns true when it returned, false when it raised std::invalid_argument, and
// aborts on any other exception.
template <class F>
bool accepted(F&& call) {
  try {
    call();
    return true;
  } catch (const std::invalid_argument&) {
    return false;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fuzz_cpu: unexpected exception: %s\n", e.what());
    std::abort();
  } catch (...) {
    fail("unexpected non-standard exception");
  }
}

// Element (b, x, h, d) of a view.
template <class T>
double at(const da::View<T>& view, std::int64_t b, std::int64_t x, std::int64_t h, std::int64_t d) {
  return static_cast<double>(
      view.data[b * view.batch_stride + x * view.seq_stride + h * view.head_stride + d]);
}

// Max |a - b| over the shape of two views of `heads` heads.
template <class A, class B>
double max_diff(const da::View<A>& a, const da::View<B>& b, const da::Shape& s,
                std::int64_t heads) {
  double m = 0;
  for (std::int64_t i = 0; i < s.batch; ++i)
    for (std::int64_t x = 0; x < s.seq_len; ++x)
      for (std::int64_t h = 0; h < heads; ++h)
        for (std::int64_t d = 0; d < s.head_dim; ++d) {
          const double diff = std::abs(at(a, i, x, h, d) - at(b, i, x, h, d));
          if (!(diff <= m)) m = diff;  // NaN makes m NaN, which fails every comparison
        }
  return m;
}
template <class A>
double max_abs_view(const da::View<A>& a, const da::Shape& s, std::int64_t heads) {
  double m = 0;
  for (std::int64_t i = 0; i < s.batch; ++i)
    for (std::int64_t x = 0; x < s.seq_len; ++x)
      for (std::int64_t h = 0; h < heads; ++h)
        for (std::int64_t d = 0; d < s.head_dim; ++d) m = std::max(m, std::abs(at(a, i, x, h, d)));
  return m;
}

template <class T>
da::View<const T> as_const(const da::View<T>& v) {
  return v;
}

template <class T>
void check(const Problem& p) {
  ++stats().calls;
  current = describe(p, std::is_same_v<T, double> ? "double" : "float");
  constexpr double base = std::is_same_v<T, double> ? 1e-10 : 2e-5;
  constexpr double eps = std::numeric_limits<T>::epsilon();
  const da::Shape& shape = p.shape;
  const std::int64_t heads = shape.num_heads, kv_heads = shape.num_kv_heads;
  Random random{p.seed};

  Buffer<T> q, k, v, d_out;
  make_view(q, p.q, shape, heads);
  make_view(k, p.k, shape, kv_heads);
  make_view(v, p.v, shape, kv_heads);
  make_view(d_out, p.d_out, shape, heads);
  fill(q, random, p.value_mode, 0, p);
  fill(k, random, p.value_mode, 1, p);
  fill(v, random, p.value_mode, 2, p);
  fill(d_out, random, p.value_mode, 3, p);

  Buffer<T> out, ref_out;
  make_view(out, p.out, shape, heads, q.storage.data(),
            static_cast<std::int64_t>(q.storage.size()));
  make_view(ref_out, p.out, shape, heads, q.storage.data(),
            static_cast<std::int64_t>(q.storage.size()));
  const std::size_t lse_count =
      shape_positive(shape) ? static_cast<std::size_t>(shape.batch * heads * shape.seq_len) : 1;
  using L = da::lse_type_t<T>;
  std::vector<L> lse(lse_count, sentinel<L>()), ref_lse(lse_count, sentinel<L>());
  std::fill(out.storage.begin(), out.storage.end(), sentinel<T>());
  std::fill(ref_out.storage.begin(), ref_out.storage.end(), sentinel<T>());
  L* lse_ptr = p.lse_null ? nullptr : lse.data();
  L* ref_lse_ptr = p.lse_null ? nullptr : ref_lse.data();
  const bool inside = p.out.layout == Layout::inside_input;
  std::vector<T> q_before = q.storage;

  const da::CpuOptions options{p.threads, p.isa};
  const bool valid = accepted([&] {
    da::validate(p.config, shape, as_const(q.view), as_const(k.view), as_const(v.view), out.view,
                 lse_ptr);
  });
  const bool fast_ok = accepted(
      [&] { da::forward<T>(p.config, shape, q.view, k.view, v.view, out.view, lse_ptr, options); });
  const bool ref_ok = accepted([&] {
    da::reference::forward<T>(p.config, shape, q.view, k.view, v.view, ref_out.view, ref_lse_ptr);
  });
  if (valid != fast_ok || valid != ref_ok)
    fail("validate, cpu::forward and reference::forward disagree");
  if (!valid) {
    if (!untouched(out.storage) || !untouched(ref_out.storage) || !untouched(lse) ||
        !untouched(ref_lse))
      fail("a rejected forward wrote to its output");
    if (inside && !same_bits(q.storage, q_before)) fail("a rejected forward wrote into an input");
    return;
  }
  if (inside) fail("an output inside an input was accepted");
  ++stats().forward_accepted;

  const bool finite = all_finite(q.storage) && all_finite(k.storage) && all_finite(v.storage);
  const double scale = da::resolved_scale(p.config, shape);
  const double score_bound =
      scale * max_abs(q.storage) * max_abs(k.storage) * static_cast<double>(shape.head_dim);
  const double v_scale = std::max(max_abs(v.storage), std::numeric_limits<double>::min());
  // Scores of magnitude S carry rounding of S * eps into exp(): allowed on top of `base`.
  const double relative = base + 8 * score_bound * eps;
  double finite_q = 0, finite_k = 0, finite_v = std::numeric_limits<double>::min();
  for (T x : q.storage)
    if (std::isfinite(double(x))) finite_q = std::max(finite_q, std::abs(double(x)));
  for (T x : k.storage)
    if (std::isfinite(double(x))) finite_k = std::max(finite_k, std::abs(double(x)));
  for (T x : v.storage)
    if (std::isfinite(double(x))) finite_v = std::max(finite_v, std::abs(double(x)));
  const double finite_bound = scale * finite_q * finite_k * static_cast<double>(shape.head_dim);
  const bool representable = score_bound < 1e30 && v_scale * 1e3 < std::numeric_limits<T>::max();
  if (finite && representable) {
    ++stats().forward_compared;
    const double diff = max_diff(out.view, ref_out.view, shape, heads);
    if (!(diff <= relative * v_scale)) {
      std::fprintf(stderr, "forward differs by %g (allowed %g)\n", diff, relative * v_scale);
      fail("cpu::forward differs from reference::forward");
    }
    if (lse_ptr != nullptr)
      for (std::size_t i = 0; i < lse.size(); ++i) {
        const double a = lse[i], b = ref_lse[i];
        if (std::isinf(b) ? a != b : !(std::abs(a - b) <= relative * (1 + std::abs(b))))
          fail("cpu::forward's LSE differs from reference::forward's");
      }
  } else if (!finite && finite_bound < 1e30) {
    // Non-finite inputs (docs/semantics.md, "Non-finite inputs"): a row none of whose inputs is
    // non-finite -- its q row, and the k and v rows of every key it attends -- equals the
    // reference; a row that reads a non-finite value is counted by what it became.
    const da::Pattern pattern(p.config, shape);
    auto row_finite = [&](const da::View<T>& view, std::int64_t b, std::int64_t x, std::int64_t h) {
      for (std::int64_t d = 0; d < shape.head_dim; ++d)
        if (!std::isfinite(at(view, b, x, h, d))) return false;
      return true;
    };
    const double allowed = (base + 8 * finite_bound * eps) * finite_v;
    for (std::int64_t b = 0; b < shape.batch; ++b)
      for (std::int64_t h = 0; h < heads; ++h)
        for (std::int64_t x = 0; x < shape.seq_len; ++x) {
          const std::int64_t g = pattern.kv_head(h);
          bool clean = row_finite(q.view, b, x, h);
          for (std::int64_t i = 0; i < pattern.num_branches() && clean; ++i) {
            const da::Progression keys = pattern.keys(i, h, x);
            for (std::int64_t j = 0; j < keys.count && clean; ++j)
              clean = row_finite(k.view, b, keys.at(j), g) && row_finite(v.view, b, keys.at(j), g);
          }
          const bool fast_finite = row_finite(out.view, b, x, h);
          const bool ref_finite = row_finite(ref_out.view, b, x, h);
          if (clean) {
            double diff = 0;
            for (std::int64_t d = 0; d < shape.head_dim; ++d)
              diff =
                  std::max(diff, std::abs(at(out.view, b, x, h, d) - at(ref_out.view, b, x, h, d)));
            if (!fast_finite || !(diff <= allowed)) {
              std::fprintf(stderr,
                           "row b=%lld h=%lld x=%lld reads only finite values; differs by %g\n",
                           static_cast<long long>(b), static_cast<long long>(h),
                           static_cast<long long>(x), diff);
              fail("non-finite input elsewhere changed a row that does not read it");
            }
            ++stats().clean_rows;
          } else {
            ++stats().tainted_rows;
            if (!fast_finite) ++stats().tainted_fast_nonfinite;
            if (!ref_finite) ++stats().tainted_ref_nonfinite;
            if (fast_finite != ref_finite) ++stats().tainted_disagree;
            bool nan = false;
            for (std::int64_t d = 0; d < shape.head_dim; ++d)
              nan = nan || std::isnan(at(out.view, b, x, h, d));
            if (nan) ++stats().tainted_fast_nan;
          }
        }
  }

  // Backward, on the fast forward's out and lse.
  Buffer<T> d_q, d_k, d_v, r_q, r_k, r_v;
  make_view(d_q, p.d_q, shape, heads, q.storage.data(),
            static_cast<std::int64_t>(q.storage.size()));
  make_view(d_k, p.d_k, shape, kv_heads, k.storage.data(),
            static_cast<std::int64_t>(k.storage.size()));
  make_view(d_v, p.d_v, shape, kv_heads, v.storage.data(),
            static_cast<std::int64_t>(v.storage.size()));
  make_view(r_q, p.d_q, shape, heads, q.storage.data(),
            static_cast<std::int64_t>(q.storage.size()));
  make_view(r_k, p.d_k, shape, kv_heads, k.storage.data(),
            static_cast<std::int64_t>(k.storage.size()));
  make_view(r_v, p.d_v, shape, kv_heads, v.storage.data(),
            static_cast<std::int64_t>(v.storage.size()));
  for (Buffer<T>* g : {&d_q, &d_k, &d_v, &r_q, &r_k, &r_v})
    std::fill(g->storage.begin(), g->storage.end(), sentinel<T>());
  // Without a forward LSE, backward must reject the null pointer; give it one when asked to.
  std::vector<L> own_lse;
  const L* back_lse = lse_ptr;
  if (back_lse == nullptr && !p.backward_lse_null) {
    own_lse.assign(lse_count, L(0));
    da::forward<T>(p.config, shape, q.view, k.view, v.view, out.view, own_lse.data(), options);
    back_lse = own_lse.data();
  } else if (p.backward_lse_null) {
    back_lse = nullptr;
  }
  const std::vector<T> inputs_before[3] = {q.storage, k.storage, v.storage};
  const bool b_valid = accepted([&] {
    da::validate_backward(p.config, shape, as_const(q.view), as_const(k.view), as_const(v.view),
                          as_const(out.view), back_lse, as_const(d_out.view), d_q.view, d_k.view,
                          d_v.view);
  });
  const bool b_fast = accepted([&] {
    da::backward<T>(p.config, shape, q.view, k.view, v.view, out.view, back_lse, d_out.view,
                    d_q.view, d_k.view, d_v.view, options);
  });
  const bool b_ref = accepted([&] {
    da::reference::backward<T>(p.config, shape, q.view, k.view, v.view, out.view, back_lse,
                               d_out.view, r_q.view, r_k.view, r_v.view);
  });
  if (b_valid != b_fast || b_valid != b_ref)
    fail("validate_backward, cpu::backward and reference::backward disagree");
  if (!b_valid) {
    for (Buffer<T>* g : {&d_q, &d_k, &d_v, &r_q, &r_k, &r_v})
      if (!untouched(g->storage)) fail("a rejected backward wrote to a gradient");
    if (!same_bits(q.storage, inputs_before[0]) || !same_bits(k.storage, inputs_before[1]) ||
        !same_bits(v.storage, inputs_before[2]))
      fail("a rejected backward wrote into an input");
    return;
  }
  if (p.d_q.layout == Layout::inside_input || p.d_k.layout == Layout::inside_input ||
      p.d_v.layout == Layout::inside_input)
    fail("a gradient inside an input was accepted");
  ++stats().backward_accepted;
  if (!finite || !representable || !all_finite(d_out.storage)) return;
  ++stats().backward_compared;
  const double do_scale = std::max(max_abs(d_out.storage), std::numeric_limits<double>::min());
  const double g_relative = base + 8 * score_bound * eps;
  struct Pair {
    const Buffer<T>*fast, *ref;
    std::int64_t heads;
    const char* name;
  } pairs[3] = {
      {&d_q, &r_q, heads, "d_q"}, {&d_k, &r_k, kv_heads, "d_k"}, {&d_v, &r_v, kv_heads, "d_v"}};
  for (const Pair& pair : pairs) {
    const double magnitude =
        std::max(max_abs_view(pair.ref->view, shape, pair.heads), v_scale * do_scale);
    const double diff = max_diff(pair.fast->view, pair.ref->view, shape, pair.heads);
    if (!(diff <= g_relative * magnitude)) {
      std::fprintf(stderr, "%s differs by %g (allowed %g)\n", pair.name, diff,
                   g_relative * magnitude);
      fail("cpu::backward differs from reference::backward");
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const Problem p = decode(data, size);
  check<double>(p);
  check<float>(p);
  return 0;
}
