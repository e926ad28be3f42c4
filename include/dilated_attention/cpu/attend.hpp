#pragma once
// The block-level CPU primitive: one head's query rows attend one head's key/value rows, all
// addressed in the caller's memory by stride (dilation is a row stride: nothing is gathered).
// The forward driver (forward.hpp) and the ring's CPU back end both build on it.
//
// Inside, a flash-style loop on packed operands (kernels/generic.hpp states the contract):
//   for each query chunk (<= query_chunk rows): pack its rows once (widened to Acc);
//     for each key chunk (<= key_chunk keys, only the causal prefix the chunk can see):
//       pack K into key panels and V into column panels once, reused by every query tile;
//       for each query tile (4 register strips) and key tile (<= key_tile keys):
//         S = Q Kᵀ by micro-kernel; per row fold the tile into its online softmax (max, sum)
//         with the kernel's vectorised exp; O += P V by micro-kernel.
// No intrinsic appears here: kernels/dispatch.hpp picks the instruction set (CpuIsa) once per
// workspace. All scratch lives in the workspace, sized at construction by head_dim and the
// chunk limits (never by sequence or segment length); the stack holds only register tiles.
// The summation order depends only on the inputs, the kernel set and these constants: results
// are bitwise reproducible for a given CpuIsa, and differ between CpuIsas within rounding.

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "../merge.hpp"
#include "../pattern.hpp"
#include "kernels/dispatch.hpp"
#include "kernels/pack.hpp"

namespace dilated_attention::cpu {

// Accumulator type: double for double storage, float otherwise (float, bfloat16, half).
template <class T>
using accumulator_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Rows of one head addressed by stride: no gathered copies. Row j lives at data + j * row_stride
// (head_dim contiguous elements) and sits at sequence position positions.at(j); positions.count
// is the row count. Positions are increasing (a stride >= 1) whenever count > 1.
template <class T>
struct StridedRows {
  const T* data;
  std::int64_t row_stride;
  Progression positions;
};

// Loop limits. A query chunk is packed once per call and key chunk; a key chunk (K and V
// packed: 2 * key_chunk * head_dim values, 512 KiB at D = 64 in float) is packed once per query
// chunk and stays in L2 while every query tile of the chunk streams it; a key tile bounds the
// score tile (4 strips x key_tile).
inline constexpr std::int64_t query_chunk = 2048;
inline constexpr std::int64_t key_chunk = 1024;
inline constexpr std::int64_t key_tile = 512;
inline constexpr int strips_per_tile = 4;
// Keys one P V kernel call sums in registers before adding to the accumulator (blocked
// summation: shorter chains of float additions).
inline constexpr std::int64_t sum_depth = 128;

namespace detail {

// How many of `keys` lie at or before position x: the causal prefix a query at x may see.
inline std::int64_t keys_up_to(const Progression& keys, std::int64_t x) {
  if (keys.count <= 1) return keys.count == 1 && keys.first <= x ? 1 : 0;
  return keys.count_up_to(x);
}

}  // namespace detail

// Scratch for attend(): one per thread, allocated once at construction. max_queries and
// max_keys (row counts the caller will pass, if smaller than the chunk limits) only shrink it.
template <class Acc>
class AttendWorkspace {
 public:
  explicit AttendWorkspace(std::int64_t head_dim, CpuIsa isa = CpuIsa::automatic,
                           std::int64_t max_queries = query_chunk,
                           std::int64_t max_keys = key_chunk)
      : head_dim_(head_dim), isa_(resolve_isa(isa)) {
    if (head_dim <= 0)
      throw std::invalid_argument("dilated_attention::cpu::attend: head_dim must be positive");
    kernels::with_kernels<Acc>(isa_, [&](auto k) {
      using K = decltype(k);
      tile_rows_ = strips_per_tile * K::rows;
      cols_ = K::cols;
    });
    using kernels::round_up;
    query_rows_ = round_up(std::clamp<std::int64_t>(max_queries, 1, query_chunk), tile_rows_);
    key_rows_ = round_up(std::clamp<std::int64_t>(max_keys, 1, key_chunk), cols_);
    padded_dim_ = round_up(head_dim, cols_);
    queries_ = kernels::AlignedBuffer<Acc>(query_rows_ * head_dim);
    keys_ = kernels::AlignedBuffer<Acc>(key_rows_ * head_dim);
    values_ = kernels::AlignedBuffer<Acc>(key_rows_ * padded_dim_);
    accumulator_ = kernels::AlignedBuffer<Acc>(query_rows_ * padded_dim_);
    scores_ = kernels::AlignedBuffer<Acc>(tile_rows_ * key_tile);
    state_.resize(static_cast<std::size_t>(query_rows_));
    visible_.resize(static_cast<std::size_t>(query_rows_));
  }

