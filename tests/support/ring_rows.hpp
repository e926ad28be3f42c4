#pragma once
// Moving a ring rank's rows between global test tensors and its local ones, in the order of its
// chunks (ring/driver/layout.hpp). Shared by the CPU ring tests (ring_support.hpp, ring_mpi_test.cpp) and the
// CUDA ring tests (ring_cuda_gradient_cases.hpp). Plain C++.

#include <dilated_attention/config.hpp>
#include <dilated_attention/ring/driver/layout.hpp>

#include <cstdint>
#include <vector>

#include "support/tensors.hpp"

namespace dilated_attention::testing {

// A shard view: same strides, data moved to the shard's first row.
template <class T>
View<T> shard_view(View<T> global, std::int64_t begin) {
  return {global.data + begin * global.seq_stride, global.batch_stride, global.seq_stride,
          global.head_stride};
}

// A rank's rows of a global tensor, copied in `chunks` order into a dense local tensor.
template <class T>
Tensor<T> gather_rows(const Tensor<T>& global, const std::vector<ring::Chunk>& chunks,
                      std::int64_t length) {
  Shape local = global.shape;
  local.seq_len = length;
  Tensor<T> result(local, global.heads);
  for (const ring::Chunk& chunk : chunks)
    for (std::int64_t b = 0; b < local.batch; ++b)
      for (std::int64_t x = chunk.begin; x < chunk.end; ++x)
        for (std::int64_t h = 0; h < global.heads; ++h)
          for (std::int64_t d = 0; d < local.head_dim; ++d)
            result.at(b, chunk.local + x - chunk.begin, h, d) = global.at(b, x, h, d);
  return result;
}

// A rank's rows of a [batch, heads, N] LSE array, in `chunks` order: [batch, heads, length].
template <class L>
std::vector<L> gather_lse(const std::vector<L>& global, const Shape& shape,
                          const std::vector<ring::Chunk>& chunks, std::int64_t length) {
  std::vector<L> local(static_cast<std::size_t>(shape.batch * shape.num_heads * length));
  for (const ring::Chunk& chunk : chunks)
    for (std::int64_t bh = 0; bh < shape.batch * shape.num_heads; ++bh)
      for (std::int64_t x = chunk.begin; x < chunk.end; ++x)
        local[static_cast<std::size_t>(bh * length + chunk.local + x - chunk.begin)] =
            global[static_cast<std::size_t>(bh * shape.seq_len + x)];
  return local;
}

// Writes a rank's local tensor back into its rows of the global one (logical elements only).
template <class T>
void scatter_rows(const Tensor<T>& local, const std::vector<ring::Chunk>& chunks,
                  Tensor<T>& global) {
  for (const ring::Chunk& chunk : chunks)
    for (std::int64_t b = 0; b < global.shape.batch; ++b)
      for (std::int64_t x = chunk.begin; x < chunk.end; ++x)
        for (std::int64_t h = 0; h < global.heads; ++h)
          for (std::int64_t d = 0; d < global.shape.head_dim; ++d)
            global.at(b, x, h, d) = local.at(b, chunk.local + x - chunk.begin, h, d);
}

}  // namespace dilated_attention::testing
