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
//
// Each operator pair is described once (Attention, QueryRange, Varlen, Padded, KvCache below: its
// names, its own arguments and their schema); Operator<Op> derives from that description the
// schemas, the kernels in the schema's argument order and the autograd Function, and the
// TORCH_LIBRARY blocks at the end are the table of which function serves which device.

#include <torch/autograd.h>
#include <torch/library.h>

#include <cstddef>
#include <string>
#include <tuple>
#include <type_traits>

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

// The config arguments every operator takes, in the schema's order.
#define DILATED_ATTENTION_CONFIG_SCHEMA                                                       \
  "int[] segment_lengths, int[] dilation_rates, bool causal=False, str offsets=\"modular\", " \
  "str mixing=\"softmax\", float? scale=None, int num_threads=0"
#define DILATED_ATTENTION_CONFIG_PARAMETERS                                           \
  c10::IntArrayRef segment_lengths, c10::IntArrayRef dilation_rates, bool causal,     \
      c10::string_view offsets, c10::string_view mixing, std::optional<double> scale, \
      std::int64_t num_threads
#define DILATED_ATTENTION_CONFIG_ARGUMENTS \
  segment_lengths, dilation_rates, causal, offsets, mixing, scale, num_threads
#define DILATED_ATTENTION_OP_CONFIG \
  op_config(segment_lengths, dilation_rates, causal, offsets, mixing, scale), num_threads
inline constexpr std::size_t config_arguments = 7;

// An operator's own arguments, as the kernels take them.
template <class... T>
struct Args {};

// ---- the operators --------------------------------------------------------------------------
// name, backward: the operators' names (backward nullptr: inference-only). inputs: the schema's
// names of q, k, v. Own / own: the op's arguments before the config (types; schema, each followed
// by ", "); Trailing / trailing: after it (schema, each preceded by ", "). differentiable_on_cuda:
// whether the CUDA kernels have a backward.

struct Attention {
  static constexpr const char *name = "forward", *backward = "backward";
  static constexpr const char* inputs = "Tensor q, Tensor k, Tensor v";
  using Own = Args<>;
  static constexpr const char* own = "";
  using Trailing = Args<>;
  static constexpr const char* trailing = "";
  static constexpr bool differentiable_on_cuda = true;
};

struct QueryRange {
  static constexpr const char *name = "forward_query_range", *backward = "backward_query_range";
  static constexpr const char* inputs = "Tensor q, Tensor k, Tensor v";
  using Own = Args<std::int64_t>;
  static constexpr const char* own = "int query_begin, ";
  using Trailing = Args<>;
  static constexpr const char* trailing = "";
  static constexpr bool differentiable_on_cuda = false;
};

struct Varlen {
  static constexpr const char *name = "forward_varlen", *backward = "backward_varlen";
  static constexpr const char* inputs = "Tensor q, Tensor k, Tensor v";
  using Own = Args<const at::Tensor&, const at::Tensor&>;
  static constexpr const char* own = "Tensor cu_seqlens_q, Tensor cu_seqlens_k, ";
  using Trailing = Args<const std::optional<at::Tensor>&>;
  static constexpr const char* trailing = ", Tensor? query_begins=None";
  static constexpr bool differentiable_on_cuda = false;
};

struct Padded {
  static constexpr const char *name = "forward_padded", *backward = "backward_padded";
  static constexpr const char* inputs = "Tensor q, Tensor k, Tensor v";
  using Own = Args<const at::Tensor&>;
  static constexpr const char* own = "Tensor lengths, ";
  using Trailing = Args<>;
  static constexpr const char* trailing = "";
  static constexpr bool differentiable_on_cuda = false;
};

