#pragma once
// PyTorch bindings of the kernels (docs/torch.md): inline C++ functions on at::Tensor that check
// their arguments by name, map the tensors to View<T> without copying (their own strides; the
// last dimension must be contiguous) and call the library's forward and backward. Nothing is
// registered here: the operators `torch.ops.dilated_attention.*`, their meta (fake) kernels and
// their autograd live in <dilated_attention/torch_registration.hpp>, which exactly one
// translation unit of a program includes. This header may be included anywhere, any number of
// times.
//
// CPU: float, double, bfloat16, half (Eigen's bit-compatible types). CUDA (__half,
// __nv_bfloat16, float) when the including translation unit is compiled by nvcc, or when
// DILATED_ATTENTION_TORCH_CUDA is defined (then it must be compiled by nvcc).
//
// Layout: q [B, N, H, D], k and v [B, N, Hkv, D], any strides with stride(-1) == 1 (as
// flash_attn_func takes them); out [B, N, H, D] contiguous, lse [B, H, N] contiguous, float
// (double for double inputs). std::invalid_argument from the library, and every check here,
// raise c10::ValueError: ValueError in Python, with the library's message unchanged.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "dilated_attention.hpp"

#if defined(__CUDACC__) && !defined(DILATED_ATTENTION_TORCH_CUDA)
#define DILATED_ATTENTION_TORCH_CUDA 1
#endif
#if defined(DILATED_ATTENTION_TORCH_CUDA)
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda.cuh"
#endif

