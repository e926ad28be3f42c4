#pragma once
// The launch plan of the CUDA backward (docs/semantics.md "The gradient"), in plain C++ so that it is tested
// on machines without a GPU: the kernel parameters, the workspace layout and its size, the grid.
//
// The backward runs three kernels, one warp per row each, and no floating-point atomics: every
// gradient element is owned by exactly one warp, which sums its terms in a fixed order, so the
// result is bitwise reproducible (docs/semantics.md "Guarantees of the gradient"):
//   1. row statistics, one warp per query row (b, h, x): D(x) = dO(x) . O(x) from the forward's
//      O (softmax mixing, docs/semantics.md "Gradient of the softmax mixing"); for mean mixing
//      each branch's LSE_i and D_i = (dO / G) . O_i (docs/semantics.md "Gradient of the mean
//      mixing"): the forward's LSE and dO . O for a row that one branch selects, O_i recomputed
//      for a row that several select. Written to the workspace.
//   2. dQ, one warp per query row: the row's keys in each branch, P = exp(s - LSE), dS.
//   3. dK and dV, one warp per key row (b, kv head, y): the queries that attend y -- in every
//      branch and every query head of the GQA group -- are y's block (cut to x >= y when causal),
//      the same blocks as the forward's, seen from the key's side.
// For 16-bit storage, 2 and 3 run on tensor cores instead (tensor_core_backward_dq_kernel.cuh,
// tensor_core_backward_dk_dv_kernel.cuh): one thread block per window of 64 query rows (dQ) or of
// 64 key rows (dK, dV), the forward's windows, with the same ownership: each gradient row has one
// owning block.

#include <cstddef>
#include <cstdint>

#include "../config.hpp"
#include "../host_device.hpp"
#include "launch_checks.hpp"
#include "launch_plan.hpp"

