#pragma once
// The PyTorch operators (docs/torch.md): include this header in exactly one translation unit of a
// program or extension -- it defines TORCH_LIBRARY(dilated_attention, m) -- and every other file
// uses <dilated_attention/torch.hpp> or the operators through the dispatcher. The one-line
// source of both loading paths is
//
//   #include <dilated_attention/torch_registration.hpp>
//
// Registered, in namespace `dilated_attention`:
//   forward(q, k, v, segment_lengths, dilation_rates, causal, offsets, mixing, scale,
//           num_threads) -> (out, lse)
//   backward(grad_out, q, k, v, out, lse, <the same config>) -> (grad_q, grad_k, grad_v)
// with kernels for CPU, Meta (shapes only: FakeTensor and torch.compile use it) and, when this
// translation unit is compiled by nvcc, CUDA; and an Autograd kernel for `forward` whose backward
// is the `backward` operator (the library's own backward; nothing is recomputed in PyTorch).
// `lse` is returned for merging and is not differentiable (marked so). `backward` itself has no
// derivative (double backward raises).
//
// The inference forms (<dilated_attention/torch_inference.hpp>), with the same config arguments:
//   forward_query_range(q, k, v, query_begin, ...)          decode, chunked prefill
//   forward_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, ..., query_begins=None)
//   forward_padded(q, k, v, lengths, ...)
//   forward_kvcache(q, k_cache, v_cache, cache_seqlens, ..., block_table=None)
// and backward_query_range / backward_varlen / backward_padded, their Autograd backward (CPU; on
// cuda the Autograd kernels refuse a forward that needs a gradient). forward_kvcache is
// inference-only: its Autograd kernel raises when an input requires grad.

#include <torch/autograd.h>
#include <torch/library.h>

#include "torch.hpp"
#include "torch_inference.hpp"

namespace dilated_attention::torch_ops::registration {

inline OpConfig op_config(c10::IntArrayRef segment_lengths, c10::IntArrayRef dilation_rates,
                          bool causal, c10::string_view offsets, c10::string_view mixing,
                          std::optional<double> scale) {
  OpConfig op;
  op.segment_lengths.assign(segment_lengths.begin(), segment_lengths.end());
  op.dilation_rates.assign(dilation_rates.begin(), dilation_rates.end());
  op.causal = causal;
  op.offsets = std::string(offsets);
  op.mixing = std::string(mixing);
  op.scale = scale;
  return op;
}

// The kernels in the schema's argument order, for each device.
template <auto Forward>
std::tuple<at::Tensor, at::Tensor> forward_kernel(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, c10::IntArrayRef segment_lengths,
    c10::IntArrayRef dilation_rates, bool causal, c10::string_view offsets, c10::string_view mixing,
    std::optional<double> scale, std::int64_t num_threads) {
  return Forward(q, k, v,
                 op_config(segment_lengths, dilation_rates, causal, offsets, mixing, scale),
                 num_threads);
}

template <auto Backward>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_kernel(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, c10::IntArrayRef segment_lengths,
    c10::IntArrayRef dilation_rates, bool causal, c10::string_view offsets, c10::string_view mixing,
    std::optional<double> scale, std::int64_t num_threads) {
  return Backward(grad_out, q, k, v, out, lse,
                  op_config(segment_lengths, dilation_rates, causal, offsets, mixing, scale),
                  num_threads);
}

inline std::tuple<at::Tensor, at::Tensor> call_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, c10::IntArrayRef segment_lengths,
    c10::IntArrayRef dilation_rates, bool causal, c10::string_view offsets, c10::string_view mixing,
    std::optional<double> scale, std::int64_t num_threads) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("dilated_attention::forward", "")
                             .typed<decltype(forward_kernel<forward_cpu>)>();
  return op.call(q, k, v, segment_lengths, dilation_rates, causal, offsets, mixing, scale,
                 num_threads);
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> call_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, c10::IntArrayRef segment_lengths,
    c10::IntArrayRef dilation_rates, bool causal, c10::string_view offsets, c10::string_view mixing,
    std::optional<double> scale, std::int64_t num_threads) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("dilated_attention::backward", "")
                             .typed<decltype(backward_kernel<backward_cpu>)>();
  return op.call(grad_out, q, k, v, out, lse, segment_lengths, dilation_rates, causal, offsets,
                 mixing, scale, num_threads);
}

