#pragma once
// Packing for the micro-kernels: rows addressed by stride (any storage type: float, double,
// bfloat16, half) copied once into the accumulator type, in the layout multiply() streams
// (generic.hpp), zero-padded to whole register tiles so that the kernels have no edge cases.
//
//   pack_rows            rows x dim, row-major, contiguous: the A side (query rows).
//   pack_key_panels      panels of `cols` rows, each [dim][cols]: B = rowsᵀ (K for Q Kᵀ; V
//                        for the backward's dO Vᵀ).
//   pack_column_panels   panels of `cols` columns, each [rows][cols]: B = rows (V for P V; K, Q
//                        and dO for the backward's dS K, dSᵀ Q, Pᵀ dO).
//
// AlignedBuffer is the owning storage (64-byte aligned, so each panel starts on a cache line).

#include "prefetch.hpp"
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>

namespace dilated_attention::cpu::kernels {

// Rows to ask for ahead of the one being copied. Packed rows are strided (a dilated block of a
// [B, N, H, D] tensor: r * H * D elements apart), and the copy of each stalled on its first load
// (`perf`: the K transpose's hottest instruction, 4 % of a forward on Zen 3).
inline constexpr std::int64_t pack_prefetch_rows = 8;

inline std::int64_t round_up(std::int64_t value, std::int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

template <class Acc>
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  explicit AlignedBuffer(std::int64_t size)
      : data_(size > 0 ? static_cast<Acc*>(::operator new(
                             static_cast<std::size_t>(size) * sizeof(Acc), std::align_val_t{64}))
                       : nullptr),
        size_(std::max<std::int64_t>(size, 0)) {}
  Acc* data() { return data_.get(); }
  const Acc* data() const { return data_.get(); }
  std::int64_t size() const { return size_; }

 private:
  struct Free {
    void operator()(Acc* p) const { ::operator delete(p, std::align_val_t{64}); }
  };
  std::unique_ptr<Acc, Free> data_;
  std::int64_t size_ = 0;
};

// out[i * dim + d] = rows[i][d] for i < count, 0 for count <= i < padded_count.
template <class T, class Acc>
void pack_rows(const T* data, std::int64_t row_stride, std::int64_t count,
               std::int64_t padded_count, std::int64_t dim, Acc* out) {
  for (std::int64_t i = 0; i < count; ++i) {
    const T* row = data + i * row_stride;
    Acc* to = out + i * dim;
    for (std::int64_t d = 0; d < dim; ++d) to[d] = static_cast<Acc>(row[d]);
  }
  std::fill(out + count * dim, out + padded_count * dim, Acc(0));
}

// Panel p (rows p*cols .. p*cols+cols-1) at out + p * dim * cols, element [d][j] = rows[p*cols +
// j][d]; rows at or past `count` are zero.
template <class T, class Acc>
void pack_key_panels(const T* data, std::int64_t row_stride, std::int64_t count, std::int64_t dim,
                     int cols, Acc* out) {
  const std::int64_t panels = (count + cols - 1) / cols;
  for (std::int64_t p = 0; p < panels; ++p) {
    Acc* panel = out + p * dim * cols;
    const std::int64_t live = std::min<std::int64_t>(cols, count - p * cols);
    for (std::int64_t j = 0; j < live; ++j) {
      const std::int64_t ahead = p * cols + j + pack_prefetch_rows;
      if (ahead < count) prefetch_bytes(data + ahead * row_stride, dim * std::int64_t(sizeof(T)));
      const T* row = data + (p * cols + j) * row_stride;
      for (std::int64_t d = 0; d < dim; ++d) panel[d * cols + j] = static_cast<Acc>(row[d]);
    }
    for (std::int64_t j = live; j < cols; ++j)
      for (std::int64_t d = 0; d < dim; ++d) panel[d * cols + j] = Acc(0);
  }
}

// Column panel c (columns c*cols .. c*cols+cols-1) at out + c * padded_count * cols, element
// [i][j] = rows[i][c*cols + j]; columns at or past dim and rows at or past count are zero.
template <class T, class Acc>
void pack_column_panels(const T* data, std::int64_t row_stride, std::int64_t count,
                        std::int64_t padded_count, std::int64_t dim, int cols, Acc* out) {
  const std::int64_t panels = (dim + cols - 1) / cols;
  for (std::int64_t c = 0; c < panels; ++c) {
    Acc* panel = out + c * padded_count * cols;
    const std::int64_t d0 = c * cols, live = std::min<std::int64_t>(cols, dim - d0);
    for (std::int64_t i = 0; i < count; ++i) {
      if (i + pack_prefetch_rows < count)
        prefetch_bytes(data + (i + pack_prefetch_rows) * row_stride + d0,
                       live * std::int64_t(sizeof(T)));
      const T* row = data + i * row_stride + d0;
      Acc* to = panel + i * cols;
      for (std::int64_t j = 0; j < live; ++j) to[j] = static_cast<Acc>(row[j]);
      for (std::int64_t j = live; j < cols; ++j) to[j] = Acc(0);
    }
    std::fill(panel + count * cols, panel + padded_count * cols, Acc(0));
  }
}

}  // namespace dilated_attention::cpu::kernels
