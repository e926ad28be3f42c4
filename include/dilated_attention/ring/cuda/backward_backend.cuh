#pragma once
// The CUDA compute back end of the ring backward (ring/driver/backward.hpp, docs/semantics.md "The gradient"): the
// CPU gradient back end's members (ring/cpu/backward_backend.hpp) over device memory, ordered on
// one compute stream, with the forward back end's conventions and shared machinery
// (ring/cuda/shard.cuh: the Device policy, DeviceArray, packing recorded and launched per step,
// staged work items, retired buffers).
//
// - Row statistics: softmax reads the forward's LSE in place and computes D = dO·O in one launch
//   (local_statistics); mean merges each block's (lse_b, D_b) into per-branch (LSE_i, D_i), one
//   launch per step (statistics).
// - gradient() only records a block; the end of for_each_kv_head() (one step's blocks of a range
//   of (batch, kv head) pairs) uploads the items and launches two kernels: dQ grouped by (batch,
//   query head), dK/dV grouped by (batch, kv head), each recomputing S and dP. A received block's
//   dK/dV go to the step's fp32 partial buffer (zeroed on the stream when made) at the piece's
//   offset, in the message's layout, and travel back to the rows' owner.
// - add_returned() records; flush_returned() adds every returned piece in the driver's (step)
//   order, one launch; finish() casts the fp32 accumulators, one launch per gradient.
// No host synchronisation inside the call: the driver orders transfers on the stream.
// Determinism: ring/cuda/backward_kernels.cuh (one owner per accumulator row, fixed order).
// The protocol of a call around it (backward_on_device) is ring/cuda/backward_call.cuh.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "../../config.hpp"
#include "../../merge.hpp"
#include "../../pattern.hpp"
#include "forward_backend.cuh"
#include "backward_kernels.cuh"
#include "backward_row_kernels.cuh"
#include "shard.cuh"
#include "../driver/layout.hpp"

namespace dilated_attention::ring {

template <class T, class Device>
class CudaBackwardBackend : public CudaShard<T, Device> {
  using Base = CudaShard<T, Device>;

 public:
  using Buffer = typename Base::Buffer;
  using Workspace = typename Base::Workspace;
  using GradientBuffer = DeviceArray<float, Device>;  // dK then dV rows of each piece (fp32)

  // local: the shard's shape; chunks: which global rows the views hold; lse: the forward's
  // [batch, heads, local rows] (device); branches: G; mean: the mixing. Views are device views.
  CudaBackwardBackend(Device device, const Shape& local, std::vector<Chunk> chunks, View<const T> q,
                      View<const T> k, View<const T> v, View<const T> out, const float* lse,
                      View<const T> d_out, double scale, bool causal, std::int64_t branches,
                      bool mean)
      : Base(device, local, std::move(chunks), q, k, v),
        out_(out),
        d_out_(d_out),
        scale_(static_cast<float>(scale)),
        weight_(mean ? 1.f / static_cast<float>(branches) : 1.f),
        causal_(causal),
        mean_(mean),
        rows_(local.batch * local.num_heads * local.seq_len),
        delta_(device, static_cast<std::size_t>((mean ? branches : 1) * rows_)),
        d_q_(device, static_cast<std::size_t>(rows_ * local.head_dim)),
        d_k_(device, static_cast<std::size_t>(local.batch * local.num_kv_heads * local.seq_len *
                                              local.head_dim)),
        d_v_(device, d_k_.size()) {
    for (DeviceArray<float, Device>* a : {&delta_, &d_q_, &d_k_, &d_v_})
      device_.zero(a->data(), a->size() * sizeof(float));
    if (mean) {
      branch_lse_ = DeviceArray<float, Device>(device, static_cast<std::size_t>(branches * rows_));
      const auto count = static_cast<std::int64_t>(branch_lse_.size());
      device_.launch(&device::ring_fill_kernel<float>, grid_for(count), device::block_threads, 0,
                     device::FillParams{branch_lse_.data(), count, negative_infinity<float>()});
      lse_ = branch_lse_.data();
    } else {
      lse_ = const_cast<float*>(lse);  // read only: only the mean statistics write lse_
    }
  }
  // No wait for the stream: every DeviceArray is released stream-ordered (ring/cuda/shard.cuh),
  // after the kernels enqueued before it (finish() included).