// Autograd: saves q, k, v, out, lse; its backward is the `backward` operator.
class Function : public torch::autograd::Function<Function> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
      const at::Tensor& v, c10::IntArrayRef segment_lengths, c10::IntArrayRef dilation_rates,
      bool causal, c10::string_view offsets, c10::string_view mixing, std::optional<double> scale,
      std::int64_t num_threads) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = call_forward(q, k, v, segment_lengths, dilation_rates, causal, offsets,
                                   mixing, scale, num_threads);
    ctx->save_for_backward({q, k, v, out, lse});
    ctx->saved_data["segment_lengths"] = segment_lengths.vec();
    ctx->saved_data["dilation_rates"] = dilation_rates.vec();
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["offsets"] = std::string(offsets);
    ctx->saved_data["mixing"] = std::string(mixing);
    ctx->saved_data["has_scale"] = scale.has_value();
    ctx->saved_data["scale"] = scale.value_or(0.0);
    ctx->saved_data["num_threads"] = num_threads;
    ctx->mark_non_differentiable({lse});
    return {out, lse};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3], &lse = saved[4];
    at::Tensor grad_out = grads[0];
    if (!grad_out.defined()) grad_out = at::zeros_like(out);
    if (grad_out.stride(3) != 1 && grad_out.size(3) != 1) grad_out = grad_out.contiguous();
    const auto segment_lengths = ctx->saved_data["segment_lengths"].toIntVector();
    const auto dilation_rates = ctx->saved_data["dilation_rates"].toIntVector();
    const std::string offsets = ctx->saved_data["offsets"].toStringRef();
    const std::string mixing = ctx->saved_data["mixing"].toStringRef();
    std::optional<double> scale;
    if (ctx->saved_data["has_scale"].toBool()) scale = ctx->saved_data["scale"].toDouble();
    auto [d_q, d_k, d_v] =
        call_backward(grad_out, q, k, v, out, lse, segment_lengths, dilation_rates,
                      ctx->saved_data["causal"].toBool(), offsets, mixing, scale,
                      ctx->saved_data["num_threads"].toInt());
    return {d_q,          d_k,          d_v,          at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

inline std::tuple<at::Tensor, at::Tensor> forward_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, c10::IntArrayRef segment_lengths,
    c10::IntArrayRef dilation_rates, bool causal, c10::string_view offsets, c10::string_view mixing,
    std::optional<double> scale, std::int64_t num_threads) {
  auto result = Function::apply(q, k, v, segment_lengths, dilation_rates, causal, offsets, mixing,
                                scale, num_threads);
  return {result[0], result[1]};
}

// ---- the inference forms (docs/torch.md "Inference forms") -------------------------------------

// The config arguments every operator takes, in the schema's order.
#define DILATED_ATTENTION_CONFIG_PARAMETERS                                           \
  c10::IntArrayRef segment_lengths, c10::IntArrayRef dilation_rates, bool causal,     \
      c10::string_view offsets, c10::string_view mixing, std::optional<double> scale, \
      std::int64_t num_threads
#define DILATED_ATTENTION_CONFIG_ARGUMENTS \
  segment_lengths, dilation_rates, causal, offsets, mixing, scale, num_threads
#define DILATED_ATTENTION_OP_CONFIG \
  op_config(segment_lengths, dilation_rates, causal, offsets, mixing, scale), num_threads

