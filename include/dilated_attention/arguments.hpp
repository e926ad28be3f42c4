#pragma once
// The grouped arguments of every entry point (docs/semantics.md "Entry points"). A call names the
// role of each tensor by the group it sits in, instead of passing up to nine views side by side:
//
//   forward(config, shape, Inputs<T>{q, k, v}, Outputs<T>{out, lse}[, options]);
//   backward(config, shape, Inputs<T>{q, k, v}, Outputs<const T>{out, lse}, d_out,
//            Gradients<T>{d_q, d_k, d_v}[, options]);
//
// (the ring adds its transport after `shape`). The members can also be set by name
// (`Inputs<float> in; in.q = ...;`), which is how a caller rules out a k/v swap altogether.
// Aggregates with deduction guides: `Outputs{out, lse}` deduces T from `out`.

#include <type_traits>

#include "config.hpp"

namespace dilated_attention {

// What a call reads: the queries [B, N, H, D] and the keys and values [B, N, Hkv, D].
template <class T>
struct Inputs {
  View<const T> q, k, v;
};

// What the forward writes: O [B, N, H, D] and, when `lse` is not null, the log-sum-exp
// [B, H, N] (contiguous) of lse_type_t<T> -- double for double storage, float for every other
// type, on every device. Outputs<const T> is the same pair as the backward reads it back;
// Outputs<T> converts to it, so the forward's group can be passed to the backward as it is.
template <class T>
struct Outputs {
  using lse_type = std::conditional_t<std::is_const_v<T>, const lse_type_t<T>, lse_type_t<T>>;

  View<T> out;
  lse_type* lse = nullptr;

  template <class U = T, std::enable_if_t<!std::is_const_v<U>, int> = 0>
  operator Outputs<const U>() const {
    return Outputs<const U>{out, lse};
  }
};

// What the backward writes: dQ [B, N, H, D], dK and dV [B, N, Hkv, D], all overwritten.
template <class T>
struct Gradients {
  View<T> d_q, d_k, d_v;
};

template <class T>
Inputs(View<T>, View<T>, View<T>) -> Inputs<std::remove_const_t<T>>;
template <class T>
Outputs(View<T>) -> Outputs<T>;
template <class T, class L>
Outputs(View<T>, L*) -> Outputs<T>;
template <class T>
Gradients(View<T>, View<T>, View<T>) -> Gradients<T>;

}  // namespace dilated_attention