namespace dilated_attention::torch_ops {

// The operator's config arguments, as the schema spells them.
struct OpConfig {
  std::vector<std::int64_t> segment_lengths, dilation_rates;
  bool causal = false;
  std::string offsets = "modular", mixing = "softmax";
  std::optional<double> scale;  // None (or 0): 1/sqrt(head_dim)
};

inline OffsetRule parse_offsets(const std::string& text) {
  if (text == "modular") return OffsetRule::modular;
  if (text == "blocked") return OffsetRule::blocked;
  if (text == "partitioned") return OffsetRule::partitioned;
  TORCH_CHECK_VALUE(false, "dilated_attention: offsets = '", text,
                    "': must be 'modular', 'blocked' or 'partitioned'");
}

inline Mixing parse_mixing(const std::string& text) {
  if (text == "softmax") return Mixing::softmax;
  if (text == "mean") return Mixing::mean;
  TORCH_CHECK_VALUE(false, "dilated_attention: mixing = '", text, "': must be 'softmax' or 'mean'");
}

// A library member and the op argument it comes from.
struct ArgumentName {
  const char* library;
  const char* argument;
};

// Runs f, turning the library's std::invalid_argument into c10::ValueError with the same text.
// The library's messages name its own members (sequences.query_offsets, paged.page_table, ...):
// for each of `names` that the message mentions, the op's argument is appended, e.g.
// "[sequences.query_offsets is cu_seqlens_q]", so the caller finds the argument by its name.
template <class F>
decltype(auto) translating_errors(std::initializer_list<ArgumentName> names, F&& f) {
  try {
    return f();
  } catch (const std::invalid_argument& error) {
    std::string message = error.what(), glossary;
    for (const ArgumentName& name : names)
      if (message.find(name.library) != std::string::npos)
        glossary +=
            (glossary.empty() ? "" : ", ") + std::string(name.library) + " is " + name.argument;
    if (!glossary.empty()) message += " [" + glossary + "]";
    TORCH_CHECK_VALUE(false, message);
  }
}

template <class F>
decltype(auto) translating_errors(F&& f) {
  return translating_errors({}, std::forward<F>(f));
}

inline Config make_config(const OpConfig& op) {
  Config config;
  config.segment_lengths = op.segment_lengths;
  config.dilation_rates = op.dilation_rates;
  config.causal = op.causal;
  config.offsets = parse_offsets(op.offsets);
  config.mixing = parse_mixing(op.mixing);
  config.scale = op.scale.value_or(0.0);
  translating_errors([&] { validate_config(config); });
  return config;
}

// The threads of a CPU call: `num_threads` when positive, else at::get_num_threads() (what
// torch.set_num_threads sets).
inline int resolve_threads(std::int64_t num_threads) {
  TORCH_CHECK_VALUE(num_threads >= 0, "dilated_attention: num_threads = ", num_threads,
                    ": must be positive, or 0 for at::get_num_threads()");
  return num_threads > 0 ? static_cast<int>(num_threads) : at::get_num_threads();
}

// The config and thread checks alone, as the meta kernels make them.
inline void check_config(const OpConfig& op, std::int64_t num_threads) {
  make_config(op);
  resolve_threads(num_threads);
}

#if defined(DILATED_ATTENTION_TORCH_CUDA)
inline constexpr const char* supported_devices = "cpu and cuda";
#else
inline constexpr const char* supported_devices =
    "cpu (this build has no CUDA: compile the registration with nvcc for cuda)";
#endif

inline bool supported_dtype(const at::Tensor& t) {
  const auto type = t.scalar_type();
  if (t.is_cuda()) return type == at::kFloat || type == at::kHalf || type == at::kBFloat16;
  return type == at::kFloat || type == at::kDouble || type == at::kHalf || type == at::kBFloat16;
}

// Rank, dtype, device and the contiguous last dimension of one tensor, by name. Works on meta
// and fake tensors too (nothing here reads data or concrete sizes). The inference forms' packed
// tensors have rank 3, [total, heads, head_dim].
inline void check_tensor(const char* name, const at::Tensor& t, const at::Tensor& q,
                         std::int64_t rank = 4,
                         const char* layout = "[batch, seq, heads, head_dim]") {
  TORCH_CHECK_VALUE(t.defined(), "dilated_attention: ", name, " is undefined");
  TORCH_CHECK_VALUE(t.dim() == rank, "dilated_attention: ", name, " has ", t.dim(),
                    " dimensions: expected ", rank, ", ", layout);
  TORCH_CHECK_VALUE(t.device() == q.device(), "dilated_attention: ", name, " is on ", t.device(),
                    " but q is on ", q.device(), ": all tensors must be on one device");
  TORCH_CHECK_VALUE(t.scalar_type() == q.scalar_type(), "dilated_attention: ", name, " has dtype ",
                    t.scalar_type(), " but q has ", q.scalar_type(),
                    ": all tensors need one dtype");
  TORCH_CHECK_VALUE(t.is_cpu() || t.is_cuda() || t.is_meta(), "dilated_attention: ", name,
                    " is on ", t.device(), ": supported devices are ", supported_devices);
  TORCH_CHECK_VALUE(t.is_meta() || supported_dtype(t), "dilated_attention: ", name, " has dtype ",
                    t.scalar_type(), " on ", t.device(),
                    ": supported are float32, float64, bfloat16, float16 on cpu and float32, "
                    "bfloat16, float16 on cuda");
  TORCH_CHECK_VALUE(t.sym_stride(rank - 1) == 1 || t.sym_size(rank - 1) == 1,
                    "dilated_attention: ", name, ".stride(-1) = ", t.sym_stride(rank - 1),
                    ": the last dimension (head_dim) must be contiguous (stride 1); call "
                    ".contiguous() first");
}

inline void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         std::int64_t rank = 4,
                         const char* layout = "[batch, seq, heads, head_dim]") {
  check_tensor("q", q, q, rank, layout);
  check_tensor("k", k, q, rank, layout);
  check_tensor("v", v, q, rank, layout);
}

// Two tensors' shapes: `agree` is the caller's rule, and the message names both tensors, their
// shapes and, when given, the rule in words. Symbolic sizes allowed.
inline void check_shapes(bool agree, const char* name, const at::Tensor& t, const char* other_name,
                         const at::Tensor& other, const char* rule = "") {
  TORCH_CHECK_VALUE(agree, "dilated_attention: ", name, " has shape ", t.sym_sizes(), " but ",
                    other_name, " has ", other.sym_sizes(), *rule != '\0' ? ": " : "", rule);
}