template <auto Forward>
std::tuple<at::Tensor, at::Tensor> query_range_forward_kernel(const at::Tensor& q,
                                                              const at::Tensor& k,
                                                              const at::Tensor& v,
                                                              std::int64_t query_begin,
                                                              DILATED_ATTENTION_CONFIG_PARAMETERS) {
  return Forward(q, k, v, query_begin, DILATED_ATTENTION_OP_CONFIG);
}

template <auto Backward>
std::tuple<at::Tensor, at::Tensor, at::Tensor> query_range_backward_kernel(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, std::int64_t query_begin,
    DILATED_ATTENTION_CONFIG_PARAMETERS) {
  return Backward(grad_out, q, k, v, out, lse, query_begin, DILATED_ATTENTION_OP_CONFIG);
}

template <auto Forward>
std::tuple<at::Tensor, at::Tensor> varlen_forward_kernel(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, DILATED_ATTENTION_CONFIG_PARAMETERS,
    const std::optional<at::Tensor>& query_begins) {
  return Forward(q, k, v, cu_seqlens_q, cu_seqlens_k, query_begins, DILATED_ATTENTION_OP_CONFIG);
}

template <auto Backward>
std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_backward_kernel(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, DILATED_ATTENTION_CONFIG_PARAMETERS,
    const std::optional<at::Tensor>& query_begins) {
  return Backward(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, query_begins,
                  DILATED_ATTENTION_OP_CONFIG);
}

template <auto Forward>
std::tuple<at::Tensor, at::Tensor> padded_forward_kernel(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v,
                                                         const at::Tensor& lengths,
                                                         DILATED_ATTENTION_CONFIG_PARAMETERS) {
  return Forward(q, k, v, lengths, DILATED_ATTENTION_OP_CONFIG);
}

template <auto Backward>
std::tuple<at::Tensor, at::Tensor, at::Tensor> padded_backward_kernel(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& lengths,
    DILATED_ATTENTION_CONFIG_PARAMETERS) {
  return Backward(grad_out, q, k, v, out, lse, lengths, DILATED_ATTENTION_OP_CONFIG);
}

template <auto Forward>
std::tuple<at::Tensor, at::Tensor> kvcache_forward_kernel(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& cache_seqlens, DILATED_ATTENTION_CONFIG_PARAMETERS,
    const std::optional<at::Tensor>& block_table) {
  return Forward(q, k_cache, v_cache, cache_seqlens, block_table, DILATED_ATTENTION_OP_CONFIG);
}

// The operator `name` through the dispatcher, typed like the kernel wrapper Kernel.
template <class Kernel>
c10::TypedOperatorHandle<Kernel> typed_operator(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Kernel>();
}

// The config as an autograd context keeps it between forward and backward.
struct SavedConfig {
  std::vector<std::int64_t> segment_lengths, dilation_rates;
  bool causal = false;
  std::string offsets, mixing;
  std::optional<double> scale;
  std::int64_t num_threads = 0;
};

inline void save_config(torch::autograd::AutogradContext* ctx,
                        DILATED_ATTENTION_CONFIG_PARAMETERS) {
  ctx->saved_data["segment_lengths"] = segment_lengths.vec();
  ctx->saved_data["dilation_rates"] = dilation_rates.vec();
  ctx->saved_data["causal"] = causal;
  ctx->saved_data["offsets"] = std::string(offsets);
  ctx->saved_data["mixing"] = std::string(mixing);
  ctx->saved_data["has_scale"] = scale.has_value();
  ctx->saved_data["scale"] = scale.value_or(0.0);
  ctx->saved_data["num_threads"] = num_threads;
}