// Paged K/V and the KV cache are inference-only (the library has no backward of its paged form):
// asking for a gradient raises in the forward instead of returning none.
struct KvCache {
  static constexpr const char *name = "forward_kvcache", *backward = nullptr;
  static constexpr const char* inputs = "Tensor q, Tensor k_cache, Tensor v_cache";
  using Own = Args<const at::Tensor&>;
  static constexpr const char* own = "Tensor cache_seqlens, ";
  using Trailing = Args<const std::optional<at::Tensor>&>;
  static constexpr const char* trailing = ", Tensor? block_table=None";
  static constexpr const char* no_gradient =
      "dilated_attention::forward_kvcache is inference-only (the KV cache and paged K/V have no "
      "backward), but q, k_cache or v_cache requires grad: call it under torch.no_grad() or "
      "torch.inference_mode(), or detach the inputs; to train, use forward_varlen, "
      "forward_padded or forward_query_range";
};

// ---- autograd support -----------------------------------------------------------------------

// The operator `name` through the dispatcher, typed like a kernel of signature Signature.
template <class Signature>
c10::TypedOperatorHandle<Signature> typed_operator(const char* name) {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow((std::string("dilated_attention::") + name).c_str(), "")
      .typed<Signature>();
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

// An op's own arguments from its forward to its backward: tensors (an absent optional as an
// undefined tensor) by save_for_backward after q, k, v, out, lse, so that PyTorch checks them for
// in-place changes; integers in saved_data.
struct OwnArguments {
  torch::autograd::AutogradContext* ctx;
  std::vector<at::Tensor> tensors;
  std::size_t next_tensor = 5;
  int next_integer = 0;

  void save(const at::Tensor& t) { tensors.push_back(t); }
  void save(const std::optional<at::Tensor>& t) { tensors.push_back(t.value_or(at::Tensor())); }
  void save(std::int64_t i) { ctx->saved_data[integer_key()] = i; }

  template <class T>
  T load() {
    if constexpr (std::is_same_v<T, std::int64_t>) {
      return ctx->saved_data[integer_key()].toInt();
    } else {
      const at::Tensor& t = tensors[next_tensor++];
      if constexpr (std::is_same_v<T, std::optional<at::Tensor>>) {
        return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
      } else {
        return t;
      }
    }
  }

 private:
  std::string integer_key() { return "own_" + std::to_string(next_integer++); }
};

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

// ---- what an operator description gives ------------------------------------------------------

template <class Op, class Own = typename Op::Own, class Trailing = typename Op::Trailing>
struct Operator;

template <class Op, class... Own, class... Trailing>
struct Operator<Op, Args<Own...>, Args<Trailing...>> {
  using ForwardSignature = std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, Own..., c10::IntArrayRef,
      c10::IntArrayRef, bool, c10::string_view, c10::string_view, std::optional<double>,
      std::int64_t, Trailing...);
  using BackwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, Own..., c10::IntArrayRef, c10::IntArrayRef, bool, c10::string_view,
      c10::string_view, std::optional<double>, std::int64_t, Trailing...);

  static void define(torch::Library& m) {
    const std::string config = DILATED_ATTENTION_CONFIG_SCHEMA;
    m.def((std::string(Op::name) + "(" + Op::inputs + ", " + Op::own + config + Op::trailing +
           ") -> (Tensor out, Tensor lse)")
              .c_str());
    if constexpr (Op::backward != nullptr)
      m.def((std::string(Op::backward) + "(Tensor grad_out, " + Op::inputs +
             ", Tensor out, Tensor lse, " + Op::own + config + Op::trailing +
             ") -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)")
                .c_str());
  }

  // The kernels in the schema's argument order: torch_ops' functions take the op's own arguments
  // together, then the config.
  template <auto Forward>
  static std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& v, Own... own,
                                                    DILATED_ATTENTION_CONFIG_PARAMETERS,
                                                    Trailing... trailing) {
    return Forward(q, k, v, own..., trailing..., DILATED_ATTENTION_OP_CONFIG);
  }

  template <auto Backward>
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
      const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
      const at::Tensor& out, const at::Tensor& lse, Own... own, DILATED_ATTENTION_CONFIG_PARAMETERS,
      Trailing... trailing) {
    return Backward(grad_out, q, k, v, out, lse, own..., trailing..., DILATED_ATTENTION_OP_CONFIG);
  }

  // Registers Forward (and Backward, for an op that has one) as the kernels of a device.
  template <auto Forward, auto Backward = nullptr>
  static void impl(torch::Library& m) {
    m.impl(Op::name, &forward<Forward>);
    if constexpr (!std::is_null_pointer_v<decltype(Backward)>)
      m.impl(Op::backward, &backward<Backward>);
  }

  // Autograd: saves q, k, v, out, lse and the op's own arguments; its backward is the op's
  // backward operator.
  class Function : public torch::autograd::Function<Function> {
   public:
    static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                  const at::Tensor& q, const at::Tensor& k,
                                                  const at::Tensor& v, Own... own,
                                                  DILATED_ATTENTION_CONFIG_PARAMETERS,
                                                  Trailing... trailing) {
      at::AutoDispatchBelowADInplaceOrView guard;
      static const auto op = typed_operator<ForwardSignature>(Op::name);
      // No structured bindings here: GCC 12 cannot brace-initialise a variable_list from them in
      // a template.
      at::Tensor out, lse;
      std::tie(out, lse) =
          op.call(q, k, v, own..., DILATED_ATTENTION_CONFIG_ARGUMENTS, trailing...);
      OwnArguments kept{ctx, {q, k, v, out, lse}};
      (kept.save(own), ...);
      (kept.save(trailing), ...);
      ctx->save_for_backward(kept.tensors);
      save_config(ctx, DILATED_ATTENTION_CONFIG_ARGUMENTS);
      ctx->mark_non_differentiable({lse});
      return {out, lse};
    }

    static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                   torch::autograd::variable_list grads) {
      OwnArguments kept{ctx, ctx->get_saved_variables()};
      const at::Tensor &q = kept.tensors[0], &k = kept.tensors[1], &v = kept.tensors[2],
                       &out = kept.tensors[3], &lse = kept.tensors[4];
      // Braced lists: loaded in order, as they were saved.
      const std::tuple<std::decay_t<Own>...> own{kept.load<std::decay_t<Own>>()...};
      const std::tuple<std::decay_t<Trailing>...> trailing{kept.load<std::decay_t<Trailing>>()...};
      const SavedConfig c = saved_config(ctx);
      static const auto op = typed_operator<BackwardSignature>(Op::backward);
      at::Tensor d_q, d_k, d_v;
      std::tie(d_q, d_k, d_v) = std::apply(
          [&](const auto&... own_arguments) {
            return std::apply(
                [&](const auto&... trailing_arguments) {
                  return op.call(usable_grad(grads[0], out), q, k, v, out, lse, own_arguments...,
                                 DILATED_ATTENTION_SAVED_CONFIG(c), trailing_arguments...);
                },
                trailing);
          },
          own);
      // A gradient for q, k, v; none for the other arguments.
      torch::autograd::variable_list result(3 + sizeof...(Own) + config_arguments +
                                            sizeof...(Trailing));
      result[0] = d_q, result[1] = d_k, result[2] = d_v;
      return result;
    }
  };

  static std::tuple<at::Tensor, at::Tensor> autograd(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& v, Own... own,
                                                     DILATED_ATTENTION_CONFIG_PARAMETERS,
                                                     Trailing... trailing) {
    if constexpr (!Op::differentiable_on_cuda)
      if (wants_grad({q, k, v})) check_differentiable_device(Op::name, q);
    auto result = Function::apply(q, k, v, own..., DILATED_ATTENTION_CONFIG_ARGUMENTS, trailing...);
    return {result[0], result[1]};
  }

  // The Autograd kernel of an inference-only op: raises when a gradient is asked for.
  static std::tuple<at::Tensor, at::Tensor> inference_only(const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v, Own... own,
                                                           DILATED_ATTENTION_CONFIG_PARAMETERS,
                                                           Trailing... trailing) {
    TORCH_CHECK_NOT_IMPLEMENTED(!wants_grad({q, k, v}), Op::no_gradient);
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = typed_operator<ForwardSignature>(Op::name);
    return op.call(q, k, v, own..., DILATED_ATTENTION_CONFIG_ARGUMENTS, trailing...);
  }

  static void impl_autograd(torch::Library& m) {
    if constexpr (Op::backward == nullptr) {
      m.impl(Op::name, &inference_only);
    } else {
      m.impl(Op::name, &autograd);
      m.impl(Op::backward, torch::autograd::autogradNotImplementedFallback());
    }
  }
};