  // A partial buffer the blocks accumulate into: zeroed on the stream.
  GradientBuffer make_gradient_buffer(std::size_t elements) const {
    GradientBuffer buffer(device_, elements);
    device_.zero(buffer.data(), std::max<std::size_t>(elements, 1) * sizeof(float));
    return buffer;
  }
  // A buffer a transfer writes (returned partials): not zeroed, so that no stream operation
  // races the transport's copy into it.
  GradientBuffer make_receive_buffer(std::size_t elements) const {
    return GradientBuffer(device_, elements);
  }
  static void* gradient_bytes(GradientBuffer& buffer) { return buffer.data(); }
  static std::size_t gradient_element_size() { return sizeof(float); }

  // body(b, g, workspace) for the (batch, kv head) pairs [first, last) on the calling thread: it
  // records blocks (statistics or gradient), which then run as one or two launches.
  template <class Body>
  void for_each_kv_head(std::int64_t first, std::int64_t last, Body&& body) {
    Workspace workspace;
    statistics_items_.clear();
    backward_items_.clear();
    for (std::int64_t pair = first; pair < last; ++pair)
      body(pair / shape_.num_kv_heads, pair % shape_.num_kv_heads, workspace);
    if (!statistics_items_.empty()) launch_query_side(statistics_items_, true);
    if (!backward_items_.empty()) {
      launch_query_side(backward_items_, false);
      launch_key_side();
    }
  }

  // Whether the driver runs the statistics pass over every step's blocks: always for mean here
  // (the CPU back end skips it where every head has one branch; this one does not yet).
  bool recomputes_statistics() const { return mean_; }

  // softmax: D = dO·O for every local row (the forward's LSE is read in place).
  void local_statistics() {
    if (mean_) return;
    const device::DeltaParams p{out_.data,        d_out_.data,    strides(out_),
                                strides(d_out_),  delta_.data(),  shape_.batch,
                                shape_.num_heads, shape_.seq_len, shape_.head_dim};
    device_.launch(&device::ring_delta_kernel<T>, grid_for(rows_), device::block_threads, 0, p);
  }

  // Mean mixing: records one block whose (lse, D) merge into branch i's row statistics.
  void statistics(Workspace&, std::int64_t i, std::int64_t b, std::int64_t h, std::int64_t g,
                  const Progression& queries, const Progression& keys, const Buffer* received,
                  std::size_t element_offset) {
    statistics_items_.push_back(item(i, b, h, g, queries, keys, received, element_offset, nullptr));
  }

  // Records the gradient of one block; a received block's dK/dV go to `partials` at element_offset.
  void gradient(Workspace&, std::int64_t i, std::int64_t b, std::int64_t h, std::int64_t g,
                const Progression& queries, const Progression& keys, const Buffer* received,
                std::size_t element_offset, GradientBuffer* partials) {
    backward_items_.push_back(
        item(mean_ ? i : 0, b, h, g, queries, keys, received, element_offset,
             received != nullptr ? partials->data() + element_offset : nullptr));
  }