inline SavedConfig saved_config(torch::autograd::AutogradContext* ctx) {
  SavedConfig c;
  c.segment_lengths = ctx->saved_data["segment_lengths"].toIntVector();
  c.dilation_rates = ctx->saved_data["dilation_rates"].toIntVector();
  c.causal = ctx->saved_data["causal"].toBool();
  c.offsets = ctx->saved_data["offsets"].toStringRef();
  c.mixing = ctx->saved_data["mixing"].toStringRef();
  if (ctx->saved_data["has_scale"].toBool()) c.scale = ctx->saved_data["scale"].toDouble();
  c.num_threads = ctx->saved_data["num_threads"].toInt();
  return c;
}

#define DILATED_ATTENTION_SAVED_CONFIG(c) \
  c.segment_lengths, c.dilation_rates, c.causal, c.offsets, c.mixing, c.scale, c.num_threads

// The incoming gradient of `out` as the backward operators take it.
inline at::Tensor usable_grad(const at::Tensor& grad, const at::Tensor& out) {
  if (!grad.defined()) return at::zeros_like(out);
  const std::int64_t last = grad.dim() - 1;
  if (grad.stride(last) != 1 && grad.size(last) != 1) return grad.contiguous();
  return grad;
}

inline bool wants_grad(std::initializer_list<at::Tensor> tensors) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor& t : tensors)
    if (t.requires_grad()) return true;
  return false;
}

// The CUDA inference forms are forward-only: refuse in the forward rather than at backward time.
inline void check_differentiable_device(const char* op, const at::Tensor& q) {
  TORCH_CHECK_NOT_IMPLEMENTED(!q.is_cuda(), "dilated_attention::", op,
                              ": no cuda backward (the library's CUDA inference forms are "
                              "forward-only): call it under torch.no_grad() on cuda, or on "
                              "the cpu to differentiate it");
}

class QueryRangeFunction : public torch::autograd::Function<QueryRangeFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& v, std::int64_t query_begin,
                                                DILATED_ATTENTION_CONFIG_PARAMETERS) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op =
        typed_operator<decltype(query_range_forward_kernel<forward_query_range_cpu>)>(
            "dilated_attention::forward_query_range");
    auto [out, lse] = op.call(q, k, v, query_begin, DILATED_ATTENTION_CONFIG_ARGUMENTS);
    ctx->save_for_backward({q, k, v, out, lse});
    save_config(ctx, DILATED_ATTENTION_CONFIG_ARGUMENTS);
    ctx->saved_data["query_begin"] = query_begin;
    ctx->mark_non_differentiable({lse});
    return {out, lse};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3], &lse = saved[4];
    const SavedConfig c = saved_config(ctx);
    static const auto op =
        typed_operator<decltype(query_range_backward_kernel<backward_query_range_cpu>)>(
            "dilated_attention::backward_query_range");
    auto [d_q, d_k, d_v] =
        op.call(usable_grad(grads[0], out), q, k, v, out, lse,
                ctx->saved_data["query_begin"].toInt(), DILATED_ATTENTION_SAVED_CONFIG(c));
    torch::autograd::variable_list result(11);  // q, k, v, query_begin, 7 config arguments
    result[0] = d_q, result[1] = d_k, result[2] = d_v;
    return result;
  }
};

class VarlenFunction : public torch::autograd::Function<VarlenFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                                                const at::Tensor& cu_seqlens_k,
                                                DILATED_ATTENTION_CONFIG_PARAMETERS,
                                                const std::optional<at::Tensor>& query_begins) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = typed_operator<decltype(varlen_forward_kernel<forward_varlen_cpu>)>(
        "dilated_attention::forward_varlen");
    auto [out, lse] = op.call(q, k, v, cu_seqlens_q, cu_seqlens_k,
                              DILATED_ATTENTION_CONFIG_ARGUMENTS, query_begins);
    ctx->save_for_backward(
        {q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, query_begins.value_or(at::Tensor())});
    save_config(ctx, DILATED_ATTENTION_CONFIG_ARGUMENTS);
    ctx->mark_non_differentiable({lse});
    return {out, lse};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3], &lse = saved[4];
    std::optional<at::Tensor> query_begins;
    if (saved[7].defined()) query_begins = saved[7];
    const SavedConfig c = saved_config(ctx);
    static const auto op = typed_operator<decltype(varlen_backward_kernel<backward_varlen_cpu>)>(
        "dilated_attention::backward_varlen");
    auto [d_q, d_k, d_v] = op.call(usable_grad(grads[0], out), q, k, v, out, lse, saved[5],
                                   saved[6], DILATED_ATTENTION_SAVED_CONFIG(c), query_begins);
    // q, k, v, cu_seqlens_q, cu_seqlens_k, 7 config arguments, query_begins
    torch::autograd::variable_list result(13);
    result[0] = d_q, result[1] = d_k, result[2] = d_v;
    return result;
  }
};

