#pragma once
// The launch plan of the CUDA forward kernels, in plain C++ so that it is tested on machines
// without a GPU. Two halves:
//  - host+device functions that say what one work unit computes: which (branch, segment) pairs
//    overlap its window, which of its rows are queries there, how many keys it streams and in how
//    many tiles. The kernel calls exactly these, so the host tests check the kernel's own bounds.
//  - the host-side plan: the kernel parameters (pointers, strides, branches), grid and shared
//    memory, built from a validated Config and Shape.
// All index math comes from pattern.hpp (BranchGeometry, head_offset, Progression); nothing here
// re-derives a segment or an offset.

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

#include "../config.hpp"
#include "../host_device.hpp"
#include "../pattern.hpp"
#include "launch_checks.hpp"

namespace dilated_attention::cuda {

// Branches travel by value inside the kernel parameters, so their number is capped. The LongNet
// paper uses 5; a config with more gets std::invalid_argument.
inline constexpr int max_branches = 16;

// A work unit is (batch, head, window): up to `block_window_rows` rows of one query head, every
// `row_stride`-th position (R, see choose_row_stride). The same rows form the query tile of every
// branch (rows a branch does not select are masked), which is what lets the online softmax run
// across branches in registers and write each output row once. Keys stream in tiles of
// `key_stage_rows` rows of one block (compressed, i.e. stride r).
inline constexpr int block_window_rows = 64;
inline constexpr int key_stage_rows = 64;
inline constexpr int block_warps = 4;  // each warp owns 16 rows of the window (mma m16)
inline constexpr int block_threads = 32 * block_warps;

// The head dimensions with compiled kernels, and their names for error messages.
inline constexpr int compiled_head_dims[] = {32, 64, 96, 128};
inline const char* supported_head_dims() { return "{32, 64, 96, 128}"; }
inline bool head_dim_supported(std::int64_t head_dim) {
  for (int d : compiled_head_dims)
    if (d == head_dim) return true;
  return false;
}

// What one (window, branch, segment) contributes for a head with a given offset.
struct SegmentWork {
  Progression keys;     // the block: rows of the segment with this offset, in compressed order
  Progression queries;  // the block's rows inside the window (the queries of this work)
  std::int64_t key_count = 0;  // keys streamed: all, or when causal those up to the last query
  DILATED_ATTENTION_HOST_DEVICE bool empty() const { return queries.empty() || key_count <= 0; }
  DILATED_ATTENTION_HOST_DEVICE std::int64_t tiles() const {
    return (key_count + key_stage_rows - 1) / key_stage_rows;
  }
};

// Segments of one branch that hold rows of the (non-empty) window.
struct SegmentRange {
  std::int64_t first, last;  // inclusive
};
DILATED_ATTENTION_HOST_DEVICE SegmentRange segments_overlapping(const BranchGeometry& g,
                                                                const Progression& window) {
  return {g.segment_of(window.first), g.segment_of(window.last())};
}

// The work of one (window, branch, segment) for a head with this offset. For a window of stride
// 1 the queries are the block's rows inside it; for a window of stride R the plan guarantees that
// every rate r divides R, so inside one segment either all the window's rows are selected (same
// residue mod r) or none: the queries are then the window's rows in the segment, or nothing.
DILATED_ATTENTION_HOST_DEVICE SegmentWork segment_work(const BranchGeometry& g,
                                                       std::int64_t segment, std::int64_t offset,
                                                       bool causal, const Progression& window) {
  SegmentWork work;
  work.keys = g.rows(segment, offset);  // empty for offset -1 (head does not run the branch)
  if (window.stride == 1) {
    work.queries = work.keys.within(window.first, window.last() + 1);
  } else {
    const std::int64_t begin = g.segment_begin(segment);
    const Progression inside = window.within(begin, begin + g.segment_length(segment));
    work.queries = !inside.empty() && work.keys.contains(inside.first) ? inside
                                                                      : Progression{0, 1, 0};
  }
  if (work.queries.empty()) return work;
  // Non-causal: every query sees the whole block. Causal: the key set of the last query is the
  // largest; later keys are never streamed (future tiles skipped).
  work.key_count = causal ? work.keys.count_up_to(work.queries.last()) : work.keys.count;
  return work;
}

// How many keys of `keys` (a block's rows) query x attends, or 0 if x is not in the block. Keys
// j < key_limit are attended: the mask of one row inside a tile.
DILATED_ATTENTION_HOST_DEVICE std::int64_t key_limit(const Progression& keys, std::int64_t x,
                                                     bool causal) {
  if (!keys.contains(x)) return 0;
  return causal ? keys.index_of(x) + 1 : keys.count;
}

// Kernel parameters: everything by value, no device allocation, no pointer to host memory.
struct BranchParams {
  std::int64_t w, r;
};

struct ForwardParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;  // [batch, heads, seq] or null
  std::int64_t q_batch, q_seq, q_head;
  std::int64_t k_batch, k_seq, k_head;
  std::int64_t v_batch, v_seq, v_head;
  std::int64_t o_batch, o_seq, o_head;
  std::int64_t batch, seq_len, heads, kv_heads, head_dim;
  int num_branches;
  BranchParams branches[max_branches];
  OffsetRule offsets;
  Mixing mixing;
  bool causal;
  // Per tensor: every row start is 16-byte aligned, so cp.async / 16-byte copies and stores are
  // allowed (decided per tensor, so one padded tensor does not slow the others down).
  bool q_vector, k_vector, v_vector, o_vector;
  float scale;         // softmax scale
  float scale_log2;    // scale * log2(e): scores are exponentiated with exp2
  std::int64_t row_stride;  // R: a window holds positions residue + R * j
  std::int64_t chunks;  // windows per residue class: ceil(ceil(seq_len / R) / block_window_rows)
  std::int64_t windows;     // R * chunks per (batch, head)