inline void check_same_kv(const at::Tensor& k, const at::Tensor& v) {
  check_shapes(k.sym_sizes() == v.sym_sizes(), "k", k, "v", v, "k and v must have the same shape");
}

// The library's Shape from q and k; sizes beyond q's and k's agreement are left to validate().
inline Shape shape_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_same_kv(k, v);
  check_shapes(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3), "q", q,
               "k", k, "batch, seq and head_dim must agree (heads may differ: grouped-query)");
  return Shape{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3)};
}

// A view of a tensor with its own strides (no copy), bounded by its storage: [batch, seq, heads,
// head_dim], or a packed [total, heads, head_dim] tensor as batch 1.
template <class T>
View<T> view_of(const at::Tensor& t) {
  const std::int64_t element = static_cast<std::int64_t>(t.element_size());
  const std::int64_t extent =
      static_cast<std::int64_t>(t.storage().nbytes()) / element - t.storage_offset();
  T* const data = static_cast<T*>(const_cast<void*>(t.const_data_ptr()));
  if (t.dim() == 3) return View<T>{data, 0, t.stride(0), t.stride(1), extent};
  return View<T>{data, t.stride(0), t.stride(1), t.stride(2), extent};
}

template <class T>
View<const T> const_view_of(const at::Tensor& t) {
  return view_of<T>(t);
}

template <class T>
lse_type_t<T>* lse_pointer(const at::Tensor& lse) {
  return static_cast<lse_type_t<T>*>(const_cast<void*>(lse.const_data_ptr()));
}

// The library's argument groups as views of the tensors (no copies). Outputs<const T>: the
// forward's out and lse as a backward reads them.
template <class T>
Inputs<T> inputs_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  return {const_view_of<T>(q), const_view_of<T>(k), const_view_of<T>(v)};
}

template <class T>
Outputs<T> outputs_of(const at::Tensor& out, const at::Tensor& lse) {
  return {view_of<T>(out), lse_pointer<T>(lse)};
}

template <class T>
Gradients<T> gradients_of(const at::Tensor& d_q, const at::Tensor& d_k, const at::Tensor& d_v) {
  return {view_of<T>(d_q), view_of<T>(d_k), view_of<T>(d_v)};
}

inline at::ScalarType lse_dtype(at::ScalarType type) {
  return type == at::kDouble ? at::kDouble : at::kFloat;
}

inline at::TensorOptions lse_options(const at::Tensor& q) {
  return q.options().dtype(lse_dtype(q.scalar_type()));
}

// Gradients of q, k and v: uninitialised, of their sizes (symbolic ones too).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_gradients(const at::Tensor& q,
                                                                      const at::Tensor& k,
                                                                      const at::Tensor& v) {
  return {at::empty_symint(q.sym_sizes(), q.options()),
          at::empty_symint(k.sym_sizes(), k.options()),
          at::empty_symint(v.sym_sizes(), v.options())};
}

// Calls f with a value of the C++ storage type of the CPU tensor's dtype.
template <class F>
void dispatch_cpu(at::ScalarType type, F&& f) {
  switch (type) {
    case at::kFloat: f(float{}); return;
    case at::kDouble: f(double{}); return;
    case at::kBFloat16: f(Eigen::bfloat16{}); return;
    case at::kHalf: f(Eigen::half{}); return;
    default:
      TORCH_CHECK_VALUE(false, "dilated_attention: dtype ", type, " is not supported on cpu");
  }
}

// Calls f(T{}) for the CPU storage type T of q's dtype, translating the library's errors (names:
// as translating_errors).
template <class F>
void call_cpu(const at::Tensor& q, std::initializer_list<ArgumentName> names, F&& f) {
  dispatch_cpu(q.scalar_type(), [&](auto tag) { translating_errors(names, [&] { f(tag); }); });
}

// ---- forward ----------------------------------------------------------------------------------