class PaddedFunction : public torch::autograd::Function<PaddedFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& v, const at::Tensor& lengths,
                                                DILATED_ATTENTION_CONFIG_PARAMETERS) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = typed_operator<decltype(padded_forward_kernel<forward_padded_cpu>)>(
        "dilated_attention::forward_padded");
    auto [out, lse] = op.call(q, k, v, lengths, DILATED_ATTENTION_CONFIG_ARGUMENTS);
    ctx->save_for_backward({q, k, v, out, lse, lengths});
    save_config(ctx, DILATED_ATTENTION_CONFIG_ARGUMENTS);
    ctx->mark_non_differentiable({lse});
    return {out, lse};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3], &lse = saved[4];
    const SavedConfig c = saved_config(ctx);
    static const auto op = typed_operator<decltype(padded_backward_kernel<backward_padded_cpu>)>(
        "dilated_attention::backward_padded");
    auto [d_q, d_k, d_v] = op.call(usable_grad(grads[0], out), q, k, v, out, lse, saved[5],
                                   DILATED_ATTENTION_SAVED_CONFIG(c));
    torch::autograd::variable_list result(11);  // q, k, v, lengths, 7 config arguments
    result[0] = d_q, result[1] = d_k, result[2] = d_v;
    return result;
  }
};

inline std::tuple<at::Tensor, at::Tensor> forward_query_range_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, std::int64_t query_begin,
    DILATED_ATTENTION_CONFIG_PARAMETERS) {
  if (wants_grad({q, k, v})) check_differentiable_device("forward_query_range", q);
  auto result = QueryRangeFunction::apply(q, k, v, query_begin, DILATED_ATTENTION_CONFIG_ARGUMENTS);
  return {result[0], result[1]};
}

inline std::tuple<at::Tensor, at::Tensor> forward_varlen_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, DILATED_ATTENTION_CONFIG_PARAMETERS,
    const std::optional<at::Tensor>& query_begins) {
  if (wants_grad({q, k, v})) check_differentiable_device("forward_varlen", q);
  auto result = VarlenFunction::apply(q, k, v, cu_seqlens_q, cu_seqlens_k,
                                      DILATED_ATTENTION_CONFIG_ARGUMENTS, query_begins);
  return {result[0], result[1]};
}

inline std::tuple<at::Tensor, at::Tensor> forward_padded_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lengths,
    DILATED_ATTENTION_CONFIG_PARAMETERS) {
  if (wants_grad({q, k, v})) check_differentiable_device("forward_padded", q);
  auto result = PaddedFunction::apply(q, k, v, lengths, DILATED_ATTENTION_CONFIG_ARGUMENTS);
  return {result[0], result[1]};
}