  DILATED_ATTENTION_HOST_DEVICE BranchGeometry branch(int i) const {
    return {branches[i].w, branches[i].r, seq_len};
  }
  DILATED_ATTENTION_HOST_DEVICE std::int64_t offset(int i, std::int64_t head) const {
    return head_offset(offsets, i, num_branches, branches[i].r, head, heads);
  }
  DILATED_ATTENTION_HOST_DEVICE std::int64_t kv_head(std::int64_t head) const {
    return head / (heads / kv_heads);
  }
};

// Block index -> (batch, head, window). Windows vary fastest, residue classes fastest within
// them, so that neighbouring blocks cover the same positions and share keys and values in L2.
struct WorkUnit {
  std::int64_t batch, head, window;
};
DILATED_ATTENTION_HOST_DEVICE WorkUnit work_unit(const ForwardParams& p, std::int64_t block) {
  const std::int64_t window = block % p.windows, rest = block / p.windows;
  return {rest / p.heads, rest % p.heads, window};
}

// The positions of a window: residue + R * (64 * chunk + j), j < 64, below seq_len. May be empty
// (the last chunk of a residue class that has fewer rows); the kernel then returns at once.
DILATED_ATTENTION_HOST_DEVICE Progression window_rows(const ForwardParams& p, std::int64_t window) {
  const std::int64_t residue = window % p.row_stride, chunk = window / p.row_stride;
  const std::int64_t first = residue + p.row_stride * block_window_rows * chunk;
  if (first >= p.seq_len) return {first, p.row_stride, 0};
  const std::int64_t rows = (p.seq_len - first + p.row_stride - 1) / p.row_stride;
  return {first, p.row_stride, rows < block_window_rows ? rows : block_window_rows};
}

// R, the stride of the windows. With R = 1 a window is 64 consecutive positions and a branch of
// rate r uses only 1/r of the tile's rows. With R = lcm of all rates, a window's rows share their
// residue mod every r, so in each segment a branch selects all of them or none: no masked rows,
// no wasted tensor-core work. R > 1 is used only while a window (64 R positions) fits in the
// shortest segment, so that it never spans more than two segments of any branch.
inline std::int64_t choose_row_stride(const Config& config) {
  std::int64_t lcm = 1, shortest = config.segment_lengths.front();
  for (std::size_t i = 0; i < config.dilation_rates.size(); ++i) {
    std::int64_t a = lcm, b = config.dilation_rates[i];
    while (b != 0) a = std::exchange(b, a % b);  // gcd(lcm, r)
    lcm = lcm / a * config.dilation_rates[i];
    if (lcm > block_window_rows) return 1;
    shortest = std::min(shortest, config.segment_lengths[i]);
  }
  return block_window_rows * lcm <= shortest ? lcm : 1;
}

