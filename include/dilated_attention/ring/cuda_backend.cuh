#pragma once
// The CUDA compute back end of the ring driver (ring/forward.hpp): the CPU back end's members
// (ring/cpu_backend.hpp) over device memory, ordered on one compute stream.
//
// - Buffers are DeviceArray: RAII over Device::allocate / Device::release (cudaMalloc / cudaFree),
//   allocated per call like the CPU back end's; no pool, no cache.
// - pack() and attend_merge() only record work items on the host; flush_packs() (before a step's
//   sends are posted) and the end of for_each_head() (one step's blocks) upload them and launch
//   one kernel each (ring/cuda_block_kernels.cuh). So a step costs two uploads and two launches
//   and the host never waits for the device inside the call: the driver orders transfers on the
//   stream (Transport::order_sends_after, enqueue_wait), and buffers a kernel may still read are
//   retired, not freed, until the destructor has synchronised the stream.
// - Accumulators are fp32 (o, lse) per slot (1 for softmax mixing, G for mean), initialised to
//   (0, -inf), the identity of merge.hpp's guarded merge; finish() mixes and casts.
// Determinism: the items of one (batch, head) are applied in the driver's order by one thread
// block per 64-row tile, each row by one warp, so each row is merged in one fixed order.
//
// The Device policy keeps this header free of runtime calls, so the host emulation
// (tests/ring_cuda_emulated_test.cpp) runs this very back end with its kernels on the CPU. It
// provides: static void* allocate(std::size_t), static void release(void*) noexcept;
// upload(device, host, bytes) and zero(device, bytes), asynchronous on its stream (host data
// staged before return); launch(kernel, blocks, threads, shared_bytes, params); synchronize()
// (throws on a device error); queue() (the stream, as void*). ring/cuda_stream_device.cuh is the
// real one.

#include <cuda_fp16.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "../config.hpp"
#include "../cuda/launch_checks.hpp"
#include "../cuda/launch_plan.hpp"
#include "../merge.hpp"
#include "../pattern.hpp"
#include "agreement.hpp"
#include "cuda_block_kernels.cuh"
#include "forward.hpp"
#include "layout.hpp"
#include "pattern_cache.hpp"
#include "transport.hpp"

namespace dilated_attention::ring {

// `count` elements of device memory, owned.
template <class T, class Device>
class DeviceArray {
 public:
  DeviceArray() = default;
  explicit DeviceArray(std::size_t count)
      : data_(static_cast<T*>(Device::allocate(std::max<std::size_t>(count, 1) * sizeof(T)))),
        count_(count) {}
  DeviceArray(DeviceArray&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), count_(std::exchange(other.count_, 0)) {}
  DeviceArray& operator=(DeviceArray&& other) noexcept {
    if (this != &other) {
      reset();
      data_ = std::exchange(other.data_, nullptr);
      count_ = std::exchange(other.count_, 0);
    }
    return *this;
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  ~DeviceArray() { reset(); }
  T* data() const { return data_; }
  std::size_t size() const { return count_; }

 private:
  void reset() noexcept {
    if (data_ != nullptr) Device::release(data_);
    data_ = nullptr;
    count_ = 0;
  }
  T* data_ = nullptr;
  std::size_t count_ = 0;
};

template <class T, class Device>
class CudaBackend {
 public:
  using Scalar = T;
  using Buffer = DeviceArray<T, Device>;
  static constexpr bool stream_ordered = true;
  struct Workspace {};

  // local: the shard's shape (seq_len = N / P); chunks: which global rows the views hold;
  // accumulators: 1 for softmax mixing, G for mean mixing. q, k, v are device views.
  CudaBackend(Device device, const Shape& local, std::vector<Chunk> chunks, View<const T> q,
              View<const T> k, View<const T> v, double scale, bool causal, std::int64_t accumulators)
      : device_(device), shape_(local), chunks_(std::move(chunks)), q_(q), k_(k), v_(v),
        scale_log2_(static_cast<float>(scale * 1.4426950408889634)), causal_(causal),
        accumulators_(accumulators),
        acc_o_(static_cast<std::size_t>(accumulators * rows_per_slot() * local.head_dim)),
        acc_lse_(static_cast<std::size_t>(accumulators * rows_per_slot())) {
    device_.zero(acc_o_.data(), acc_o_.size() * sizeof(float));
    const auto count = static_cast<std::int64_t>(acc_lse_.size());
    device_.launch(&device::ring_fill_kernel<float>, grid_for(count), device::kThreads, 0,
                   device::FillParams{acc_lse_.data(), count, negative_infinity<float>()});
  }
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;
  // Kernels may still read the retired buffers and the accumulators: wait for the stream first.
  ~CudaBackend() {
    try {
      device_.synchronize();
    } catch (...) {  // a device error was reported (or will be) by the call itself
    }
  }

