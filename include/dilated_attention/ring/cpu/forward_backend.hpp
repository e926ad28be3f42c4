#pragma once
// The CPU compute back end of the ring driver (ring/driver/forward.hpp): host buffers, packing of K/V
// rows into messages, cpu::attend on the blocks the schedule names, the guarded merge of
// partials, and the final mixing. A GPU back end provides the same members over device memory
// (see docs/ring.md, "What a CUDA back end needs").
//
// Determinism: the work of one (batch, query head) is done by one thread, in the schedule's
// fixed order (step, branch, offset, block), so the result never depends on the thread count.

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "../../config.hpp"
#include "../../cpu/attend.hpp"
#include "../../cpu/kernels/isa.hpp"
#include "../../merge.hpp"
#include "../../pattern.hpp"
#include "shard.hpp"
#include "../driver/layout.hpp"

namespace dilated_attention::ring {

template <class T>
class CpuForwardBackend : public CpuShard<T> {
  using Base = CpuShard<T>;

 public:
  using Acc = cpu::accumulator_t<T>;
  using Buffer = typename Base::Buffer;

  // local: the shard's shape (seq_len = N / P); shard_begin: global position of its first row
  // (contiguous layout), or `chunks`: which global rows the views hold (ring/driver/layout.hpp);
  // accumulators: 1 for softmax mixing, G for mean mixing (one per branch).
  CpuForwardBackend(const Shape& local, std::int64_t shard_begin, View<const T> q, View<const T> k,
                    View<const T> v, Acc scale, bool causal, std::int64_t accumulators, int threads,
                    CpuIsa isa = CpuIsa::automatic)
      : CpuForwardBackend(local, std::vector<Chunk>{{shard_begin, shard_begin + local.seq_len, 0}},
                          q, k, v, scale, causal, accumulators, threads, isa) {}
  CpuForwardBackend(const Shape& local, std::vector<Chunk> chunks, View<const T> q, View<const T> k,
                    View<const T> v, Acc scale, bool causal, std::int64_t accumulators, int threads,
                    CpuIsa isa = CpuIsa::automatic)
      : Base(local, std::move(chunks), q, k, v, threads, isa),
        scale_(scale),
        causal_(causal),
        accumulators_(accumulators),
        acc_o_(static_cast<std::size_t>(accumulators * local.batch * local.num_heads *
                                        local.seq_len * local.head_dim),
               Acc(0)),
        acc_lse_(
            static_cast<std::size_t>(accumulators * local.batch * local.num_heads * local.seq_len),
            negative_infinity<Acc>()) {}

  // Scratch one thread reuses for every block it computes.
  struct Workspace {
    Workspace(std::int64_t head_dim, CpuIsa isa) : attend(head_dim, isa) {}
    cpu::AttendWorkspace<Acc> attend;
    std::vector<Acc> o, lse;
  };

  // Runs body(b, h, workspace) for every (batch, query head), each pair on one thread
  // (CpuShard::run_units: static schedule, errors carried back to the caller).
  template <class Body>
  void for_each_head(Body&& body) {
    const std::int64_t heads = shape_.num_heads;
    this->run_units(
        shape_.batch * heads, [&](CpuIsa isa) { return Workspace(shape_.head_dim, isa); },
        [&](std::int64_t unit, Workspace& workspace) {
          body(unit / heads, unit % heads, workspace);
        });
  }

