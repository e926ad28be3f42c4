#pragma once
// What the ring's CUDA back ends (forward: ring/cuda/forward_backend.cuh, backward:
// ring/cuda/backward_backend.cuh) share, as ring/cpu/shard.hpp does for the CPU ones: owned
// device memory (DeviceArray), one rank's rows of Q, K and V addressed by global position, the
// recorded packing of K/V rows into messages and its launch, the upload of a step's work items,
// and the buffers retired until the stream is done with them.
//
// The Device policy (see ring/cuda/forward_backend.cuh) keeps this header free of runtime calls, so the
// host emulation runs the back ends with their kernels on the CPU.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "../../config.hpp"
#include "../../pattern.hpp"
#include "forward_kernels.cuh"
#include "../driver/layout.hpp"

namespace dilated_attention::ring {

// `count` elements of device memory, owned. Allocated and released through the Device policy on
// its stream: the release is STREAM-ORDERED (cudaFreeAsync), i.e. the memory stays valid for
// every operation enqueued on the stream before the release, and nothing after the release may
// touch it. So a DeviceArray may go out of scope while kernels that read it are still queued,
// and no destructor waits for the device (a ring::cuda call returns with its finish() queued).
template <class T, class Device>
class DeviceArray {
 public:
  DeviceArray() = default;
  DeviceArray(const Device& device, std::size_t count)
      : device_(device),
        data_(static_cast<T*>(device_.allocate(std::max<std::size_t>(count, 1) * sizeof(T)))),
        count_(count) {}
  DeviceArray(DeviceArray&& other) noexcept
      : device_(other.device_),
        data_(std::exchange(other.data_, nullptr)),
        count_(std::exchange(other.count_, 0)) {}
  DeviceArray& operator=(DeviceArray&& other) noexcept {
    if (this != &other) {
      reset();
      device_ = other.device_;
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
    if (data_ != nullptr) device_.release(data_);
    data_ = nullptr;
    count_ = 0;
  }
  Device device_{};
  T* data_ = nullptr;
  std::size_t count_ = 0;
};

template <class T, class Device>
class CudaShard {
 public:
  using Scalar = T;
  using Buffer = DeviceArray<T, Device>;
  static constexpr bool stream_ordered = true;
  struct Workspace {};

  // local: the shard's shape (seq_len = N / P); chunks: which global rows the views hold; q, k,
  // v are device views.
  CudaShard(Device device, const Shape& local, std::vector<Chunk> chunks, View<const T> q,
            View<const T> k, View<const T> v)
      : device_(device), shape_(local), chunks_(std::move(chunks)), q_(q), k_(k), v_(v) {}
  CudaShard(const CudaShard&) = delete;
  CudaShard& operator=(const CudaShard&) = delete;
  // No drain: the members and the retired buffers are released stream-ordered (DeviceArray).
  ~CudaShard() = default;

  Buffer make_buffer(std::size_t elements) const { return Buffer(device_, elements); }
  static void* bytes(Buffer& buffer) { return buffer.data(); }
  static std::size_t element_size() { return sizeof(T); }
  void* queue() const { return device_.queue(); }
  void synchronize() const { device_.synchronize(); }
  // A buffer a kernel or a transfer on the stream may still read: kept until the back end goes,
  // then released stream-ordered (after everything enqueued so far).
  template <class U>
  void retire(std::shared_ptr<U> buffer) {
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
    const device::PackParams p{pack_device_.data(), k_.data,     v_.data,
                               strides(k_),         strides(v_), shape_.head_dim};
    device_.launch(&device::ring_pack_kernel<T>, static_cast<std::int64_t>(pack_items_.size()),
                   device::block_threads, 0, p);
    pack_items_.clear();
  }

 protected:
  static std::int64_t grid_for(std::int64_t elements) {
    const std::int64_t blocks = (elements + device::block_threads - 1) / device::block_threads;
    return std::max<std::int64_t>(1, std::min<std::int64_t>(blocks, std::int64_t{1} << 20));
  }
  template <class U>
  static device::Strides strides(const View<U>& view) {
    return {view.batch_stride, view.seq_stride, view.head_stride};
  }
  std::int64_t tiles() const {
    return (shape_.seq_len + device::block_query_rows - 1) / device::block_query_rows;
  }
  // Uploads `host` into `on_device`, growing it (the old array is retired: a kernel may still read it).
  template <class Item>
  void stage(const std::vector<Item>& host, DeviceArray<Item, Device>& on_device) {
    if (host.size() > on_device.size()) {
      if (on_device.data() != nullptr)
        retired_.push_back(std::make_shared<DeviceArray<Item, Device>>(std::move(on_device)));
      on_device = DeviceArray<Item, Device>(device_, std::max(host.size(), 2 * on_device.size()));
    }
    device_.upload(on_device.data(), host.data(), host.size() * sizeof(Item));
  }
  std::int64_t local_of(std::int64_t x) const { return local_row(chunks_, x); }

  Device device_;
  Shape shape_;
  std::vector<Chunk> chunks_;
  View<const T> q_, k_, v_;

 private:
  std::vector<device::PackItem> pack_items_;
  DeviceArray<device::PackItem, Device> pack_device_;
  std::vector<std::shared_ptr<void>> retired_;  // released (stream-ordered) with the back end
};

}  // namespace dilated_attention::ring