// out [batch, seq, heads, head_dim] and lse [batch, heads, seq] of a forward over `shape`.
inline std::tuple<at::Tensor, at::Tensor> empty_outputs(const at::Tensor& q, const Shape& shape) {
  return {at::empty({shape.batch, shape.seq_len, shape.num_heads, shape.head_dim}, q.options()),
          at::empty({shape.batch, shape.num_heads, shape.seq_len}, lse_options(q))};
}

// The same for the meta kernels: out of q's sizes, lse [batch, heads, seq] (symbolic sizes).
inline std::tuple<at::Tensor, at::Tensor> empty_outputs_meta(const at::Tensor& q) {
  const auto sizes = q.sym_sizes();
  return {at::empty_symint(sizes, q.options()),
          at::empty_symint({sizes[0], sizes[2], sizes[1]}, lse_options(q))};
}

inline std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v, const OpConfig& op,
                                                      std::int64_t num_threads) {
  check_inputs(q, k, v);
  const Config config = make_config(op);
  const Shape shape = shape_of(q, k, v);
  CpuOptions options;
  options.num_threads = resolve_threads(num_threads);
  at::Tensor out, lse;
  std::tie(out, lse) = empty_outputs(q, shape);
  call_cpu(q, {}, [&](auto tag) {
    using T = decltype(tag);
    dilated_attention::forward<T>(config, shape, inputs_of<T>(q, k, v), outputs_of<T>(out, lse),
                                  options);
  });
  return {out, lse};
}

// Shapes and dtypes only (meta and fake tensors; symbolic sizes allowed).
inline std::tuple<at::Tensor, at::Tensor> forward_meta(const at::Tensor& q, const at::Tensor& k,
                                                       const at::Tensor& v, const OpConfig& op,
                                                       std::int64_t num_threads) {
  check_inputs(q, k, v);
  check_config(op, num_threads);
  return empty_outputs_meta(q);
}

// ---- backward ---------------------------------------------------------------------------------

// The forward's lse as a backward gets it: its dtype and device (its sizes are the caller's).
inline void check_lse_type(const at::Tensor& lse, const at::Tensor& q) {
  TORCH_CHECK_VALUE(lse.scalar_type() == lse_dtype(q.scalar_type()),
                    "dilated_attention: lse has dtype ", lse.scalar_type(), ": expected ",
                    lse_dtype(q.scalar_type()), " for ", q.scalar_type(),
                    " inputs (what forward returns)");
  TORCH_CHECK_VALUE(lse.device() == q.device(), "dilated_attention: lse is on ", lse.device(),
                    " but q is on ", q.device());
}

inline void check_lse_contiguous(const at::Tensor& lse, const char* layout) {
  TORCH_CHECK_VALUE(lse.is_contiguous(), "dilated_attention: lse must be contiguous, ", layout,
                    " (what forward returns)");
}

inline void check_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse) {
  check_inputs(q, k, v);
  check_tensor("out", out, q);
  check_tensor("grad_out", grad_out, q);
  TORCH_CHECK_VALUE(lse.defined() && lse.dim() == 3,
                    "dilated_attention: lse must have 3 "
                    "dimensions, [batch, heads, seq]");
  check_lse_type(lse, q);
  check_lse_contiguous(lse, "[batch, heads, seq]");
}