// Which kernel runs: tensor cores for 16-bit storage, SIMT (exact fp32 arithmetic) for float.
enum class KernelKind { tensor_core, simt };

struct LaunchPlan {
  ForwardParams params;
  KernelKind kind;
  std::int64_t blocks;       // grid size (1-D)
  int threads;               // per block
  std::size_t shared_bytes;  // dynamic shared memory per block
};

namespace detail {

// Shared memory of a 64-row Q tile and two K and two V stages of 64 rows (rows padded by 8
// elements so that ldmatrix rows fall in distinct banks), plus, for mean mixing, one fp32 slot per
// thread per accumulator element: the layout of the backward's dQ kernel (backward_plan.hpp).
inline std::size_t tensor_core_shared_bytes(std::int64_t head_dim, Mixing mixing) {
  const std::size_t pitch = static_cast<std::size_t>(head_dim + 8) * 2;  // bytes per 16-bit row
  std::size_t bytes = pitch * (block_window_rows + 4 * key_stage_rows);
  if (mixing == Mixing::mean)
    bytes += static_cast<std::size_t>(head_dim / 2) * block_threads * sizeof(float);
  return bytes;
}

// Shared memory of the 16-bit forward kernel: the Q tile and K/V stages above, one fp32 record
// per window row (D accumulators, max, sum: a row's online-softmax state between works, or its
// mean-mixing sum and log-sum-exp; query_window.hpp), for either mixing.
inline std::size_t forward_shared_bytes(std::int64_t head_dim) {
  return tensor_core_shared_bytes(head_dim, Mixing::softmax) +
         static_cast<std::size_t>(block_window_rows) * static_cast<std::size_t>(head_dim + 2) *
             sizeof(float);
}

// SIMT kernel: one warp per query row, the row's query in shared memory (fp32).
inline constexpr int simt_rows_per_block = 4;
inline std::size_t simt_shared_bytes(std::int64_t head_dim) {
  return static_cast<std::size_t>(head_dim) * simt_rows_per_block * sizeof(float);
}

inline bool aligned16(const void* pointer) {
  return reinterpret_cast<std::uintptr_t>(pointer) % 16 == 0;
}

// Whether every row start of a view is 16-byte aligned: the base pointer, and the stride of each
// dimension that has more than one index (the stride of a size-1 dimension is never applied).
template <class T>
bool rows_aligned16(const View<T>& view, const Shape& shape, std::int64_t heads) {
  const std::int64_t vec = 16 / static_cast<std::int64_t>(sizeof(T));
  return aligned16(view.data) && (shape.seq_len == 1 || view.seq_stride % vec == 0) &&
         (shape.batch == 1 || view.batch_stride % vec == 0) &&
         (heads == 1 || view.head_stride % vec == 0);
}

}  // namespace detail

// Backend limits beyond docs/semantics.md "Bad input", checked after validate(): head_dim, number of branches, and
// sizes that fit the 1-D grid of the tensor-core kernel (one block per 64-row window).
inline void check_backend_limits(const Config& config, const Shape& shape) {
  if (!head_dim_supported(shape.head_dim))
    dilated_attention::detail::reject("shape.head_dim = ", shape.head_dim,
                                      ": the CUDA back end supports head_dim in ",
                                      supported_head_dims());
  const auto branches = config.segment_lengths.size();
  if (branches > static_cast<std::size_t>(max_branches))
    dilated_attention::detail::reject("config.segment_lengths has ", branches,
                                      " branches: the CUDA back end supports at most ",
                                      max_branches);
  // R * ceil(ceil(N/R) / 64) <= ceil(N/64) + R windows per head, and R <= 64.
  const std::int64_t windows =
      (shape.seq_len + block_window_rows - 1) / block_window_rows + block_window_rows;
  const double blocks = static_cast<double>(windows) * static_cast<double>(shape.num_heads) *
                        static_cast<double>(shape.batch);
  if (shape.seq_len > (std::int64_t{1} << 31) - 1 || blocks > 2147483647.0)
    dilated_attention::detail::reject(
        "shape [batch ", shape.batch, ", seq_len ", shape.seq_len, ", heads ", shape.num_heads,
        "] needs ", blocks,
        " thread blocks: the CUDA back end supports seq_len < 2^31 and at "
        "most 2^31 - 1 blocks of ",
        block_window_rows, " rows");
}