  // Records the returned partials of this rank's rows `rows` of (b, g); flush_returned() adds them.
  void add_returned(const GradientBuffer& partials, std::size_t element_offset, std::int64_t b,
                    std::int64_t g, const Progression& rows) {
    returned_items_.push_back({partials.data() + element_offset, b, g,
                               Progression{local_of(rows.first), rows.stride, rows.count}});
  }
  void flush_returned() {
    if (returned_items_.empty()) return;
    const std::int64_t groups = shape_.batch * shape_.num_kv_heads;
    const auto by_pair = [&](const device::ReturnedItem& r) {
      return r.batch * shape_.num_kv_heads + r.kv_head;
    };
    std::vector<device::ReturnedItem> sorted;
    const std::int64_t used = group_items(returned_items_, groups, by_pair, sorted);
    stage(sorted, returned_device_);
    stage(group_begin_, returned_groups_device_);
    const device::ReturnedParams p{returned_device_.data(),
                                   returned_groups_device_.data(),
                                   d_k_.data(),
                                   d_v_.data(),
                                   shape_.num_kv_heads,
                                   shape_.seq_len,
                                   tiles(),
                                   shape_.head_dim};
    device_.launch(&device::ring_add_returned_kernel<float>, used * tiles(), device::block_threads,
                   0, p);
    returned_items_.clear();
  }

  // Writes the shard's gradients (device views), each element rounded once to T.
  void finish(View<T> d_q, View<T> d_k, View<T> d_v) const {
    cast(d_q_, d_q, shape_.num_heads);
    cast(d_k_, d_k, shape_.num_kv_heads);
    cast(d_v_, d_v, shape_.num_kv_heads);
  }