  Buffer make_buffer(std::size_t elements) const { return Buffer(elements); }
  static void* bytes(Buffer& buffer) { return buffer.data(); }
  static std::size_t element_size() { return sizeof(T); }
  void* queue() const { return device_.queue(); }
  void synchronize() const { device_.synchronize(); }
  void retire(std::shared_ptr<Buffer> buffer) {
    if (buffer) retired_.push_back(std::move(buffer));
  }

  // Records: K rows then V rows of (batch b, kv head g) at global positions `rows`, written at
  // destination + element_offset. flush_packs() runs every recorded piece.
  void pack(Buffer& destination, std::size_t element_offset, std::int64_t b, std::int64_t g,
            const Progression& rows) {
    pack_items_.push_back({destination.data() + element_offset, b, g,
                           Progression{local_of(rows.first), rows.stride, rows.count}});
  }
  void flush_packs() {
    if (pack_items_.empty()) return;
    stage(pack_items_, pack_device_);
    const device::PackParams p{pack_device_.data(), k_.data, v_.data, strides(k_), strides(v_),
                               shape_.head_dim};
    device_.launch(&device::ring_pack_kernel<T>, static_cast<std::int64_t>(pack_items_.size()),
                   device::kThreads, 0, p);
    pack_items_.clear();
  }

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
    const std::int64_t tiles = (shape_.seq_len + device::kTileRows - 1) / device::kTileRows;
    const device::AttendParams p{items_device_.data(), groups_device_.data(), q_.data, k_.data,
                                 v_.data, strides(q_), strides(k_), strides(v_), acc_o_.data(),
                                 acc_lse_.data(), shape_.batch, shape_.num_heads, shape_.seq_len,
                                 tiles, scale_log2_, causal_};
    const std::int64_t blocks = shape_.batch * shape_.num_heads * tiles;
    const std::size_t shared = static_cast<std::size_t>(device::kWarps * shape_.head_dim) * sizeof(float);
    switch (shape_.head_dim) {
      case 32: device_.launch(&device::ring_attend_merge_kernel<T, 32>, blocks, device::kThreads, shared, p); break;
      case 64: device_.launch(&device::ring_attend_merge_kernel<T, 64>, blocks, device::kThreads, shared, p); break;
      case 96: device_.launch(&device::ring_attend_merge_kernel<T, 96>, blocks, device::kThreads, shared, p); break;
      default: device_.launch(&device::ring_attend_merge_kernel<T, 128>, blocks, device::kThreads, shared, p); break;
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
    const device::FinishParams p{acc_o_.data(), acc_lse_.data(), out.data, strides(out), lse,
                                 accumulators_, shape_.batch, shape_.num_heads, shape_.seq_len,
                                 shape_.head_dim};
    device_.launch(&device::ring_finish_kernel<T>, grid_for(elements), device::kThreads, 0, p);
  }

 private:
  std::int64_t rows_per_slot() const { return shape_.batch * shape_.num_heads * shape_.seq_len; }
  static std::int64_t grid_for(std::int64_t elements) {
    const std::int64_t blocks = (elements + device::kThreads - 1) / device::kThreads;
    return std::max<std::int64_t>(1, std::min<std::int64_t>(blocks, std::int64_t{1} << 20));
  }
  template <class U>
  static device::Strides strides(const View<U>& view) {
    return {view.batch_stride, view.seq_stride, view.head_stride};
  }
  // Uploads `host` into `on_device`, growing it (the old array is retired: a kernel may still read it).
  template <class Item>
  void stage(const std::vector<Item>& host, DeviceArray<Item, Device>& on_device) {
    if (host.size() > on_device.size()) {
      if (on_device.data() != nullptr)
        retired_.push_back(std::make_shared<DeviceArray<Item, Device>>(std::move(on_device)));
      on_device = DeviceArray<Item, Device>(std::max(host.size(), 2 * on_device.size()));
    }
    device_.upload(on_device.data(), host.data(), host.size() * sizeof(Item));
  }
  std::int64_t local_of(std::int64_t x) const { return local_row(chunks_, x); }