// The plan of one forward call. Call after validate(); raises std::invalid_argument for the
// back end's own limits. Touches no device memory.
template <class T>
LaunchPlan make_launch_plan(const Config& config, const Shape& shape, const View<const T>& q,
                            const View<const T>& k, const View<const T>& v, const View<T>& out,
                            float* lse, KernelKind kind) {
  check_backend_limits(config, shape);
  // The kernels read and write whole elements and whole floats: a misaligned pointer would fault
  // on the device (or be UB on the host), so it is an argument error here.
  const char* element = "every tensor element must be aligned to its type";
  check_alignment(q.data, alignof(T), "q.data", element);
  check_alignment(k.data, alignof(T), "k.data", element);
  check_alignment(v.data, alignof(T), "v.data", element);
  check_alignment(out.data, alignof(T), "out.data", element);
  if (lse != nullptr) check_alignment(lse, alignof(float), "lse", "lse is an array of float");
  LaunchPlan plan{};
  ForwardParams& p = plan.params;
  p.q = q.data;
  p.k = k.data;
  p.v = v.data;
  p.out = out.data;
  p.lse = lse;
  p.q_batch = q.batch_stride, p.q_seq = q.seq_stride, p.q_head = q.head_stride;
  p.k_batch = k.batch_stride, p.k_seq = k.seq_stride, p.k_head = k.head_stride;
  p.v_batch = v.batch_stride, p.v_seq = v.seq_stride, p.v_head = v.head_stride;
  p.o_batch = out.batch_stride, p.o_seq = out.seq_stride, p.o_head = out.head_stride;
  p.batch = shape.batch, p.seq_len = shape.seq_len, p.heads = shape.num_heads;
  p.kv_heads = shape.num_kv_heads, p.head_dim = shape.head_dim;
  p.num_branches = static_cast<int>(config.segment_lengths.size());
  for (int i = 0; i < p.num_branches; ++i)
    p.branches[i] = {config.segment_lengths[static_cast<std::size_t>(i)],
                     config.dilation_rates[static_cast<std::size_t>(i)]};
  p.offsets = config.offsets;
  p.mixing = config.mixing;
  p.causal = config.causal;
  // 16-byte transfers need every row start of the tensor 16-byte aligned. Otherwise that tensor's
  // copies (or, for out, stores) fall back to element-wise ones.
  p.q_vector = detail::rows_aligned16(q, shape, shape.num_heads);
  p.o_vector = detail::rows_aligned16(out, shape, shape.num_heads);
  p.k_vector = detail::rows_aligned16(k, shape, shape.num_kv_heads);
  p.v_vector = detail::rows_aligned16(v, shape, shape.num_kv_heads);
  const double scale = resolved_scale(config, shape);
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.row_stride = choose_row_stride(config);
  p.chunks = ((shape.seq_len + p.row_stride - 1) / p.row_stride + block_window_rows - 1) /
             block_window_rows;
  p.windows = p.row_stride * p.chunks;

  plan.kind = kind;
  if (kind == KernelKind::tensor_core) {
    // The grid of the stride-R windows, which the backward kernels share; the forward's query
    // windows (query_window.hpp) are never more, and its extra blocks return at once.
    plan.blocks = p.windows * p.heads * p.batch;
    plan.threads = block_threads;
    plan.shared_bytes = detail::forward_shared_bytes(shape.head_dim);
  } else {
    const std::int64_t rows = shape.batch * shape.num_heads * shape.seq_len;
    // The SIMT kernel strides over rows, so its grid may be capped below the 2^31 - 1 limit.
    const std::int64_t wanted =
        (rows + detail::simt_rows_per_block - 1) / detail::simt_rows_per_block;
    plan.blocks = wanted < (std::int64_t{1} << 30) ? wanted : (std::int64_t{1} << 30);
    plan.threads = 32 * detail::simt_rows_per_block;
    plan.shared_bytes = detail::simt_shared_bytes(shape.head_dim);
  }
  return plan;
}

}  // namespace dilated_attention::cuda