namespace dilated_attention::cuda {

struct BackwardParams {
  ForwardParams f;  // q, k, v, out and the forward's LSE (read only here), strides, branches
  const void* d_out;
  std::int64_t do_batch, do_seq, do_head;
  void* d_q;
  std::int64_t dq_batch, dq_seq, dq_head;
  void* d_k;
  std::int64_t dk_batch, dk_seq, dk_head;
  void* d_v;
  std::int64_t dv_batch, dv_seq, dv_head;
  // Workspace. Softmax: delta[row]. Mean: branch_lse[i * rows + row], delta[i * rows + row].
  float* delta;
  float* branch_lse;
  std::int64_t rows;       // batch * heads * seq_len (query rows)
  std::int64_t key_rows;   // batch * kv_heads * seq_len
  float grad_out_scale;    // 1 for softmax, 1 / G for mean: the dO each branch's softmax receives
  bool do_vector;          // dO rows 16-byte aligned (as ForwardParams::q_vector for q)
};

// The tensor-core dQ kernel keeps Q in shared memory rather than in registers at head_dim 128
// (one more 64-row tile of shared memory; registers would spill).
DILATED_ATTENTION_HOST_DEVICE constexpr bool backward_dq_keeps_q_in_shared(int head_dim) {
  return head_dim >= 128;
}

// Queries per streamed tile of the tensor-core dK/dV kernel: 32, half the forward's key tile, so
// that the two fp32 score tiles (S^T, dP^T) fit beside the dK and dV accumulators in registers.
inline constexpr int backward_query_stage_rows = 32;

// Threads per block of the backward kernels: 4 warps, one row each at a time.
inline constexpr int backward_block_warps = 4;
inline constexpr int backward_block_threads = 32 * backward_block_warps;

namespace detail {

inline std::size_t round_up(std::size_t bytes, std::size_t to) { return (bytes + to - 1) / to * to; }
inline std::size_t rows_of(const Shape& shape) {
  return static_cast<std::size_t>(shape.batch * shape.num_heads * shape.seq_len);
}

// Shared memory: per warp two rows of head_dim floats (query and dO, or key and value).
inline std::size_t backward_shared_bytes(std::int64_t head_dim) {
  return static_cast<std::size_t>(head_dim) * 2 * backward_block_warps * sizeof(float);
}

inline std::int64_t backward_grid(std::int64_t rows) {
  const std::int64_t wanted = (rows + backward_block_warps - 1) / backward_block_warps;
  return wanted < (std::int64_t{1} << 30) ? wanted : (std::int64_t{1} << 30);  // rows are strided
}

}  // namespace detail

// Bytes of device workspace cuda::backward needs (aligned to 256 bytes; 0 is never returned).
// Softmax mixing: one float per query row. Mean mixing: two floats per query row and branch.
inline std::size_t backward_workspace_size(const Config& config, const Shape& shape) {
  const std::size_t rows = detail::rows_of(shape);
  const std::size_t per_array = detail::round_up(
      (rows > 0 ? rows : 1) * sizeof(float) *
          (config.mixing == Mixing::mean ? config.segment_lengths.size() : 1),
      256);
  return config.mixing == Mixing::mean ? 2 * per_array : per_array;
}

struct BackwardPlan {
  BackwardParams params;
  std::int64_t query_blocks, key_blocks;  // grids of the row kernels and of the dK/dV kernel
  int threads;
  std::size_t shared_bytes;
  // The dQ kernel: tensor cores for 16-bit storage (the forward's work units and grid), else
  // the SIMT row kernel with the grid above.
  KernelKind dq_kind;
  std::int64_t dq_blocks;
  int dq_threads;
  std::size_t dq_shared_bytes;
  // The dK/dV kernel, likewise: one block per (batch, kv head, window) on tensor cores.
  std::int64_t dk_dv_blocks;
  int dk_dv_threads;
  std::size_t dk_dv_shared_bytes;
};

// Checks the caller's workspace of one backward call: not null, at least
// backward_workspace_size() bytes, 256-byte aligned, sharing no memory with any tensor of the
// call. Touches no memory.
template <class T>
void check_backward_workspace(const Config& config, const Shape& shape, const View<const T>& q,
                              const View<const T>& k, const View<const T>& v,
                              const View<const T>& out, const float* lse,
                              const View<const T>& d_out, const View<T>& d_q, const View<T>& d_k,
                              const View<T>& d_v, void* workspace, std::size_t workspace_bytes) {
  const std::size_t needed = backward_workspace_size(config, shape);
  if (workspace == nullptr)
    dilated_attention::detail::reject("workspace is null: backward needs ", needed,
                                      " bytes of device memory (cuda::backward_workspace_size)");
  if (workspace_bytes < needed)
    dilated_attention::detail::reject("workspace_bytes = ", workspace_bytes, ": backward needs ",
                                      needed, " bytes (cuda::backward_workspace_size)");
  check_alignment(workspace, 256, "workspace", "cudaMalloc memory is; offsets into it must be too");
  {  // The workspace is written: it must not share memory with any tensor of the call.
    namespace dd = dilated_attention::detail;
    const auto lo = reinterpret_cast<std::uintptr_t>(workspace);
    const dd::ByteRange used{lo, lo + needed - 1};
    const auto lse_lo = reinterpret_cast<std::uintptr_t>(lse);
    const dd::ByteRange tensors[9] = {
        dd::byte_range(q, shape, shape.num_heads),     dd::byte_range(k, shape, shape.num_kv_heads),
        dd::byte_range(v, shape, shape.num_kv_heads),  dd::byte_range(out, shape, shape.num_heads),
        {lse_lo, lse_lo + detail::rows_of(shape) * sizeof(float) - 1},
        dd::byte_range(d_out, shape, shape.num_heads), dd::byte_range(d_q, shape, shape.num_heads),
        dd::byte_range(d_k, shape, shape.num_kv_heads), dd::byte_range(d_v, shape, shape.num_kv_heads)};
    const char* names[9] = {"q", "k", "v", "out", "lse", "d_out", "d_q", "d_k", "d_v"};
    for (int i = 0; i < 9; ++i)
      if (used.overlaps(tensors[i]))
        dd::reject("workspace overlaps ", names[i],
                   ": the workspace is written and must not share memory with any tensor");
  }
}

// The plan of one backward call without its workspace (params.delta and params.branch_lse null
// until bind_backward_workspace). Call after validate_backward() and check_backend_limits();
// checks the alignment of every pointer. Touches no memory.
template <class T>
BackwardPlan make_backward_plan_without_workspace(const Config& config, const Shape& shape,
                                                  const View<const T>& q, const View<const T>& k,
                                                  const View<const T>& v, const View<const T>& out,
                                                  const float* lse, const View<const T>& d_out,
                                                  const View<T>& d_q, const View<T>& d_k,
                                                  const View<T>& d_v, KernelKind dq_kind) {
  const char* element = "every tensor element must be aligned to its type";
  check_alignment(d_out.data, alignof(T), "d_out.data", element);
  check_alignment(d_q.data, alignof(T), "d_q.data", element);
  check_alignment(d_k.data, alignof(T), "d_k.data", element);
  check_alignment(d_v.data, alignof(T), "d_v.data", element);

  BackwardPlan plan{};
  BackwardParams& p = plan.params;
  // The forward's parameters carry q, k, v, out, the LSE and the branches; `out` and `lse` are
  // read-only here (the kernels never write through ForwardParams::out / lse in backward).
  const View<T> out_view{const_cast<T*>(out.data), out.batch_stride, out.seq_stride,
                         out.head_stride};
  const LaunchPlan forward_plan =
      make_launch_plan<T>(config, shape, q, k, v, out_view, const_cast<float*>(lse), dq_kind);
  p.f = forward_plan.params;
  p.d_out = d_out.data;
  p.do_batch = d_out.batch_stride, p.do_seq = d_out.seq_stride, p.do_head = d_out.head_stride;
  p.do_vector = detail::rows_aligned16(d_out, shape, shape.num_heads);
  p.d_q = d_q.data;
  p.dq_batch = d_q.batch_stride, p.dq_seq = d_q.seq_stride, p.dq_head = d_q.head_stride;
  p.d_k = d_k.data;
  p.dk_batch = d_k.batch_stride, p.dk_seq = d_k.seq_stride, p.dk_head = d_k.head_stride;
  p.d_v = d_v.data;
  p.dv_batch = d_v.batch_stride, p.dv_seq = d_v.seq_stride, p.dv_head = d_v.head_stride;
  p.rows = shape.batch * shape.num_heads * shape.seq_len;
  p.key_rows = shape.batch * shape.num_kv_heads * shape.seq_len;
  p.delta = nullptr;  // bind_backward_workspace
  p.branch_lse = nullptr;
  p.grad_out_scale =
      config.mixing == Mixing::mean ? 1.0f / static_cast<float>(config.segment_lengths.size())
                                    : 1.0f;
  plan.query_blocks = detail::backward_grid(p.rows);
  plan.key_blocks = detail::backward_grid(p.key_rows);
  plan.threads = backward_block_threads;
  plan.shared_bytes = detail::backward_shared_bytes(shape.head_dim);
  plan.dq_kind = dq_kind;
  if (dq_kind == KernelKind::tensor_core) {
    plan.dq_blocks = forward_plan.blocks;
    plan.dq_threads = block_threads;
    // dO tile (Q's before it) and two K and two V stages: the forward's softmax layout, plus a
    // separate Q tile at head_dim 128.
    plan.dq_shared_bytes =
        detail::tensor_core_shared_bytes(shape.head_dim, Mixing::softmax) +
        (backward_dq_keeps_q_in_shared(static_cast<int>(shape.head_dim))
             ? static_cast<std::size_t>(block_window_rows * (shape.head_dim + 8) * 2)
             : 0);
    // K and V of the window, two stages of Q and dO tiles, two stages of 64 LSE and D values.
    plan.dk_dv_blocks = p.f.windows * shape.num_kv_heads * shape.batch;
    plan.dk_dv_threads = block_threads;
    plan.dk_dv_shared_bytes =
        static_cast<std::size_t>((2 * block_window_rows + 4 * backward_query_stage_rows) *
                                 (shape.head_dim + 8) * 2) +
        4 * backward_query_stage_rows * sizeof(float);
  } else {
    plan.dq_blocks = plan.query_blocks;
    plan.dq_threads = plan.threads;
    plan.dq_shared_bytes = plan.shared_bytes;
    plan.dk_dv_blocks = plan.key_blocks;
    plan.dk_dv_threads = plan.threads;
    plan.dk_dv_shared_bytes = plan.shared_bytes;
  }
  return plan;
}

// Points the plan's row statistics into `workspace` (backward_workspace_size() bytes, checked).
inline void bind_backward_workspace(BackwardPlan& plan, const Config& config, const Shape& shape,
                                    void* workspace) {
  const std::size_t needed = backward_workspace_size(config, shape);
  plan.params.delta = static_cast<float*>(workspace);
  plan.params.branch_lse =
      config.mixing == Mixing::mean
          ? reinterpret_cast<float*>(static_cast<unsigned char*>(workspace) + needed / 2)
          : nullptr;
}

// The plan of one backward call. Call after validate_backward() and check_backend_limits();
// checks the workspace (size, alignment) and the alignment of every pointer. Touches no memory.
template <class T>
BackwardPlan make_backward_plan(const Config& config, const Shape& shape, const View<const T>& q,
                                const View<const T>& k, const View<const T>& v,
                                const View<const T>& out, const float* lse,
                                const View<const T>& d_out, const View<T>& d_q, const View<T>& d_k,
                                const View<T>& d_v, void* workspace, std::size_t workspace_bytes,
                                KernelKind dq_kind) {
  check_backward_workspace<T>(config, shape, q, k, v, out, lse, d_out, d_q, d_k, d_v, workspace,
                              workspace_bytes);
  BackwardPlan plan = make_backward_plan_without_workspace<T>(config, shape, q, k, v, out, lse,
                                                              d_out, d_q, d_k, d_v, dq_kind);
  bind_backward_workspace(plan, config, shape, workspace);
  return plan;
}

}  // namespace dilated_attention::cuda
