#pragma once
// The block-level CPU backward primitive (docs/semantics.md "The gradient"): the gradient of one head's query
// rows attending one head's key/value rows, everything addressed in the caller's memory by
// stride, as in the forward primitive (attend.hpp). Dilation is a row stride; nothing is gathered.
//
// FlashAttention-2's recipe, one (query tile, key tile) pair at a time, with the row statistics
// of the forward supplied by the caller:
//   P  = exp(scale * Q Kᵀ - LSE)          (masked: causal, empty rows)
//   dP = weight * dO Vᵀ
//   dS = scale * P ∘ (dP - D)             D = rowsum(weight * dO ∘ O), computed by the caller
//   dV += weight * Pᵀ dO,  dK += dSᵀ Q,  dQ += dS K
// `weight` is 1 for softmax mixing and 1/G for mean mixing (dO_i = dO / G). Any of dQ, dK, dV may
// be left out: the backward driver asks for dK and dV in one pass and dQ in another, so that
// every gradient row is finished by one work unit (no racing accumulation).
//
// The five tile products, each labelled "Product n" below, run on the forward's micro-kernels
// (kernels/generic.hpp states the contract; kernels/dispatch.hpp picks the instruction set once
// per workspace). Q and dO are packed once per query tile (as rows for Products 1-2, as column
// panels for 3-4), K and V once per tile pair (key panels for 1-2, K's column panels for 5).
// Pᵀ and dSᵀ need no copy: the kernels address A by two strides. dQ sums in a padded tile over
// the key tiles and is added to the caller's rows once per query tile; dK and dV are added once
// per tile pair. All scratch is heap memory of the workspace, sized by head_dim and the kernel's
// register tile (never by sequence or segment length): the stack holds only register tiles, so
// the backward runs on a thread with a 128 KiB stack. The summation order depends only on the
// row counts and the CpuIsa: bitwise reproducible for a given CpuIsa.

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "../merge.hpp"
#include "../pattern.hpp"
#include "attend.hpp"
#include "kernels/dispatch.hpp"
#include "kernels/pack.hpp"