inline void check_backward_shapes(const Shape& shape, const at::Tensor& grad_out,
                                  const at::Tensor& q, const at::Tensor& out,
                                  const at::Tensor& lse) {
  check_shapes(out.sizes() == q.sizes(), "out", out, "q", q);
  check_shapes(grad_out.sizes() == q.sizes(), "grad_out", grad_out, "q", q);
  TORCH_CHECK_VALUE(
      lse.size(0) == shape.batch && lse.size(1) == shape.num_heads && lse.size(2) == shape.seq_len,
      "dilated_attention: lse has shape ", lse.sizes(), ": expected [", shape.batch, ", ",
      shape.num_heads, ", ", shape.seq_len, "]");
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const OpConfig& op, std::int64_t num_threads) {
  check_backward(grad_out, q, k, v, out, lse);
  const Config config = make_config(op);
  const Shape shape = shape_of(q, k, v);
  check_backward_shapes(shape, grad_out, q, out, lse);
  CpuOptions options;
  options.num_threads = resolve_threads(num_threads);
  at::Tensor d_q, d_k, d_v;
  std::tie(d_q, d_k, d_v) = empty_gradients(q, k, v);
  call_cpu(q, {}, [&](auto tag) {
    using T = decltype(tag);
    dilated_attention::backward<T>(config, shape, inputs_of<T>(q, k, v),
                                   outputs_of<const T>(out, lse), const_view_of<T>(grad_out),
                                   gradients_of<T>(d_q, d_k, d_v), options);
  });
  return {d_q, d_k, d_v};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_meta(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const OpConfig& op, std::int64_t num_threads) {
  check_backward(grad_out, q, k, v, out, lse);
  check_config(op, num_threads);
  return empty_gradients(q, k, v);
}

#if defined(DILATED_ATTENTION_TORCH_CUDA)

// Calls f with a value of the CUDA storage type of the tensor's dtype.
template <class F>
void dispatch_cuda(at::ScalarType type, F&& f) {
  switch (type) {
    case at::kFloat: f(float{}); return;
    case at::kBFloat16: f(__nv_bfloat16{}); return;
    case at::kHalf: f(__half{}); return;
    default:
      TORCH_CHECK_VALUE(false, "dilated_attention: dtype ", type, " is not supported on cuda");
  }
}

// Calls f(T{}, options) for the CUDA storage type T of q's dtype, with the library's options on
// PyTorch's current stream of q's device, translating the library's errors (names: as
// translating_errors).
template <class F>
void call_cuda(const at::Tensor& q, std::initializer_list<ArgumentName> names, F&& f) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(q.device().index()).stream();
  dispatch_cuda(q.scalar_type(), [&](auto tag) {
    translating_errors(names, [&] {
      cuda::Options options;
      options.stream = stream;
      f(tag, options);
    });
  });
}

// On the current device and PyTorch's current stream; the backward's workspace comes from
// PyTorch's caching allocator (a uint8 tensor), so PyTorch owns that memory.
inline std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& q, const at::Tensor& k,
                                                       const at::Tensor& v, const OpConfig& op,
                                                       std::int64_t num_threads) {
  check_inputs(q, k, v);
  resolve_threads(num_threads);
  const Config config = make_config(op);
  const Shape shape = shape_of(q, k, v);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out, lse;
  std::tie(out, lse) = empty_outputs(q, shape);
  call_cuda(q, {}, [&](auto tag, const cuda::Options& options) {
    using T = decltype(tag);
    dilated_attention::cuda::forward<T>(config, shape, inputs_of<T>(q, k, v),
                                        outputs_of<T>(out, lse), options);
  });
  return {out, lse};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const OpConfig& op, std::int64_t num_threads) {
  check_backward(grad_out, q, k, v, out, lse);
  resolve_threads(num_threads);
  const Config config = make_config(op);
  const Shape shape = shape_of(q, k, v);
  check_backward_shapes(shape, grad_out, q, out, lse);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor d_q, d_k, d_v;
  std::tie(d_q, d_k, d_v) = empty_gradients(q, k, v);
  const std::size_t bytes =
      translating_errors([&] { return cuda::backward_workspace_size(config, shape); });
  // 256-byte alignment: the caching allocator's blocks are 512-byte aligned.
  at::Tensor workspace =
      at::empty({static_cast<std::int64_t>(bytes)}, q.options().dtype(at::kByte));
  call_cuda(q, {}, [&](auto tag, cuda::Options options) {
    using T = decltype(tag);
    options.workspace = workspace.data_ptr();
    options.workspace_bytes = bytes;
    dilated_attention::cuda::backward<T>(config, shape, inputs_of<T>(q, k, v),
                                         outputs_of<const T>(out, lse), const_view_of<T>(grad_out),
                                         gradients_of<T>(d_q, d_k, d_v), options);
  });
  return {d_q, d_k, d_v};
}

#endif  // DILATED_ATTENTION_TORCH_CUDA

}  // namespace dilated_attention::torch_ops
