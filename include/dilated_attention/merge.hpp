#pragma once
// Partial results and how they combine. A partial is (o, lse) for one query row: o normalised
// over some set of keys, lse = ln sum exp(score) over that set. Two partials over disjoint key
// multisets merge into the partial over their union; an empty partial (lse = -inf, o = 0) is the
// identity, so merging never produces NaN. The same algebra is the online softmax: a running
// (max, sum) state folded one key tile at a time.

#include <cmath>

#include "host_device.hpp"

namespace dilated_attention {

template <class Acc>
DILATED_ATTENTION_HOST_DEVICE Acc negative_infinity() {
  // INFINITY rather than numeric_limits: a plain constant that device code may use.
  return -static_cast<Acc>(INFINITY);
}

// ln(exp(a) + exp(b)), exact for -inf on either side.
template <class Acc>
DILATED_ATTENTION_HOST_DEVICE Acc log_add_exp(Acc a, Acc b) {
  // A NaN must survive on either side: max/min by comparison would drop it against -inf (an
  // empty partial), and a NaN row merged with an empty one would then look empty.
  if (a != a) return a;
  if (b != b) return b;
  const Acc hi = a > b ? a : b, lo = a > b ? b : a;
  if (hi == negative_infinity<Acc>()) return hi;
  return hi + std::log1p(std::exp(lo - hi));
}

// The weights that merge partial a and partial b: o = wa * o_a + wb * o_b, with lse = merged.
template <class Acc>
struct MergeWeights {
  Acc a, b, lse;
};

template <class Acc>
DILATED_ATTENTION_HOST_DEVICE MergeWeights<Acc> merge_weights(Acc lse_a, Acc lse_b) {
  const Acc lse = log_add_exp(lse_a, lse_b);
  if (lse == negative_infinity<Acc>()) return {Acc(0), Acc(0), lse};
  return {std::exp(lse_a - lse), std::exp(lse_b - lse), lse};
}

// Running state of an online softmax over one query row: the largest score seen and the sum of
// exp(score - max). Unnormalised output accumulates beside it and is rescaled by `rescale` each
// time the max moves.
template <class Acc>
struct OnlineSoftmax {
  Acc max = negative_infinity<Acc>();
  Acc sum = Acc(0);

  // Fold in a tile whose largest score is tile_max; returns the factor by which the existing
  // sum and accumulator must be multiplied. Scores must then be exponentiated against `max`.
  DILATED_ATTENTION_HOST_DEVICE Acc rescale(Acc tile_max) {
    if (tile_max <= max) return Acc(1);
    const Acc factor = max == negative_infinity<Acc>() ? Acc(0) : std::exp(max - tile_max);
    max = tile_max;
    sum *= factor;
    return factor;
  }
  DILATED_ATTENTION_HOST_DEVICE bool empty() const { return !(sum > Acc(0)); }
  DILATED_ATTENTION_HOST_DEVICE Acc lse() const {
    return empty() ? negative_infinity<Acc>() : max + std::log(sum);
  }
  // Multiply the accumulator by this to normalise it (0 when no key was seen).
  DILATED_ATTENTION_HOST_DEVICE Acc inverse_sum() const { return empty() ? Acc(0) : Acc(1) / sum; }
};

}  // namespace dilated_attention
