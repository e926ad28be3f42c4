#pragma once
// The CPU compute back end of the ring driver (ring/forward.hpp): host buffers, packing of K/V
// rows into messages, cpu::attend on the blocks the schedule names, the guarded merge of
// partials, and the final mixing. A GPU back end provides the same members over device memory
// (see docs/ring.md, "What a CUDA back end needs").
//
// Determinism: the work of one (batch, query head) is done by one thread, in the schedule's
// fixed order (step, branch, offset, block), so the result never depends on the thread count.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "../config.hpp"
#include "../cpu/attend.hpp"
#include "../cpu/kernels/isa.hpp"
#include "../merge.hpp"
#include "../pattern.hpp"
#include "layout.hpp"

namespace dilated_attention::ring {

template <class T>
class CpuBackend {
 public:
  using Scalar = T;
  using Acc = cpu::accumulator_t<T>;
  using Buffer = std::vector<T>;

  // local: the shard's shape (seq_len = N / P); shard_begin: global position of its first row
  // (contiguous layout), or `chunks`: which global rows the views hold (ring/layout.hpp);
  // accumulators: 1 for softmax mixing, G for mean mixing (one per branch).
  CpuBackend(const Shape& local, std::int64_t shard_begin, View<const T> q, View<const T> k,
             View<const T> v, Acc scale, bool causal, std::int64_t accumulators, int threads)
      : CpuBackend(local, std::vector<Chunk>{{shard_begin, shard_begin + local.seq_len, 0}}, q, k, v,
                   scale, causal, accumulators, threads) {}
  CpuBackend(const Shape& local, std::vector<Chunk> chunks, View<const T> q, View<const T> k,
             View<const T> v, Acc scale, bool causal, std::int64_t accumulators, int threads)
      : shape_(local), chunks_(std::move(chunks)), q_(q), k_(k), v_(v), scale_(scale), causal_(causal),
        accumulators_(accumulators), threads_(std::max(1, threads)),
        acc_o_(static_cast<std::size_t>(accumulators * local.batch * local.num_heads *
                                        local.seq_len * local.head_dim),
               Acc(0)),
        acc_lse_(static_cast<std::size_t>(accumulators * local.batch * local.num_heads *
                                          local.seq_len),
                 negative_infinity<Acc>()) {}

  Buffer make_buffer(std::size_t elements) const { return Buffer(elements); }
  static void* bytes(Buffer& buffer) { return buffer.data(); }
  static std::size_t element_size() { return sizeof(T); }

  // K rows then V rows of (batch b, kv head g) at global positions `rows`, each head_dim wide,
  // written at `destination + element_offset`.
  void pack(Buffer& destination, std::size_t element_offset, std::int64_t b, std::int64_t g,
            const Progression& rows) const {
    const std::int64_t dim = shape_.head_dim;
    T* out = destination.data() + element_offset;
    for (const View<const T>* source : {&k_, &v_})
      for (std::int64_t j = 0; j < rows.count; ++j) {
        const T* row = source->data + b * source->batch_stride +
                       local_of(rows.at(j)) * source->seq_stride + g * source->head_stride;
        out = std::copy(row, row + dim, out);
      }
  }

  // Scratch one thread reuses for every block it computes.
  struct Workspace {
    Workspace(std::int64_t head_dim, CpuIsa isa) : attend(head_dim, isa) {}
    cpu::AttendWorkspace<Acc> attend;
    std::vector<Acc> o, lse;
  };

  // Runs body(b, h, workspace) for every (batch, query head), each pair on one thread. The
  // schedule is static (thread t takes pairs t, t + threads, ...) so that the calling thread
  // always computes blocks, and so drives the transport's progress between them (forward.hpp).
  // The instruction set is resolved here, on the calling thread, so that a bad
  // DILATED_ATTENTION_CPU_ISA raises std::invalid_argument to the caller; a worker's exception
  // is carried back and rethrown here after every worker has joined, never left to terminate.
  template <class Body>
  void for_each_head(Body&& body) {
    const std::int64_t pairs = shape_.batch * shape_.num_heads;
    const CpuIsa isa = cpu::resolve_isa(CpuIsa::automatic);
    std::exception_ptr error;
    std::mutex error_mutex;
    std::atomic<bool> failed{false};
    const auto work = [&](int thread) {
      try {
        Workspace workspace(shape_.head_dim, isa);
        for (std::int64_t index = thread; index < pairs && !failed.load(std::memory_order_relaxed);
             index += threads_)
          body(index / shape_.num_heads, index % shape_.num_heads, workspace);
      } catch (...) {
        const std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
        failed.store(true, std::memory_order_relaxed);
      }
    };
    std::vector<std::thread> pool;
    const int helpers = static_cast<int>(std::min<std::int64_t>(threads_, pairs)) - 1;
    try {
      for (int t = 1; t <= helpers; ++t) pool.emplace_back(work, t);
    } catch (...) {
      failed.store(true, std::memory_order_relaxed);  // could not start a thread: stop, report
      for (std::thread& thread : pool) thread.join();
      throw;
    }
    work(0);
    for (std::thread& thread : pool) thread.join();
    if (error) std::rethrow_exception(error);
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
    cpu::attend(workspace.attend, q_rows, k_rows, v_rows, dim, scale_, causal_,
                workspace.o.data(), workspace.lse.data());
    for (std::int64_t j = 0; j < queries.count; ++j) {
      const std::int64_t x = local_of(queries.at(j));
      const std::size_t row = row_index(slot, b, h, x);
      const MergeWeights<Acc> w = merge_weights(acc_lse_[row], workspace.lse[static_cast<std::size_t>(j)]);
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
            lse[(b * shape_.num_heads + h) * shape_.seq_len + x] = static_cast<lse_type_t<T>>(row_lse);
        }
  }

 private:
  cpu::StridedRows<T> local_rows(const View<const T>& view, std::int64_t b, std::int64_t head,
                                 const Progression& rows) const {
    return {view.data + b * view.batch_stride + local_of(rows.first) * view.seq_stride +
                head * view.head_stride,
            rows.stride * view.seq_stride, rows};
  }
  // The local row of global position x (a progression never crosses a chunk: the schedule
  // cuts every one at chunk bounds).
  std::int64_t local_of(std::int64_t x) const {
    for (const Chunk& chunk : chunks_)
      if (chunk.contains(x)) return chunk.local + (x - chunk.begin);
    return -1;  // unreachable for rows the schedule names
  }
  std::size_t row_index(std::int64_t slot, std::int64_t b, std::int64_t h, std::int64_t x) const {
    return static_cast<std::size_t>(((slot * shape_.batch + b) * shape_.num_heads + h) *
                                        shape_.seq_len + x);
  }

  Shape shape_;
  std::vector<Chunk> chunks_;
  View<const T> q_, k_, v_;
  Acc scale_;
  bool causal_;
  std::int64_t accumulators_;
  int threads_;
  std::vector<Acc> acc_o_, acc_lse_;
};

}  // namespace dilated_attention::ring