 private:
  device::BackwardItem item(std::int64_t set, std::int64_t b, std::int64_t h, std::int64_t g,
                            const Progression& queries, const Progression& keys,
                            const Buffer* received, std::size_t element_offset,
                            float* partial) const {
    return {set,
            b,
            h,
            g,
            queries,
            local_of(queries.first),
            keys,
            received == nullptr ? local_of(keys.first) : -1,
            received == nullptr ? nullptr : received->data() + element_offset,
            partial};
  }
  // A stable counting sort of `items` by group (the driver's order kept within a group), the
  // empty groups left out (no thread block is launched for them): group_begin_ holds the
  // non-empty groups' ranges, and the return value is their count.
  template <class Item, class Key>
  std::int64_t group_items(const std::vector<Item>& items, std::int64_t groups, const Key& key,
                           std::vector<Item>& sorted) {
    std::vector<std::int64_t> begin(static_cast<std::size_t>(groups + 1), 0);
    for (const Item& it : items) ++begin[static_cast<std::size_t>(key(it) + 1)];
    for (std::size_t g = 1; g < begin.size(); ++g) begin[g] += begin[g - 1];
    std::vector<std::int64_t> next(begin.begin(), begin.end() - 1);
    sorted.resize(items.size());
    for (const Item& it : items)
      sorted[static_cast<std::size_t>(next[static_cast<std::size_t>(key(it))]++)] = it;
    group_begin_.clear();
    for (std::size_t g = 0; g + 1 < begin.size(); ++g)
      if (begin[g + 1] > begin[g]) group_begin_.push_back(begin[g]);
    const auto used = static_cast<std::int64_t>(group_begin_.size());
    group_begin_.push_back(static_cast<std::int64_t>(items.size()));
    return used;
  }
  device::RingBackwardParams params(const device::BackwardItem* items,
                                    const std::int64_t* groups) const {
    return {items,
            groups,
            q_.data,
            k_.data,
            v_.data,
            d_out_.data,
            strides(q_),
            strides(k_),
            strides(v_),
            strides(d_out_),
            lse_,
            delta_.data(),
            d_q_.data(),
            d_k_.data(),
            d_v_.data(),
            shape_.batch,
            shape_.num_heads,
            shape_.num_kv_heads,
            shape_.seq_len,
            tiles(),
            scale_,
            weight_,
            causal_};
  }
  // Statistics or dQ: groups (batch, query head).
  void launch_query_side(const std::vector<device::BackwardItem>& items, bool statistics) {
    const std::int64_t groups = shape_.batch * shape_.num_heads;
    const auto by_head = [&](const device::BackwardItem& it) {
      return it.batch * shape_.num_heads + it.head;
    };
    const std::int64_t used = group_items(items, groups, by_head, sorted_);
    stage(sorted_, query_items_device_);
    stage(group_begin_, query_groups_device_);
    const device::RingBackwardParams p =
        params(query_items_device_.data(), query_groups_device_.data());
    if (statistics)
      dispatch<true, false>(p, used * tiles());
    else
      dispatch<false, false>(p, used * tiles());
  }
  // dK and dV: groups (batch, kv head).
  void launch_key_side() {
    const std::int64_t groups = shape_.batch * shape_.num_kv_heads;
    const auto by_pair = [&](const device::BackwardItem& it) {
      return it.batch * shape_.num_kv_heads + it.kv_head;
    };
    const std::int64_t used = group_items(backward_items_, groups, by_pair, sorted_);
    stage(sorted_, key_items_device_);
    stage(group_begin_, key_groups_device_);
    dispatch<false, true>(params(key_items_device_.data(), key_groups_device_.data()),
                          used * tiles());
  }
  template <bool Statistics, bool Keys>
  void dispatch(const device::RingBackwardParams& p, std::int64_t blocks) {
    const std::size_t shared =
        static_cast<std::size_t>(device::block_warps * 2 * shape_.head_dim) * sizeof(float);
    switch (shape_.head_dim) {
      case 32: launch_one<Statistics, Keys, 32>(p, blocks, shared); break;
      case 64: launch_one<Statistics, Keys, 64>(p, blocks, shared); break;
      case 96: launch_one<Statistics, Keys, 96>(p, blocks, shared); break;
      default: launch_one<Statistics, Keys, 128>(p, blocks, shared); break;
    }
  }
  template <bool Statistics, bool Keys, int D>
  void launch_one(const device::RingBackwardParams& p, std::int64_t blocks, std::size_t shared) {
    if constexpr (Keys)
      device_.launch(&device::ring_key_gradient_kernel<T, D>, blocks, device::block_threads, shared,
                     p);
    else if constexpr (Statistics)
      device_.launch(&device::ring_statistics_kernel<T, D>, blocks, device::block_threads, shared,
                     p);
    else
      device_.launch(&device::ring_query_gradient_kernel<T, D>, blocks, device::block_threads,
                     shared, p);
  }
  void cast(const DeviceArray<float, Device>& from, View<T> to, std::int64_t heads) const {
    const std::int64_t elements = shape_.batch * heads * shape_.seq_len * shape_.head_dim;
    const device::CastParams p{from.data(), to.data,        strides(to),    shape_.batch,
                               heads,       shape_.seq_len, shape_.head_dim};
    device_.launch(&device::ring_gradient_cast_kernel<T>, grid_for(elements), device::block_threads,
                   0, p);
  }

  using Base::device_;
  using Base::grid_for;
  using Base::k_;
  using Base::local_of;
  using Base::q_;
  using Base::shape_;
  using Base::stage;
  using Base::strides;
  using Base::tiles;
  using Base::v_;

  View<const T> out_, d_out_;
  float scale_, weight_;
  bool causal_, mean_;
  std::int64_t rows_;  // batch * heads * local rows
  float* lse_ = nullptr;
  DeviceArray<float, Device> branch_lse_, delta_;  // row statistics: [set][b][h][x]
  DeviceArray<float, Device> d_q_, d_k_, d_v_;     // fp32 gradient accumulators
  std::vector<device::BackwardItem> statistics_items_, backward_items_, sorted_;
  std::vector<device::ReturnedItem> returned_items_;
  std::vector<std::int64_t> group_begin_;
  DeviceArray<device::BackwardItem, Device> query_items_device_, key_items_device_;
  DeviceArray<device::ReturnedItem, Device> returned_device_;
  DeviceArray<std::int64_t, Device> query_groups_device_, key_groups_device_,
      returned_groups_device_;
};

}  // namespace dilated_attention::ring
