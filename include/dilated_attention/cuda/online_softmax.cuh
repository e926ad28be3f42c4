#pragma once
// The warp-level online-softmax step of the one-warp-per-row kernels: the fp32 forward
// (simt_kernel.cuh), the backward's row statistics (backward_kernel.cuh) and the ring's attend
// and gradient-statistics kernels (ring/cuda_block_kernels.cuh, ring/cuda_gradient_kernels.cuh).
// These kernels must agree bit for bit with one another (the ring's partials merge into what the
// single-device kernels compute, the backward recomputes the forward's statistics), so the step
// is written once: a change to its rounding then reaches all of them together.
//
// The tensor-core kernels keep their own update (tensor_core_kernel.cuh): a row there spans the
// four threads of an mma fragment, not a warp, and it exponentiates against a guarded pivot.

namespace dilated_attention::cuda::device {

// Fixed xor-shuffle trees: every lane gets the same result in the same order, run after run.
__device__ __forceinline__ float warp_max(float value) {
#pragma unroll
  for (int mask = 16; mask > 0; mask /= 2)
    value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, mask));
  return value;
}
__device__ __forceinline__ float warp_sum(float value) {
#pragma unroll
  for (int mask = 16; mask > 0; mask /= 2) value += __shfl_xor_sync(0xffffffffu, value, mask);
  return value;
}

// The base the scores are logs in: the forward kernels fold log2 e into the scale and use the
// cheaper exp2; the ring gradient statistics keep natural-log scores (its LSE is merged as is).
enum class ScoreBase { two, e };

template <ScoreBase Base>
__device__ __forceinline__ float score_exp(float x) {
  if constexpr (Base == ScoreBase::two)
    return exp2f(x);
  else
    return expf(x);
}

struct WarpSoftmaxStep {
  float factor;  // what the old sum and accumulators are multiplied by (0 on the first chunk)
  float prob;    // this lane's exp(score - new max), 0 for an invalid lane
};

// Folds one chunk of 32 scores (one per lane; invalid lanes score -inf, lane 0 always valid, so
// the new max is finite and the first chunk's factor exp(-inf) is 0 rather than NaN) into the
// row's running max and sum. Callers with more state beside the sum (the ring's row_dot) rescale
// it by `factor` themselves.
template <ScoreBase Base = ScoreBase::two>
__device__ __forceinline__ WarpSoftmaxStep warp_online_softmax_step(float& row_max, float& row_sum,
                                                                    float score, bool valid) {
  const float new_max = fmaxf(row_max, warp_max(score));
  const float factor = score_exp<Base>(row_max - new_max);
  const float prob = valid ? score_exp<Base>(score - new_max) : 0.f;
  row_max = new_max;
  row_sum = row_sum * factor + warp_sum(prob);
  return {factor, prob};
}

// The same step, rescaling the lane's output accumulators too; returns the lane's probability,
// which the caller then broadcasts key by key to accumulate the chunk's value rows.
template <ScoreBase Base = ScoreBase::two, int PerLane>
__device__ __forceinline__ float warp_online_softmax_step(float& row_max, float& row_sum,
                                                          float (&acc)[PerLane], float score,
                                                          bool valid) {
  const WarpSoftmaxStep step = warp_online_softmax_step<Base>(row_max, row_sum, score, valid);
#pragma unroll
  for (int e = 0; e < PerLane; ++e) acc[e] *= step.factor;
  return step.prob;
}

}  // namespace dilated_attention::cuda::device