  Device device_;
  Shape shape_;
  std::vector<Chunk> chunks_;
  View<const T> q_, k_, v_;
  float scale_log2_;
  bool causal_;
  std::int64_t accumulators_;
  DeviceArray<float, Device> acc_o_, acc_lse_;
  std::vector<device::PackItem> pack_items_;
  std::vector<device::AttendItem> items_;
  std::vector<std::int64_t> group_begin_;
  DeviceArray<device::PackItem, Device> pack_device_;
  DeviceArray<device::AttendItem, Device> items_device_;
  DeviceArray<std::int64_t, Device> groups_device_;
  std::vector<std::shared_ptr<void>> retired_;  // freed after the destructor's synchronize
};

namespace detail {

// The agreement's storage-type field for the CUDA types (numeric_limits knows neither 16-bit
// type): bytes * 1000 + mantissa digits, as describe_call writes it for the others.
template <class T>
std::int64_t device_storage_code() {
  if constexpr (sizeof(T) == 4) return 4024;
  else if constexpr (std::is_same_v<T, __half>) return 2011;
  else return 2008;
}

}  // namespace detail

// The ring forward on a device (ring/cuda_forward.cuh instantiates it with the CUDA stream): the
// same protocol as ring::forward (ring/agreement.hpp), then the driver with CudaBackend. The
// body ends with a synchronisation of the stream, so that a device fault is this rank's failure
// before the ranks agree on the verdict; finish() is enqueued only when every rank succeeded, and
// the call returns once the stream has written O and LSE (one host synchronisation per call, none
// per step).
template <class T, class Device>
Stats forward_on_device(Device device, const Config& config, const Shape& shape, Transport& transport,
                        View<const T> q, View<const T> k, View<const T> v, View<T> out, float* lse,
                        const Options& options) {
  Shape local = shape;
  const auto validate_local = [&] {
    local = validate_ring_call(config, shape, transport, options);
    validate(config, local, q, k, v, out, lse);
    dilated_attention::cuda::check_backend_limits(config, local);
    const char* element = "every tensor element must be aligned to its type";
    dilated_attention::cuda::check_alignment(q.data, alignof(T), "q.data", element);
    dilated_attention::cuda::check_alignment(k.data, alignof(T), "k.data", element);
    dilated_attention::cuda::check_alignment(v.data, alignof(T), "v.data", element);
    dilated_attention::cuda::check_alignment(out.data, alignof(T), "out.data", element);
    if (lse != nullptr)
      dilated_attention::cuda::check_alignment(lse, alignof(float), "lse", "lse is an array of float");
  };
  CallRecord record = describe_call<float>(config, shape, static_cast<std::int64_t>(options.layout));
  record.fields[11] = detail::device_storage_code<T>();
  Stats stats;
  std::unique_ptr<CudaBackend<T, Device>> backend;
  run_agreed_call(
      transport, options.timeout, record, validate_local,
      [&] {
        const std::int64_t accumulators =
            config.mixing == Mixing::mean ? static_cast<std::int64_t>(config.segment_lengths.size()) : 1;
        backend = std::make_unique<CudaBackend<T, Device>>(
            device, local, rank_chunks(options.layout, shape.seq_len, transport.size(), transport.rank()),
            q, k, v, resolved_scale(config, shape), config.causal, accumulators);
        PatternCache& cache = options.cache != nullptr ? *options.cache : default_pattern_cache();
        stats = run_ring(config, shape, transport, *backend, cache, options);
        backend->synchronize();
      },
      [&] { backend->finish(out, lse); });
  backend->synchronize();  // the output is written; a fault of finish() surfaces here
  return stats;
}

}  // namespace dilated_attention::ring