#undef DILATED_ATTENTION_SAVED_CONFIG
#undef DILATED_ATTENTION_OP_CONFIG
#undef DILATED_ATTENTION_CONFIG_ARGUMENTS
#undef DILATED_ATTENTION_CONFIG_PARAMETERS
#undef DILATED_ATTENTION_CONFIG_SCHEMA

}  // namespace dilated_attention::torch_ops::registration

TORCH_LIBRARY(dilated_attention, m) {
  namespace r = dilated_attention::torch_ops::registration;
  r::Operator<r::Attention>::define(m);
  r::Operator<r::QueryRange>::define(m);  // the inference forms (docs/torch.md)
  r::Operator<r::Varlen>::define(m);
  r::Operator<r::Padded>::define(m);
  r::Operator<r::KvCache>::define(m);
}

TORCH_LIBRARY_IMPL(dilated_attention, CPU, m) {
  namespace r = dilated_attention::torch_ops::registration;
  namespace t = dilated_attention::torch_ops;
  r::Operator<r::Attention>::impl<t::forward_cpu, t::backward_cpu>(m);
  r::Operator<r::QueryRange>::impl<t::forward_query_range_cpu, t::backward_query_range_cpu>(m);
  r::Operator<r::Varlen>::impl<t::forward_varlen_cpu, t::backward_varlen_cpu>(m);
  r::Operator<r::Padded>::impl<t::forward_padded_cpu, t::backward_padded_cpu>(m);
  r::Operator<r::KvCache>::impl<t::forward_kvcache_cpu>(m);
}