namespace dilated_attention::cpu {

// Where gradient rows accumulate: row j at data + j * row_stride (head_dim contiguous values of
// the accumulator type). A null `data` means "not wanted".
template <class Acc>
struct GradientRows {
  Acc* data = nullptr;
  std::int64_t row_stride = 0;
};

namespace detail {

// Rows of a backward tile (query and key tiles alike): a multiple of the register tile's rows
// and columns (a key tile is both a column range of S and a row range of dK and dV), near 128.
inline std::int64_t backward_tile_rows(int kernel_rows, int kernel_cols) {
  std::int64_t step = kernel_rows;
  while (step % kernel_cols != 0) step += kernel_rows;  // lcm(kernel_rows, kernel_cols)
  return std::max<std::int64_t>(step, 128 / step * step);
}

// Keys packed at once: whole tiles, as many as keep the chunk's five panels (K twice, V, the dK
// and dV sums, chunk x padded_dim each) within about half of a 1 MiB L2 cache.
inline std::int64_t backward_chunk_rows(std::int64_t tile_rows, std::int64_t padded_dim,
                                        std::size_t element_size) {
  const std::int64_t per_row = 5 * padded_dim * static_cast<std::int64_t>(element_size);
  return std::max<std::int64_t>(1, 512 * 1024 / per_row / tile_rows) * tile_rows;
}

// rows[i][d] += factor * tile[i * tile_row + d] for i < count, d < dim.
template <class Acc>
void add_rows(const Acc* tile, std::int64_t tile_row, std::int64_t count, std::int64_t dim,
              Acc factor, Acc* rows, std::int64_t row_stride) {
  for (std::int64_t i = 0; i < count; ++i) {
    Acc* to = rows + i * row_stride;
    const Acc* from = tile + i * tile_row;
    if (factor == Acc(1)) {
      for (std::int64_t d = 0; d < dim; ++d) to[d] += from[d];
    } else {
      for (std::int64_t d = 0; d < dim; ++d) to[d] += factor * from[d];
    }
  }
}

}  // namespace detail

// Scratch for attend_backward() and attend_statistics(): one per thread, allocated once at
// construction, reused across calls.
template <class Acc>
class AttendBackwardWorkspace {
 public:
  explicit AttendBackwardWorkspace(std::int64_t head_dim, CpuIsa isa = CpuIsa::automatic)
      : head_dim_(head_dim), isa_(resolve_isa(isa)) {
    if (head_dim <= 0)
      throw std::invalid_argument(
          "dilated_attention::cpu::attend_backward: head_dim must be positive");
    int cols = 0;
    kernels::with_kernels<Acc>(isa_, [&](auto k) {
      using K = decltype(k);
      tile_rows_ = detail::backward_tile_rows(K::rows, K::cols);
      cols = K::cols;
    });
    padded_dim_ = kernels::round_up(head_dim, cols);
    chunk_rows_ = detail::backward_chunk_rows(tile_rows_, padded_dim_, sizeof(Acc));
    const std::int64_t t = tile_rows_, c = chunk_rows_;
    for (auto* buffer : {&q_rows_, &d_out_rows_})
      *buffer = kernels::AlignedBuffer<Acc>(t * head_dim);
    for (auto* buffer : {&q_columns_, &d_out_columns_, &d_q_tile_})
      *buffer = kernels::AlignedBuffer<Acc>(t * padded_dim_);
    for (auto* buffer : {&k_panels_, &v_panels_})
      *buffer = kernels::AlignedBuffer<Acc>(c * head_dim);
    for (auto* buffer : {&k_columns_, &d_k_chunk_, &d_v_chunk_})
      *buffer = kernels::AlignedBuffer<Acc>(c * padded_dim_);
    probabilities_ = kernels::AlignedBuffer<Acc>(t * t);
    d_scores_ = kernels::AlignedBuffer<Acc>(t * t);
    lse_.resize(static_cast<std::size_t>(t));
    delta_.resize(static_cast<std::size_t>(t));
    visible_.resize(static_cast<std::size_t>(t));
    state_.resize(static_cast<std::size_t>(t));
  }

  std::int64_t head_dim() const { return head_dim_; }
  CpuIsa isa() const { return isa_; }                      // the kernels this workspace runs
  std::int64_t tile_rows() const { return tile_rows_; }    // rows of a query or key tile
  std::int64_t chunk_rows() const { return chunk_rows_; }  // keys packed at once (whole tiles)

 private:
  template <class K, class T, class A>
  friend void attend_backward_with(AttendBackwardWorkspace<A>&, const StridedRows<T>&,
                                   const StridedRows<T>&, const StridedRows<T>&,
                                   const StridedRows<T>&, const A*, const A*, A, A, bool,
                                   GradientRows<A>, GradientRows<A>, GradientRows<A>, std::int64_t);
  template <class K, class T, class A>
  friend void attend_statistics_with(AttendBackwardWorkspace<A>&, const StridedRows<T>&,
                                     const StridedRows<T>&, const StridedRows<T>&,
                                     const StridedRows<T>&, A, A, bool, A*, A*);

  // Products 1 and 2 of the packed query tile (bq rows, a multiple of K::rows) and bk packed
  // keys from key k0 of the packed chunk: S into probabilities_, dO Vᵀ into d_scores_.
  template <class K>
  void scores(std::int64_t bq, std::int64_t k0, std::int64_t bk) {
    constexpr int mr = K::rows, nr = K::cols;
    const std::int64_t dim = head_dim_, t = tile_rows_;
    const Acc* k_panels = k_panels_.data() + k0 * dim;  // k0 is a multiple of nr
    const Acc* v_panels = v_panels_.data() + k0 * dim;
    for (std::int64_t p = 0; p < (bk + nr - 1) / nr; ++p)
      for (std::int64_t s = 0; s < bq / mr; ++s) {
        // Product 1: S = Q Kᵀ (unscaled; the scale enters the exponent).
        K::multiply(q_rows_.data() + s * mr * dim, dim, 1, k_panels + p * dim * nr, dim,
                    probabilities_.data() + s * mr * t + p * nr, t, false);
        // Product 2: dP = dO Vᵀ (the mixing weight is applied per row).
        K::multiply(d_out_rows_.data() + s * mr * dim, dim, 1, v_panels + p * dim * nr, dim,
                    d_scores_.data() + s * mr * t + p * nr, t, false);
      }
  }