// Paged K/V and the KV cache are inference-only (the library has no backward of its paged
// form): asking for a gradient raises here, in the forward, instead of returning none.
inline std::tuple<at::Tensor, at::Tensor> forward_kvcache_autograd(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& cache_seqlens, DILATED_ATTENTION_CONFIG_PARAMETERS,
    const std::optional<at::Tensor>& block_table) {
  TORCH_CHECK_NOT_IMPLEMENTED(
      !wants_grad({q, k_cache, v_cache}),
      "dilated_attention::forward_kvcache is inference-only (the KV cache and paged K/V have no "
      "backward), but q, k_cache or v_cache requires grad: call it under torch.no_grad() or "
      "torch.inference_mode(), or detach the inputs; to train, use forward_varlen, "
      "forward_padded or forward_query_range");
  at::AutoDispatchBelowADInplaceOrView guard;
  static const auto op = typed_operator<decltype(kvcache_forward_kernel<forward_kvcache_cpu>)>(
      "dilated_attention::forward_kvcache");
  return op.call(q, k_cache, v_cache, cache_seqlens, DILATED_ATTENTION_CONFIG_ARGUMENTS,
                 block_table);
}

#undef DILATED_ATTENTION_SAVED_CONFIG
#undef DILATED_ATTENTION_OP_CONFIG
#undef DILATED_ATTENTION_CONFIG_ARGUMENTS
#undef DILATED_ATTENTION_CONFIG_PARAMETERS

}  // namespace dilated_attention::torch_ops::registration

