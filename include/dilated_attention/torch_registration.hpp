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

#include <torch/autograd.h>
#include <torch/library.h>

#include "torch.hpp"

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
}

TORCH_LIBRARY_IMPL(dilated_attention, CPU, m) {
  namespace r = dilated_attention::torch_ops::registration;
  namespace t = dilated_attention::torch_ops;
  m.impl("forward", &r::forward_kernel<t::forward_cpu>);
  m.impl("backward", &r::backward_kernel<t::backward_cpu>);
}

TORCH_LIBRARY_IMPL(dilated_attention, Meta, m) {
  namespace r = dilated_attention::torch_ops::registration;
  namespace t = dilated_attention::torch_ops;
  m.impl("forward", &r::forward_kernel<t::forward_meta>);
  m.impl("backward", &r::backward_kernel<t::backward_meta>);
}

#if defined(DILATED_ATTENTION_TORCH_CUDA)
TORCH_LIBRARY_IMPL(dilated_attention, CUDA, m) {
  namespace r = dilated_attention::torch_ops::registration;
  namespace t = dilated_attention::torch_ops;
  m.impl("forward", &r::forward_kernel<t::forward_cuda>);
  m.impl("backward", &r::backward_kernel<t::backward_cuda>);
}
#endif

TORCH_LIBRARY_IMPL(dilated_attention, Autograd, m) {
  namespace r = dilated_attention::torch_ops::registration;
  m.impl("forward", &r::forward_autograd);
  m.impl("backward", torch::autograd::autogradNotImplementedFallback());
}