  std::int64_t head_dim() const { return head_dim_; }
  CpuIsa isa() const { return isa_; }                      // the kernels this workspace runs
  std::int64_t query_rows() const { return query_rows_; }  // rows of a query chunk
  std::int64_t key_rows() const { return key_rows_; }      // keys of a key chunk
  std::int64_t tile_rows() const { return tile_rows_; }    // rows of a query tile

 private:
  template <class K, class T, class A>
  friend void attend_with(AttendWorkspace<A>&, const StridedRows<T>&, const StridedRows<T>&,
                          const StridedRows<T>&, A, bool, A*, A*);

  std::int64_t head_dim_;
  CpuIsa isa_;
  std::int64_t tile_rows_ = 0, cols_ = 0, query_rows_ = 0, key_rows_ = 0, padded_dim_ = 0;
  kernels::AlignedBuffer<Acc> queries_;      // query chunk, rows x head_dim
  kernels::AlignedBuffer<Acc> keys_;         // key chunk as key panels
  kernels::AlignedBuffer<Acc> values_;       // value chunk as column panels
  kernels::AlignedBuffer<Acc> accumulator_;  // query chunk x padded_dim: unnormalised output
  kernels::AlignedBuffer<Acc> scores_;       // query tile x key_tile: scores, then numerators
  std::vector<OnlineSoftmax<Acc>> state_;    // per query row of the chunk
  std::vector<std::int64_t> visible_;        // per query row: keys it may see (causal prefix)
};

// The loop nest above with kernel set K (workspace.isa()'s, picked by attend()).
template <class K, class T, class Acc>
void attend_with(AttendWorkspace<Acc>& ws, const StridedRows<T>& q, const StridedRows<T>& k,
                 const StridedRows<T>& v, Acc scale, bool causal, Acc* out_o, Acc* out_lse) {
  static_assert(std::is_same_v<typename K::value_type, Acc>, "kernel set of another type");
  using kernels::round_up;
  constexpr int mr = K::rows, nr = K::cols;
  const std::int64_t dim = ws.head_dim_, padded_dim = ws.padded_dim_;
  const std::int64_t num_queries = std::max<std::int64_t>(q.positions.count, 0);
  const std::int64_t num_keys = std::max<std::int64_t>(k.positions.count, 0);
  Acc* const queries = ws.queries_.data();
  Acc* const keys = ws.keys_.data();
  Acc* const values = ws.values_.data();
  Acc* const accumulator = ws.accumulator_.data();
  Acc* const scores = ws.scores_.data();

  for (std::int64_t q0 = 0; q0 < num_queries; q0 += ws.query_rows_) {
    const std::int64_t cq = std::min(ws.query_rows_, num_queries - q0);
    kernels::pack_rows(q.data + q0 * q.row_stride, q.row_stride, cq, round_up(cq, mr), dim,
                       queries);
    std::int64_t key_limit = 0;  // the chunk's key loop stops after the longest prefix
    for (std::int64_t j = 0; j < cq; ++j) {
      const std::int64_t visible =
          causal ? detail::keys_up_to(k.positions, q.positions.at(q0 + j)) : num_keys;
      ws.visible_[static_cast<std::size_t>(j)] = visible;
      ws.state_[static_cast<std::size_t>(j)] = OnlineSoftmax<Acc>{};
      key_limit = std::max(key_limit, visible);
    }
    std::fill(accumulator, accumulator + round_up(cq, mr) * padded_dim, Acc(0));

    for (std::int64_t k0 = 0; k0 < key_limit; k0 += ws.key_rows_) {
      const std::int64_t ck = std::min(ws.key_rows_, key_limit - k0), ckp = round_up(ck, nr);
      if constexpr (std::is_same_v<T, Acc>)
        K::pack_key_panels(k.data + k0 * k.row_stride, k.row_stride, ck, dim, keys);
      else
        kernels::pack_key_panels(k.data + k0 * k.row_stride, k.row_stride, ck, dim, nr, keys);
      kernels::pack_column_panels(v.data + k0 * v.row_stride, v.row_stride, ck, ckp, dim, nr,
                                  values);

      for (std::int64_t t0 = 0; t0 < cq; t0 += ws.tile_rows_) {
        const std::int64_t bq = std::min(ws.tile_rows_, cq - t0), strips = (bq + mr - 1) / mr;
        std::int64_t tile_limit = 0;  // causal tiles in every row's future are never visited
        for (std::int64_t j = 0; j < bq; ++j)
          tile_limit = std::max(tile_limit, ws.visible_[static_cast<std::size_t>(t0 + j)] - k0);
        tile_limit = std::min(tile_limit, ck);

        for (std::int64_t kt0 = 0; kt0 < tile_limit; kt0 += key_tile) {
          const std::int64_t bk = std::min(key_tile, tile_limit - kt0), bkp = round_up(bk, nr);
          for (std::int64_t p = 0; p < bkp / nr; ++p)  // S = Q Kᵀ, one key panel at a time
            for (std::int64_t s = 0; s < strips; ++s)
              K::multiply(queries + (t0 + s * mr) * dim, dim, 1, keys + (kt0 / nr + p) * dim * nr,
                          dim, scores + s * mr * key_tile + p * nr, key_tile, false);

          for (std::int64_t j = 0; j < bq; ++j) {  // online softmax, row by row
            Acc* row = scores + j * key_tile;
            const std::int64_t n = std::clamp<std::int64_t>(
                ws.visible_[static_cast<std::size_t>(t0 + j)] - k0 - kt0, 0, bk);
            if (n > 0) {
              OnlineSoftmax<Acc>& state = ws.state_[static_cast<std::size_t>(t0 + j)];
              const Acc factor = state.rescale(K::max_scaled(row, n, scale));
              state.sum += K::exp_shifted_sum(row, n, scale, state.max);
              if (factor != Acc(1)) {
                Acc* acc_row = accumulator + (t0 + j) * padded_dim;
                for (std::int64_t d = 0; d < padded_dim; ++d) acc_row[d] *= factor;
              }
            }
            std::fill(row + n, row + bkp, Acc(0));  // keys in the row's future weigh nothing
          }

          // O += P V, one column panel at a time, summing at most sum_depth keys in registers
          for (std::int64_t c = 0; c < padded_dim / nr; ++c)
            for (std::int64_t s = 0; s < strips; ++s)
              for (std::int64_t p0 = 0; p0 < bkp; p0 += sum_depth)
                K::multiply(scores + s * mr * key_tile + p0, key_tile, 1,
                            values + (c * ckp + kt0 + p0) * nr, std::min(sum_depth, bkp - p0),
                            accumulator + (t0 + s * mr) * padded_dim + c * nr, padded_dim, true);
        }
      }
    }

    for (std::int64_t j = 0; j < cq; ++j) {
      const OnlineSoftmax<Acc>& state = ws.state_[static_cast<std::size_t>(j)];
      const Acc inverse = state.inverse_sum();
      const Acc* acc_row = accumulator + j * padded_dim;
      Acc* out_row = out_o + (q0 + j) * dim;
      for (std::int64_t d = 0; d < dim; ++d) out_row[d] = acc_row[d] * inverse;
      out_lse[q0 + j] = state.lse();
    }
  }
}

// attend() with caller-owned scratch (workspace.head_dim() must equal head_dim).
template <class T, class Acc>
void attend(AttendWorkspace<Acc>& workspace, const StridedRows<T>& q, const StridedRows<T>& k,
            const StridedRows<T>& v, std::int64_t head_dim, Acc scale, bool causal, Acc* out_o,
            Acc* out_lse) {
  static_assert(std::is_same_v<Acc, accumulator_t<T>>, "attend: Acc must be accumulator_t<T>");
  if (head_dim != workspace.head_dim())
    throw std::invalid_argument(
        "dilated_attention::cpu::attend: head_dim differs from the workspace's");
  if (k.positions.count != v.positions.count)
    throw std::invalid_argument(
        "dilated_attention::cpu::attend: k and v have different row counts");
  kernels::with_kernels<Acc>(workspace.isa(), [&](auto kernel_set) {
    attend_with<decltype(kernel_set)>(workspace, q, k, v, scale, causal, out_o, out_lse);
  });
}

// The partial (docs/semantics.md vocabulary) of the query rows over the key/value rows: for
// query row j, out_o[j * head_dim + d] is the softmax-normalised output and out_lse[j] = ln sum_y
// exp(scale * <q_j, k_y>) over the keys it attends (-inf and o = 0 when it attends none).
// Causal means key position <= query position. k and v have the same positions and count.
// Single-threaded; callers parallelise over independent calls. Deterministic: the result
// depends only on the inputs and the CpuIsa (isa.hpp), never on thread count or timing.
// Allocates its scratch per call; the workspace overload above reuses it.
template <class T>
void attend(const StridedRows<T>& q, const StridedRows<T>& k, const StridedRows<T>& v,
            std::int64_t head_dim, accumulator_t<T> scale, bool causal, accumulator_t<T>* out_o,
            accumulator_t<T>* out_lse, CpuIsa isa = CpuIsa::automatic) {
  if (head_dim <= 0)
    throw std::invalid_argument("dilated_attention::cpu::attend: head_dim must be positive");
  AttendWorkspace<accumulator_t<T>> workspace(head_dim, isa, q.positions.count, k.positions.count);
  attend(workspace, q, k, v, head_dim, scale, causal, out_o, out_lse);
}

}  // namespace dilated_attention::cpu