  template <class K, class T>
  void pack_panels(const StridedRows<T>& rows, std::int64_t begin, std::int64_t count, Acc* out) {
    const T* first = rows.data + begin * rows.row_stride;
    if constexpr (std::is_same_v<T, Acc>)
      K::pack_key_panels(first, rows.row_stride, count, head_dim_, out);
    else
      kernels::pack_key_panels(first, rows.row_stride, count, head_dim_, K::cols, out);
  }

  std::int64_t head_dim_;
  CpuIsa isa_;
  std::int64_t tile_rows_ = 0, chunk_rows_ = 0, padded_dim_ = 0;
  kernels::AlignedBuffer<Acc> q_rows_, d_out_rows_;        // query tile, packed rows
  kernels::AlignedBuffer<Acc> q_columns_, d_out_columns_;  // query tile, column panels
  kernels::AlignedBuffer<Acc> k_panels_, v_panels_;        // key chunk, key panels
  kernels::AlignedBuffer<Acc> k_columns_;                  // key chunk, column panels
  kernels::AlignedBuffer<Acc> d_k_chunk_, d_v_chunk_;      // key chunk x padded_dim: sums
  kernels::AlignedBuffer<Acc> probabilities_, d_scores_;   // tile x tile: S then P; dP then dS
  kernels::AlignedBuffer<Acc> d_q_tile_;                   // query tile x padded_dim: dQ sums
  std::vector<Acc> lse_, delta_;                           // per query row of the tile
  std::vector<std::int64_t> visible_;                      // per query row: keys it may see
  std::vector<OnlineSoftmax<Acc>> state_;                  // per query row (attend_statistics)
};

// attend_backward() with kernel set K (the workspace's).
template <class K, class T, class Acc>
void attend_backward_with(AttendBackwardWorkspace<Acc>& ws, const StridedRows<T>& q,
                          const StridedRows<T>& k, const StridedRows<T>& v,
                          const StridedRows<T>& d_out, const Acc* lse, const Acc* delta, Acc scale,
                          Acc weight, bool causal, GradientRows<Acc> d_q, GradientRows<Acc> d_k,
                          GradientRows<Acc> d_v, std::int64_t query_skip) {
  static_assert(std::is_same_v<typename K::value_type, Acc>, "kernel set of another type");
  using kernels::round_up;
  constexpr int mr = K::rows, nr = K::cols;
  const std::int64_t dim = ws.head_dim_, padded_dim = ws.padded_dim_, t = ws.tile_rows_;
  const std::int64_t num_queries = std::max<std::int64_t>(q.positions.count, 0);
  const std::int64_t num_keys = std::max<std::int64_t>(k.positions.count, 0);
  Acc* const p = ws.probabilities_.data();
  Acc* const ds = ws.d_scores_.data();
  Acc* const d_q_tile = ws.d_q_tile_.data();
  Acc* const d_k_chunk = ws.d_k_chunk_.data();
  Acc* const d_v_chunk = ws.d_v_chunk_.data();
  // Positions increase, so the last query sees the most keys: the chunk loop stops there.
  const std::int64_t last_visible =
      num_queries == 0 ? 0
      : causal         ? detail::keys_up_to(k.positions, q.positions.at(num_queries - 1))
                       : num_keys;

  // Key chunks outer (K, V packed once per chunk; dK, dV summed in the chunk's panels), query
  // tiles inner (Q, dO packed once per chunk and tile; dQ summed over the chunk's key tiles).
  for (std::int64_t c0 = 0; c0 < last_visible; c0 += ws.chunk_rows_) {
    const std::int64_t cc = std::min(ws.chunk_rows_, last_visible - c0), ccn = round_up(cc, nr);
    const std::int64_t ccm = round_up(cc, t);
    ws.template pack_panels<K>(k, c0, cc, ws.k_panels_.data());
    ws.template pack_panels<K>(v, c0, cc, ws.v_panels_.data());
    if (d_q.data != nullptr)
      kernels::pack_column_panels(k.data + c0 * k.row_stride, k.row_stride, cc, ccn, dim, nr,
                                  ws.k_columns_.data());
    if (d_k.data != nullptr) std::fill(d_k_chunk, d_k_chunk + ccm * padded_dim, Acc(0));
    if (d_v.data != nullptr) std::fill(d_v_chunk, d_v_chunk + ccm * padded_dim, Acc(0));

    // The first tile is cut short by query_skip (mod t), so later tiles fall on the grid of the
    // longer list q's rows are the tail of (attend_backward below).
    for (std::int64_t q0 = 0, bq = 0; q0 < num_queries; q0 += bq) {
      bq = std::min(q0 == 0 ? t - query_skip % t : t, num_queries - q0);
      const std::int64_t bqm = round_up(bq, mr);
      std::int64_t key_limit = 0;  // keys of this chunk that some row of the tile sees
      for (std::int64_t j = 0; j < bq; ++j) {
        const std::int64_t x = q.positions.at(q0 + j);
        const auto row = static_cast<std::size_t>(j);
        ws.lse_[row] = lse[x];
        ws.delta_[row] = delta[x];
        std::int64_t visible = causal ? detail::keys_up_to(k.positions, x) : num_keys;
        if (lse[x] == negative_infinity<Acc>()) visible = 0;  // an empty row: nothing flows back
        ws.visible_[row] = std::clamp<std::int64_t>(visible - c0, 0, cc);
        key_limit = std::max(key_limit, ws.visible_[row]);
      }
      if (key_limit == 0) continue;  // causal: the chunk is in the future of the whole tile
      const T* q_first = q.data + q0 * q.row_stride;
      const T* d_out_first = d_out.data + q0 * d_out.row_stride;
      kernels::pack_rows(q_first, q.row_stride, bq, bqm, dim, ws.q_rows_.data());
      kernels::pack_rows(d_out_first, d_out.row_stride, bq, bqm, dim, ws.d_out_rows_.data());
      if (d_k.data != nullptr)
        kernels::pack_column_panels(q_first, q.row_stride, bq, bq, dim, nr, ws.q_columns_.data());
      if (d_v.data != nullptr)
        kernels::pack_column_panels(d_out_first, d_out.row_stride, bq, bq, dim, nr,
                                    ws.d_out_columns_.data());

      for (std::int64_t k0 = 0; k0 < key_limit; k0 += t) {
        const std::int64_t bk = std::min(t, key_limit - k0), bkm = round_up(bk, mr);
        ws.template scores<K>(bqm, k0, bk);

        for (std::int64_t j = 0; j < bqm; ++j) {
          const auto row = static_cast<std::size_t>(j);
          const std::int64_t n =
              j < bq ? std::clamp<std::int64_t>(ws.visible_[row] - k0, 0, bk) : 0;
          Acc* p_row = p + j * t;
          Acc* ds_row = ds + j * t;
          // P = exp(scale * S - LSE) on the visible keys; dS = scale * P ∘ (weight * dP - D).
          // Both are 0 on the rest of the row (and on padding rows), which the products read.
          if (n > 0) {
            static_cast<void>(K::exp_shifted_sum(p_row, n, scale, ws.lse_[row]));
            const Acc d = ws.delta_[row];
            for (std::int64_t y = 0; y < n; ++y)
              ds_row[y] = (scale * p_row[y]) * (weight * ds_row[y] - d);
          }
          std::fill(p_row + n, p_row + t, Acc(0));
          std::fill(ds_row + n, ds_row + t, Acc(0));
        }

        // Pᵀ and dSᵀ as A: key row i, query p at i + p * t.
        for (std::int64_t c = 0; c < padded_dim / nr; ++c)
          for (std::int64_t s = 0; s < bkm / mr; ++s) {
            const std::int64_t to = (k0 + s * mr) * padded_dim + c * nr;
            // Product 3: dV += Pᵀ dO (the weight is applied once, when the chunk is added).
            if (d_v.data != nullptr)
              K::multiply(p + s * mr, 1, t, ws.d_out_columns_.data() + c * bq * nr, bq,
                          d_v_chunk + to, padded_dim, true);
            // Product 4: dK += dSᵀ Q.
            if (d_k.data != nullptr)
              K::multiply(ds + s * mr, 1, t, ws.q_columns_.data() + c * bq * nr, bq, d_k_chunk + to,
                          padded_dim, true);
          }
        // Product 5: dQ += dS K, summed over the chunk's key tiles in d_q_tile (the first key
        // tile writes every element of it, so it needs no zeroing).
        if (d_q.data != nullptr)
          for (std::int64_t c = 0; c < padded_dim / nr; ++c)
            for (std::int64_t s = 0; s < bqm / mr; ++s)
              K::multiply(ds + s * mr * t, t, 1, ws.k_columns_.data() + (c * ccn + k0) * nr, bk,
                          d_q_tile + s * mr * padded_dim + c * nr, padded_dim, k0 != 0);
      }
      if (d_q.data != nullptr)
        detail::add_rows(d_q_tile, padded_dim, bq, dim, Acc(1), d_q.data + q0 * d_q.row_stride,
                         d_q.row_stride);
    }
    if (d_v.data != nullptr)
      detail::add_rows(d_v_chunk, padded_dim, cc, dim, weight, d_v.data + c0 * d_v.row_stride,
                       d_v.row_stride);
    if (d_k.data != nullptr)
      detail::add_rows(d_k_chunk, padded_dim, cc, dim, Acc(1), d_k.data + c0 * d_k.row_stride,
                       d_k.row_stride);
  }
}

// Accumulates the gradient of the block attention of q's rows over k/v's rows (docs/semantics.md
// docs/semantics.md "The gradient"). d_out has q's rows (same positions; its own data and stride). lse[x] and delta[x] are the
// row statistics of the query at sequence position x: the LSE the probabilities are normalised
// with, and D = weight * rowsum(dO ∘ O). A row with lse = -inf attends nothing and contributes
// nothing. Results are added (+=) to d_q (q's rows), d_k and d_v (k's rows); null ones are
// skipped. Causal means key position <= query position. Single-threaded and deterministic: the
// summation order depends only on the row counts, query_skip and workspace.isa().
// query_skip: q's rows are the rows from query_skip on of a longer list whose first query_skip
// rows would contribute exact zeros (zero q and dO): the query tiles are laid on that list's grid
// (the first one cut short), so dK and dV are summed in the same groups, and round the same, as
// over the longer list. A row-restricted backward (cpu/backward_range.hpp) relies on it.
template <class T, class Acc>
void attend_backward(AttendBackwardWorkspace<Acc>& workspace, const StridedRows<T>& q,
                     const StridedRows<T>& k, const StridedRows<T>& v, const StridedRows<T>& d_out,
                     const Acc* lse, const Acc* delta, std::int64_t head_dim, Acc scale, Acc weight,
                     bool causal, GradientRows<Acc> d_q, GradientRows<Acc> d_k,
                     GradientRows<Acc> d_v, std::int64_t query_skip = 0) {
  static_assert(std::is_same_v<Acc, accumulator_t<T>>,
                "attend_backward: Acc must be accumulator_t<T>");
  if (head_dim != workspace.head_dim())
    throw std::invalid_argument(
        "dilated_attention::cpu::attend_backward: head_dim differs from the workspace's");
  if (k.positions.count != v.positions.count || q.positions.count != d_out.positions.count)
    throw std::invalid_argument(
        "dilated_attention::cpu::attend_backward: k and v (or q and d_out) have different row "
        "counts");
  if (query_skip < 0)
    throw std::invalid_argument(
        "dilated_attention::cpu::attend_backward: query_skip must not be negative");
  kernels::with_kernels<Acc>(workspace.isa(), [&](auto kernel_set) {
    attend_backward_with<decltype(kernel_set)>(workspace, q, k, v, d_out, lse, delta, scale, weight,
                                               causal, d_q, d_k, d_v, query_skip);
  });
}

}  // namespace dilated_attention::cpu