TORCH_LIBRARY(dilated_attention, m) {
  m.def(
      "forward(Tensor q, Tensor k, Tensor v, int[] segment_lengths, int[] dilation_rates, "
      "bool causal=False, str offsets=\"modular\", str mixing=\"softmax\", float? scale=None, "
      "int num_threads=0) -> (Tensor out, Tensor lse)");
  m.def(
      "backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "int[] segment_lengths, int[] dilation_rates, bool causal=False, str offsets=\"modular\", "
      "str mixing=\"softmax\", float? scale=None, int num_threads=0) "
      "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  // The inference forms (docs/torch.md "Inference forms").
  m.def(
      "forward_query_range(Tensor q, Tensor k, Tensor v, int query_begin, int[] segment_lengths, "
      "int[] dilation_rates, bool causal=False, str offsets=\"modular\", str mixing=\"softmax\", "
      "float? scale=None, int num_threads=0) -> (Tensor out, Tensor lse)");
  m.def(
      "backward_query_range(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, int query_begin, int[] segment_lengths, int[] dilation_rates, "
      "bool causal=False, str offsets=\"modular\", str mixing=\"softmax\", float? scale=None, "
      "int num_threads=0) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  m.def(
      "forward_varlen(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "int[] segment_lengths, int[] dilation_rates, bool causal=False, "
      "str offsets=\"modular\", str mixing=\"softmax\", float? scale=None, int num_threads=0, "
      "Tensor? query_begins=None) -> (Tensor out, Tensor lse)");
  m.def(
      "backward_varlen(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int[] segment_lengths, int[] dilation_rates, "
      "bool causal=False, str offsets=\"modular\", str mixing=\"softmax\", float? scale=None, "
      "int num_threads=0, Tensor? query_begins=None) "
      "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  m.def(
      "forward_padded(Tensor q, Tensor k, Tensor v, Tensor lengths, int[] segment_lengths, "
      "int[] dilation_rates, bool causal=False, str offsets=\"modular\", str mixing=\"softmax\", "
      "float? scale=None, int num_threads=0) -> (Tensor out, Tensor lse)");
  m.def(
      "backward_padded(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor lengths, int[] segment_lengths, int[] dilation_rates, bool causal=False, "
      "str offsets=\"modular\", str mixing=\"softmax\", float? scale=None, int num_threads=0) "
      "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  m.def(
      "forward_kvcache(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, "
      "int[] segment_lengths, int[] dilation_rates, bool causal=False, "
      "str offsets=\"modular\", str mixing=\"softmax\", float? scale=None, int num_threads=0, "
      "Tensor? block_table=None) -> (Tensor out, Tensor lse)");
}

TORCH_LIBRARY_IMPL(dilated_attention, CPU, m) {
  namespace r = dilated_attention::torch_ops::registration;
  namespace t = dilated_attention::torch_ops;
  m.impl("forward", &r::forward_kernel<t::forward_cpu>);
  m.impl("backward", &r::backward_kernel<t::backward_cpu>);
  m.impl("forward_query_range", &r::query_range_forward_kernel<t::forward_query_range_cpu>);
  m.impl("backward_query_range", &r::query_range_backward_kernel<t::backward_query_range_cpu>);
  m.impl("forward_varlen", &r::varlen_forward_kernel<t::forward_varlen_cpu>);
  m.impl("backward_varlen", &r::varlen_backward_kernel<t::backward_varlen_cpu>);
  m.impl("forward_padded", &r::padded_forward_kernel<t::forward_padded_cpu>);
  m.impl("backward_padded", &r::padded_backward_kernel<t::backward_padded_cpu>);
  m.impl("forward_kvcache", &r::kvcache_forward_kernel<t::forward_kvcache_cpu>);
}

TORCH_LIBRARY_IMPL(dilated_attention, Meta, m) {
  namespace r = dilated_attention::torch_ops::registration;
  namespace t = dilated_attention::torch_ops;
  m.impl("forward", &r::forward_kernel<t::forward_meta>);
  m.impl("backward", &r::backward_kernel<t::backward_meta>);
  m.impl("forward_query_range", &r::query_range_forward_kernel<t::forward_query_range_meta>);
  m.impl("backward_query_range", &r::query_range_backward_kernel<t::backward_query_range_meta>);
  m.impl("forward_varlen", &r::varlen_forward_kernel<t::forward_varlen_meta>);
  m.impl("backward_varlen", &r::varlen_backward_kernel<t::backward_varlen_meta>);
  m.impl("forward_padded", &r::padded_forward_kernel<t::forward_padded_meta>);
  m.impl("backward_padded", &r::padded_backward_kernel<t::backward_padded_meta>);
  m.impl("forward_kvcache", &r::kvcache_forward_kernel<t::forward_kvcache_meta>);
}

#if defined(DILATED_ATTENTION_TORCH_CUDA)
TORCH_LIBRARY_IMPL(dilated_attention, CUDA, m) {
  namespace r = dilated_attention::torch_ops::registration;
  namespace t = dilated_attention::torch_ops;
  m.impl("forward", &r::forward_kernel<t::forward_cuda>);
  m.impl("backward", &r::backward_kernel<t::backward_cuda>);
  m.impl("forward_query_range", &r::query_range_forward_kernel<t::forward_query_range_cuda>);
  m.impl("backward_query_range", &r::query_range_backward_kernel<t::backward_query_range_cuda>);
  m.impl("forward_varlen", &r::varlen_forward_kernel<t::forward_varlen_cuda>);
  m.impl("backward_varlen", &r::varlen_backward_kernel<t::backward_varlen_cuda>);
  m.impl("forward_padded", &r::padded_forward_kernel<t::forward_padded_cuda>);
  m.impl("backward_padded", &r::padded_backward_kernel<t::backward_padded_cuda>);
  m.impl("forward_kvcache", &r::kvcache_forward_kernel<t::forward_kvcache_cuda>);
}
#endif

TORCH_LIBRARY_IMPL(dilated_attention, Autograd, m) {
  namespace r = dilated_attention::torch_ops::registration;
  m.impl("forward", &r::forward_autograd);
  m.impl("backward", torch::autograd::autogradNotImplementedFallback());
  m.impl("forward_query_range", &r::forward_query_range_autograd);
  m.impl("forward_varlen", &r::forward_varlen_autograd);
  m.impl("forward_padded", &r::forward_padded_autograd);
  m.impl("forward_kvcache", &r::forward_kvcache_autograd);
  for (const char* name : {"backward_query_range", "backward_varlen", "backward_padded"})
    m.impl(name, torch::autograd::autogradNotImplementedFallback());
}
