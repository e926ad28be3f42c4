#pragma once
// The CUDA compute back end of the ring driver (ring/driver/forward.hpp): the CPU back end's members
// (ring/cpu/forward_backend.hpp) over device memory, ordered on one compute stream.
//
// - Buffers are DeviceArray (ring/cuda/shard.cuh, with the packing and the staging of work items
//   this back end shares with the gradient one): RAII over Device::allocate / Device::release
//   (cudaMalloc / cudaFree), allocated per call like the CPU back end's; no pool, no cache.
// - pack() and attend_merge() only record work items on the host; flush_packs() (before a step's
//   sends are posted) and the end of for_each_head() (one step's blocks) upload them and launch
//   one kernel each (ring/cuda/forward_kernels.cuh). So a step costs two uploads and two launches
//   and the host never waits for the device inside the call: the driver orders transfers on the
//   stream (Transport::order_sends_after, enqueue_wait), buffers a kernel may still read are
//   retired until the back end goes, and every buffer is released stream-ordered (DeviceArray):
//   no destructor waits for the device.
// - Accumulators are fp32 (o, lse) per slot (1 for softmax mixing, G for mean), initialised to
//   (0, -inf), the identity of merge.hpp's guarded merge; finish() mixes and casts.
// Determinism: the items of one (batch, head) are applied in the driver's order by one thread
// block per 64-row tile, each row by one warp, so each row is merged in one fixed order.
//
// The Device policy keeps this header free of runtime calls, so the host emulation
// (tests/ring/ring_cuda_emulated_test.cpp) runs this very back end with its kernels on the CPU. It
// provides: void* allocate(std::size_t) const and void release(void*) const noexcept, ordered on
// its stream (release: the memory stays valid for the work enqueued before it, cudaFreeAsync);
// upload(device, host, bytes) and zero(device, bytes), asynchronous on its stream (host data
// staged before return); launch(kernel, blocks, threads, shared_bytes, params); synchronize()
// (throws on a device error); queue() (the stream, as void*). ring/cuda/stream_device.cuh is the
// real one.

#include <cuda_fp16.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "../../arguments.hpp"
#include "../../config.hpp"
#include "../../cuda/launch_checks.hpp"
#include "../../cuda/launch_plan.hpp"
#include "../../merge.hpp"
#include "../../pattern.hpp"
#include "../driver/agreement.hpp"
#include "../driver/call.hpp"
#include "../driver/options.hpp"
#include "forward_kernels.cuh"
#include "shard.cuh"
#include "../driver/forward.hpp"
#include "../driver/layout.hpp"
#include "../driver/pattern_cache.hpp"
#include "../transport/transport.hpp"

namespace dilated_attention::ring {

template <class T, class Device>
class CudaForwardBackend : public CudaShard<T, Device> {
  using Base = CudaShard<T, Device>;

 public:
  using Buffer = typename Base::Buffer;
  using Workspace = typename Base::Workspace;

  // local: the shard's shape (seq_len = N / P); chunks: which global rows the views hold;
  // accumulators: 1 for softmax mixing, G for mean mixing. q, k, v are device views.
  CudaForwardBackend(Device device, const Shape& local, std::vector<Chunk> chunks, View<const T> q,
                     View<const T> k, View<const T> v, double scale, bool causal,
                     std::int64_t accumulators)
      : Base(device, local, std::move(chunks), q, k, v),
        scale_log2_(static_cast<float>(scale * 1.4426950408889634)),
        causal_(causal),
        accumulators_(accumulators),
        acc_o_(device, static_cast<std::size_t>(accumulators * rows_per_slot() * local.head_dim)),
        acc_lse_(device, static_cast<std::size_t>(accumulators * rows_per_slot())) {
    device_.zero(acc_o_.data(), acc_o_.size() * sizeof(float));
    const auto count = static_cast<std::int64_t>(acc_lse_.size());
    device_.launch(&device::ring_fill_kernel<float>, grid_for(count), device::block_threads, 0,
                   device::FillParams{acc_lse_.data(), count, negative_infinity<float>()});
  }
  // No wait for the stream: every DeviceArray is released stream-ordered (ring/cuda/shard.cuh),
  // after the kernels enqueued before it (finish() included).

  // body(b, h, workspace) for every (batch, query head) on the calling thread: it records the
  // step's blocks, which then run as one launch.
  template <class Body>
  void for_each_head(Body&& body) {
    Workspace workspace;
    items_.clear();
    group_begin_.assign(static_cast<std::size_t>(shape_.batch * shape_.num_heads + 1), 0);
    for (std::int64_t b = 0; b < shape_.batch; ++b)
      for (std::int64_t h = 0; h < shape_.num_heads; ++h) {
        group_begin_[static_cast<std::size_t>(b * shape_.num_heads + h)] =
            static_cast<std::int64_t>(items_.size());
        body(b, h, workspace);
      }
    group_begin_.back() = static_cast<std::int64_t>(items_.size());
    if (items_.empty()) return;
    stage(items_, items_device_);
    stage(group_begin_, groups_device_);
    const std::int64_t tiles = this->tiles();
    const device::AttendParams p{items_device_.data(),
                                 groups_device_.data(),
                                 q_.data,
                                 k_.data,
                                 v_.data,
                                 strides(q_),
                                 strides(k_),
                                 strides(v_),
                                 acc_o_.data(),
                                 acc_lse_.data(),
                                 shape_.batch,
                                 shape_.num_heads,
                                 shape_.seq_len,
                                 tiles,
                                 scale_log2_,
                                 causal_};
    const std::int64_t blocks = shape_.batch * shape_.num_heads * tiles;
    const std::size_t shared =
        static_cast<std::size_t>(device::block_warps * shape_.head_dim) * sizeof(float);
    switch (shape_.head_dim) {
      case 32:
        device_.launch(&device::ring_attend_merge_kernel<T, 32>, blocks, device::block_threads,
                       shared, p);
        break;
      case 64:
        device_.launch(&device::ring_attend_merge_kernel<T, 64>, blocks, device::block_threads,
                       shared, p);
        break;
      case 96:
        device_.launch(&device::ring_attend_merge_kernel<T, 96>, blocks, device::block_threads,
                       shared, p);
        break;
      default:
        device_.launch(&device::ring_attend_merge_kernel<T, 128>, blocks, device::block_threads,
                       shared, p);
        break;
    }
  }