  // The partial of query head h's rows `queries` (batch b) over key rows `keys` of kv head g,
  // merged into accumulator `slot`. received == nullptr: keys are the shard's own rows;
  // otherwise they sit in `*received` at element_offset (K rows then V rows, packed by pack()).
  void attend_merge(Workspace& workspace, std::int64_t slot, std::int64_t b, std::int64_t h,
                    std::int64_t g, const Progression& queries, const Progression& keys,
                    const Buffer* received, std::size_t element_offset) {
    const std::int64_t dim = shape_.head_dim;
    const cpu::StridedRows<T> q_rows = local_rows(q_, b, h, queries);
    cpu::StridedRows<T> k_rows, v_rows;
    if (received == nullptr) {
      k_rows = local_rows(k_, b, g, keys);
      v_rows = local_rows(v_, b, g, keys);
    } else {
      const T* base = received->data() + element_offset;
      k_rows = {base, dim, keys};
      v_rows = {base + keys.count * dim, dim, keys};
    }
    workspace.o.resize(static_cast<std::size_t>(queries.count * dim));
    workspace.lse.resize(static_cast<std::size_t>(queries.count));
    cpu::attend(workspace.attend, q_rows, k_rows, v_rows, dim, scale_, causal_, workspace.o.data(),
                workspace.lse.data());
    for (std::int64_t j = 0; j < queries.count; ++j) {
      const std::int64_t x = local_of(queries.at(j));
      const std::size_t row = row_index(slot, b, h, x);
      const MergeWeights<Acc> w =
          merge_weights(acc_lse_[row], workspace.lse[static_cast<std::size_t>(j)]);
      Acc* acc = acc_o_.data() + row * static_cast<std::size_t>(dim);
      const Acc* part = workspace.o.data() + j * dim;
      for (std::int64_t d = 0; d < dim; ++d) acc[d] = w.a * acc[d] + w.b * part[d];
      acc_lse_[row] = w.lse;
    }
  }

  // Writes the shard's O and LSE. Softmax mixing: the one accumulator is the answer. Mean mixing:
  // O averages the per-branch outputs over all G branches (a branch that does not select the row
  // contributes 0), LSE merges the per-branch LSEs exactly as softmax mixing would.
  void finish(View<T> out, lse_type_t<T>* lse) const {
    const std::int64_t dim = shape_.head_dim;
    std::vector<Acc> o(static_cast<std::size_t>(dim));
    for (std::int64_t b = 0; b < shape_.batch; ++b)
      for (std::int64_t h = 0; h < shape_.num_heads; ++h)
        for (std::int64_t x = 0; x < shape_.seq_len; ++x) {
          Acc row_lse = negative_infinity<Acc>();
          std::fill(o.begin(), o.end(), Acc(0));
          for (std::int64_t slot = 0; slot < accumulators_; ++slot) {
            const std::size_t row = row_index(slot, b, h, x);
            const Acc* acc = acc_o_.data() + row * static_cast<std::size_t>(dim);
            for (std::int64_t d = 0; d < dim; ++d) o[static_cast<std::size_t>(d)] += acc[d];
            row_lse = log_add_exp(row_lse, acc_lse_[row]);
          }
          const Acc mean = Acc(1) / static_cast<Acc>(accumulators_);
          T* target = out.data + b * out.batch_stride + x * out.seq_stride + h * out.head_stride;
          for (std::int64_t d = 0; d < dim; ++d)
            target[d] = static_cast<T>(accumulators_ == 1 ? o[static_cast<std::size_t>(d)]
                                                          : o[static_cast<std::size_t>(d)] * mean);
          if (lse != nullptr)
            lse[(b * shape_.num_heads + h) * shape_.seq_len + x] =
                static_cast<lse_type_t<T>>(row_lse);
        }
  }

 private:
  using Base::k_;
  using Base::local_of;
  using Base::local_rows;
  using Base::q_;
  using Base::shape_;
  using Base::v_;

  std::size_t row_index(std::int64_t slot, std::int64_t b, std::int64_t h, std::int64_t x) const {
    return static_cast<std::size_t>(
        ((slot * shape_.batch + b) * shape_.num_heads + h) * shape_.seq_len + x);
  }

  Acc scale_;
  bool causal_;
  std::int64_t accumulators_;
  std::vector<Acc> acc_o_, acc_lse_;
};

}  // namespace dilated_attention::ring