TORCH_LIBRARY_IMPL(dilated_attention, Meta, m) {
  namespace r = dilated_attention::torch_ops::registration;
  namespace t = dilated_attention::torch_ops;
  r::Operator<r::Attention>::impl<t::forward_meta, t::backward_meta>(m);
  r::Operator<r::QueryRange>::impl<t::forward_query_range_meta, t::backward_query_range_meta>(m);
  r::Operator<r::Varlen>::impl<t::forward_varlen_meta, t::backward_varlen_meta>(m);
  r::Operator<r::Padded>::impl<t::forward_padded_meta, t::backward_padded_meta>(m);
  r::Operator<r::KvCache>::impl<t::forward_kvcache_meta>(m);
}

#if defined(DILATED_ATTENTION_TORCH_CUDA)
TORCH_LIBRARY_IMPL(dilated_attention, CUDA, m) {
  namespace r = dilated_attention::torch_ops::registration;
  namespace t = dilated_attention::torch_ops;
  r::Operator<r::Attention>::impl<t::forward_cuda, t::backward_cuda>(m);
  r::Operator<r::QueryRange>::impl<t::forward_query_range_cuda, t::backward_query_range_cuda>(m);
  r::Operator<r::Varlen>::impl<t::forward_varlen_cuda, t::backward_varlen_cuda>(m);
  r::Operator<r::Padded>::impl<t::forward_padded_cuda, t::backward_padded_cuda>(m);
  r::Operator<r::KvCache>::impl<t::forward_kvcache_cuda>(m);
}
#endif

TORCH_LIBRARY_IMPL(dilated_attention, Autograd, m) {
  namespace r = dilated_attention::torch_ops::registration;
  r::Operator<r::Attention>::impl_autograd(m);
  r::Operator<r::QueryRange>::impl_autograd(m);
  r::Operator<r::Varlen>::impl_autograd(m);
  r::Operator<r::Padded>::impl_autograd(m);
  r::Operator<r::KvCache>::impl_autograd(m);
}