  // Records the partial of query head h's rows `queries` (batch b) over key rows `keys` of kv
  // head g, to be merged into accumulator `slot`. received == nullptr: the shard's own rows;
  // otherwise they sit in `*received` at element_offset (K rows then V rows, packed by pack()).
  void attend_merge(Workspace&, std::int64_t slot, std::int64_t b, std::int64_t h, std::int64_t g,
                    const Progression& queries, const Progression& keys, const Buffer* received,
                    std::size_t element_offset) {
    items_.push_back({slot, b, h, g, queries, local_of(queries.first), keys,
                      received == nullptr ? local_of(keys.first) : -1,
                      received == nullptr ? nullptr : received->data() + element_offset});
  }

  // Writes the shard's O and LSE (device memory), asynchronously on the stream.
  void finish(View<T> out, float* lse) const {
    const std::int64_t elements = rows_per_slot() * shape_.head_dim;
    const device::FinishParams p{
        acc_o_.data(), acc_lse_.data(), out.data,         strides(out),   lse,
        accumulators_, shape_.batch,    shape_.num_heads, shape_.seq_len, shape_.head_dim};
    device_.launch(&device::ring_finish_kernel<T>, grid_for(elements), device::block_threads, 0, p);
  }

 private:
  using Base::device_;
  using Base::grid_for;
  using Base::k_;
  using Base::local_of;
  using Base::q_;
  using Base::shape_;
  using Base::stage;
  using Base::strides;
  using Base::v_;

  std::int64_t rows_per_slot() const { return shape_.batch * shape_.num_heads * shape_.seq_len; }

  float scale_log2_;
  bool causal_;
  std::int64_t accumulators_;
  DeviceArray<float, Device> acc_o_, acc_lse_;
  std::vector<device::AttendItem> items_;
  std::vector<std::int64_t> group_begin_;
  DeviceArray<device::AttendItem, Device> items_device_;
  DeviceArray<std::int64_t, Device> groups_device_;
};

namespace detail {

// The agreement's storage-type field for the CUDA types (numeric_limits knows neither 16-bit
// type): bytes * 1000 + mantissa digits, as describe_call writes it for the others.
template <class T>
std::int64_t device_storage_code() {
  if constexpr (sizeof(T) == 4)
    return 4024;
  else if constexpr (std::is_same_v<T, __half>)
    return 2011;
  else
    return 2008;
}

// The agreement record of a device call: describe_call's, with the storage field for T.
template <class T>
CallRecord describe_device_call(const Config& config, const Shape& shape, Layout layout,
                                CallOperation operation) {
  CallRecord record =
      describe_call<float>(config, shape, static_cast<std::int64_t>(layout), operation);
  record.fields[CallRecord::storage_field] = device_storage_code<T>();
  return record;
}

}  // namespace detail

// The ring forward on a device (ring/cuda/forward.cuh instantiates it with the CUDA stream):
// run_ring_call (ring/driver/call.hpp) with the device checks and CudaForwardBackend. The body
// ends with one synchronisation of the stream, so that a device fault is this rank's failure
// before the ranks agree on the verdict; finish() is enqueued only when every rank succeeded and
// NOT waited for: the call returns with O and LSE written once the stream reaches that point
// (one host synchronisation per call, none per step, none after the commit).
template <class T, class Device>
Stats forward_on_device(Device device, const Config& config, const Shape& shape,
                        Transport& transport, const Inputs<T>& inputs, const Outputs<T>& outputs,
                        const CommonOptions& options) {
  const View<const T> q = inputs.q, k = inputs.k, v = inputs.v;
  return run_ring_call<CallOperation::forward>(
      config, shape, transport, options,
      detail::describe_device_call<T>(config, shape, options.layout, CallOperation::forward),
      [&](const Shape& local) {
        validate(config, local, q, k, v, outputs.out, outputs.lse);
        dilated_attention::cuda::check_backend_limits(config, local);
        const char* element = "every tensor element must be aligned to its type";
        dilated_attention::cuda::check_alignment(q.data, alignof(T), "q.data", element);
        dilated_attention::cuda::check_alignment(k.data, alignof(T), "k.data", element);
        dilated_attention::cuda::check_alignment(v.data, alignof(T), "v.data", element);
        dilated_attention::cuda::check_alignment(outputs.out.data, alignof(T), "out.data", element);
        if (outputs.lse != nullptr)
          dilated_attention::cuda::check_alignment(outputs.lse, alignof(float), "lse",
                                                   "lse is an array of float");
      },
      [&](const Shape& local, std::vector<Chunk> chunks) {
        const std::int64_t accumulators =
            config.mixing == Mixing::mean ? static_cast<std::int64_t>(config.segment_lengths.size())
                                          : 1;
        return std::make_unique<CudaForwardBackend<T, Device>>(device, local, std::move(chunks), q,
                                                               k, v, resolved_scale(config, shape),
                                                               config.causal, accumulators);
      },
      [&](CudaForwardBackend<T, Device>& backend) { backend.finish(outputs.out, outputs.lse); });
}

}  // namespace dilated_attention::ring
