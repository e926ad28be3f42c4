#pragma once
// The inference forms on the CPU (docs/semantics.md "Inference forms"): queries at an offset of
// their sequence (decode, chunked prefill), a variable-length batch packed back to back, keys and
// values in pages, and a padded batch with valid lengths. Each computes rows of the ordinary
// forward over each sequence on its own, with the forward's own code (forward_rows) and row
// pointers offset into the caller's memory: no query, output or contiguous key row is gathered.
//
// Two paths:
//   window path  (a call with some sequence of more than one query row): units of (sequence,
//                head, window of query rows), exactly the forward's work per row; every row is
//                bitwise the row of the forward over its sequence (same blocks, same merge).
//   decode path  (every sequence has at most one query row): a one-row kernel (decode_piece)
//                that streams each key and value position once from the caller's memory -- in
//                place, or straight from its page -- without packing, for every head that
//                attends the block (they share its positions). Each block's keys are cut into
//                fixed pieces (decode_key_piece keys each, independent of the thread count)
//                whose partials are computed in parallel (units of (sequence, branch, piece))
//                and merged per row by LSE in block and piece order. Bitwise identical for any thread count
//                and between paged and contiguous K/V; within rounding of the forward's row (its
//                own summation order: docs/semantics.md "Inference forms").
// Paged keys on the window path: a block's key and value rows are copied from their pages into
// the thread's scratch, then attended as contiguous rows, so the result is bitwise the same call
// on contiguous K/V (the same values reach the same packing code).
//
// What a decode call allocates: with a DecodeWorkspace that has served a call of the same or
// larger size, nothing on one thread (options.num_threads = 1); with more threads, only what
// starting std::threads allocates (cpu::run_units). Without a workspace, the call builds one.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "../arguments.hpp"
#include "../config.hpp"
#include "../merge.hpp"
#include "../pattern.hpp"
#include "../sequences.hpp"
#include "../validate_sequences.hpp"
#include "attend.hpp"
#include "backward.hpp"
#include "backward_range.hpp"
#include "forward.hpp"
#include "kernels/prefetch.hpp"
#include "kernels/widen.hpp"
#include "threads.hpp"

namespace dilated_attention {

namespace cpu {

// Keys of one decode piece: a block's visible keys are cut at multiples of this (= key_chunk,
// the attend primitive's own key chunk, so a block of at most this many keys is one piece).
inline constexpr std::int64_t decode_key_piece = key_chunk;

// Bytes of K or V rows the decode kernel asks for ahead of the row it reads: enough to cover the
// memory latency on one core (about 1.5 KiB at ~100 ns and ~15 GB/s), few enough that the
// requests fit the core's outstanding-miss buffers (docs/performance.md "Inference").
inline constexpr std::int64_t decode_prefetch_bytes = 1536;

template <class T>
class DecodeWorkspace;

namespace detail {

// Where one sequence's rows live in one call. Query row j (position query_begin + j) of head h
// is at q + j * q_seq + h * q_head; likewise out; its LSE at lse[h * lse_head + j]. Key row y of
// kv head g is at k + y * k_seq + g * k_head (contiguous), or, when `pages` is set, at
// k + pages[y / page_size] * page_stride + (y % page_size) * k_seq + g * k_head (v alike).
template <class T>
struct SequenceRows {
  std::int64_t kv_len = 0, query_begin = 0, query_count = 0;
  const T* q = nullptr;
  std::int64_t q_seq = 0, q_head = 0;
  T* out = nullptr;
  std::int64_t out_seq = 0, out_head = 0;
  lse_type_t<T>* lse = nullptr;
  std::int64_t lse_head = 0;
  const T* k = nullptr;
  const T* v = nullptr;
  std::int64_t k_seq = 0, k_head = 0, v_seq = 0, v_head = 0;
  const std::int32_t* pages = nullptr;
  std::int64_t page_size = 1, page_stride = 0;

  // One sequence of a call: kv_len positions, queries [query_begin, query_begin + query_count)
  // whose q and out rows start at row `first` of batch element `b` of the views; its LSE of
  // query row j of head h at lse[h * lse_head + j]. Keys are set by with_keys / with_pages.
  static SequenceRows queries(std::int64_t kv_len, std::int64_t query_begin,
                              std::int64_t query_count, const View<const T>& q, const View<T>& out,
                              std::int64_t b, std::int64_t first, lse_type_t<T>* lse,
                              std::int64_t lse_head) {
    SequenceRows s;
    s.kv_len = kv_len;
    s.query_begin = query_begin;
    s.query_count = query_count;
    s.q = q.data + b * q.batch_stride + first * q.seq_stride;
    s.q_seq = q.seq_stride;
    s.q_head = q.head_stride;
    s.out = out.data + b * out.batch_stride + first * out.seq_stride;
    s.out_seq = out.seq_stride;
    s.out_head = out.head_stride;
    s.lse = lse;
    s.lse_head = lse_head;
    return s;
  }
  // Key and value rows from row `first` of batch element `b` of the views.
  SequenceRows with_keys(const View<const T>& k_view, const View<const T>& v_view, std::int64_t b,
                         std::int64_t first) const {
    SequenceRows s = *this;
    s.k = k_view.data + b * k_view.batch_stride + first * k_view.seq_stride;
    s.v = v_view.data + b * v_view.batch_stride + first * v_view.seq_stride;
    s.k_seq = k_view.seq_stride;
    s.k_head = k_view.head_stride;
    s.v_seq = v_view.seq_stride;
    s.v_head = v_view.head_stride;
    return s;
  }
  // Key and value rows in the pages of sequence b's page-table row.
  SequenceRows with_pages(const PagedKeyValues<T>& paged, std::int64_t b) const {
    SequenceRows s = *this;
    s.k = paged.k;
    s.v = paged.v;
    s.k_seq = s.v_seq = paged.row_stride;
    s.k_head = s.v_head = paged.head_stride;
    s.pages = paged.page_table + b * paged.page_table_stride;
    s.page_size = paged.page_size;
    s.page_stride = paged.page_stride;
    return s;
  }

  HeadRows<T> head_rows(std::int64_t h) const {
    return {q + h * q_head,
            q_seq,
            out + h * out_head,
            out_seq,
            lse != nullptr ? lse + h * lse_head : nullptr,
            query_begin};
  }
  // The K and V rows of `keys` for kv head g: in place, or copied from the pages into k_buffer
  // and v_buffer (keys.count * dim elements each).
  std::pair<StridedRows<T>, StridedRows<T>> key_rows(std::int64_t g, const Progression& keys,
                                                     std::int64_t dim, T* k_buffer,
                                                     T* v_buffer) const {
    if (pages == nullptr)
      return {StridedRows<T>{k + g * k_head + keys.first * k_seq, keys.stride * k_seq, keys},
              StridedRows<T>{v + g * v_head + keys.first * v_seq, keys.stride * v_seq, keys}};
    for (std::int64_t j = 0; j < keys.count; ++j) {
      const std::int64_t y = keys.at(j);
      const std::int64_t at =
          static_cast<std::int64_t>(pages[y / page_size]) * page_stride + (y % page_size) * k_seq;
      std::copy_n(k + at + g * k_head, dim, k_buffer + j * dim);
      std::copy_n(v + at + g * v_head, dim, v_buffer + j * dim);
    }
    return {StridedRows<T>{k_buffer, dim, keys}, StridedRows<T>{v_buffer, dim, keys}};
  }
};

// The keys query x of head h sees in branch i of a sequence of n positions (empty when the head
// skips the branch or x is not selected): what for_each_block_in(h, x, x + 1) visits.
inline Progression decode_keys(const Config& config, std::int64_t num_heads, std::int64_t i,
                               std::int64_t h, std::int64_t x, std::int64_t n) {
  const auto branches = static_cast<std::int64_t>(config.segment_lengths.size());
  const BranchGeometry geometry{config.segment_lengths[static_cast<std::size_t>(i)],
                                config.dilation_rates[static_cast<std::size_t>(i)], n};
  const std::int64_t o = head_offset(config.offsets, i, branches, geometry.r, h, num_heads);
  if (o < 0 || !geometry.selected(x, o)) return {x, 1, 0};
  const Progression block = geometry.rows(geometry.segment_of(x), o);
  return config.causal ? block.prefix(block.index_of(x) + 1) : block;
}

inline std::int64_t pieces_of(const Progression& keys) {
  return (keys.count + decode_key_piece - 1) / decode_key_piece;
}

// Asks for the rows a decode piece will read at one position (`at`: the position's [Hkv, D]
// row): the slices of the kv heads the heads read (kv_read: ascending, once each), and no other
// bytes.
template <class T>
DILATED_ATTENTION_ALWAYS_INLINE inline void prefetch_kv_rows(const T* at,
                                                             const std::int64_t* kv_read,
                                                             std::int64_t num_kv_read,
                                                             std::int64_t head_stride,
                                                             std::int64_t row_bytes) {
  for (std::int64_t c = 0; c < num_kv_read; ++c)
    kernels::prefetch_bytes(at + kv_read[c] * head_stride, row_bytes);
}

// Four keys' dot products with one query row, reduced together: per key a packet of partial
// sums (one multiply-add per packet of the row, in order), each halved to four lanes, then one
// 4 x 4 transpose and three adds leave key t's dot in lane t. One transpose for four keys where a
// dot per key pays its own horizontal sum, and the four scores are stored and maxed as one
// packet. Available where Acc has packets of 4, 8 or 16 lanes that divide Dim (SSE, AVX2,
// AVX-512 and NEON floats; AVX doubles); elsewhere decode_piece_with takes one dot per key.
// Eigen's packet types carry vector attributes that GCC drops (and warns about) when they are
// template arguments; only their size and operations are used here.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"
#endif
template <class Acc, int Dim>
struct FourDots {
  using Packet = typename Eigen::internal::packet_traits<Acc>::type;
  static constexpr int lanes = Eigen::internal::unpacket_traits<Packet>::size;
  static constexpr bool available = Dim != Eigen::Dynamic &&
                                    Eigen::internal::packet_traits<Acc>::Vectorizable &&
                                    (lanes == 4 || lanes == 8 || lanes == 16) && Dim % lanes == 0;

  // The packet of four lanes a packet halves to (itself where it has four).
  template <class P, int Size = Eigen::internal::unpacket_traits<P>::size>
  struct Halved {
    using type = P;
  };
  template <class P>
  struct Halved<P, 8> {
    using type = typename Eigen::internal::unpacket_traits<P>::half;
  };
  template <class P>
  struct Halved<P, 16> {
    using type = typename Halved<typename Eigen::internal::unpacket_traits<P>::half>::type;
  };
  using Quad = typename Halved<Packet>::type;

  template <class P>
  static Quad four_lanes(const P& p) {
    if constexpr (Eigen::internal::unpacket_traits<P>::size == 4)
      return p;
    else
      return four_lanes(Eigen::internal::predux_half_dowto4(p));
  }

  // scale * (row t . q) in lane t, t = 0..3.
  static Quad scores(const Acc* q, const Acc* const* rows, Acc scale) {
    using namespace Eigen::internal;
    Packet sum[4];
    const Packet q0 = ploadu<Packet>(q);
    for (int t = 0; t < 4; ++t) sum[t] = pmul(ploadu<Packet>(rows[t]), q0);
    for (int d = lanes; d < Dim; d += lanes) {
      const Packet qd = ploadu<Packet>(q + d);
      for (int t = 0; t < 4; ++t) sum[t] = pmadd(ploadu<Packet>(rows[t] + d), qd, sum[t]);
    }
    PacketBlock<Quad, 4> block;
    for (int t = 0; t < 4; ++t) block.packet[t] = four_lanes(sum[t]);
    ptranspose(block);
    const Quad dots =
        padd(padd(block.packet[0], block.packet[1]), padd(block.packet[2], block.packet[3]));
    return pmul(pset1<Quad>(scale), dots);
  }
};
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

// One decode piece for the heads of a sequence that attend one branch: every such head has the
// same offset there (a decode row is selected by exactly the heads whose offset is its own), so
// they read the same key rows, and one pass over the rows serves them all. The rows are streamed
// once, in increasing position, each position's [Hkv, D] row read from the first to the last kv
// head the heads need: contiguous memory instead of one strided pass per head, and under GQA a
// kv row is read from memory once for its whole group. Per head the arithmetic is that of a
// one-head pass, in two passes over the keys (scores and their max, then the weights and
// O = sum_y p_y v_y / sum_y p_y), in fixed order; head a's partial goes to o[a] and lse[a].
// Head a reads kv head kv_heads[a]; kv_read lists those kv heads once each, ascending (the
// caller divides once per piece: a 64-bit division per head and key, in the prefetch and the
// row addresses, held about 45 % of the samples of a step whose rows were in cache).
template <class T, class Acc>
void decode_piece(const SequenceRows<T>& s, const std::int64_t* heads, const std::int64_t* kv_heads,
                  std::int64_t num_heads, const std::int64_t* kv_read, std::int64_t num_kv_read,
                  const Progression& keys, std::int64_t dim, Acc scale, Acc* query, Acc* scores,
                  std::int64_t scores_stride, Acc* maxima, Acc* const* o, Acc* const* lse);

// decode_piece with a head_dim known at compile time (64, 128) or not (Eigen::Dynamic): a fixed
// size unrolls the dot and the axpy (no loop or alignment bookkeeping per key row), and the
// scores go four keys at a time (FourDots) where the packets allow; a piece's last keys (its
// count mod 4) and other head_dims take one Eigen dot per key. Either way a key's score depends
// only on its place in the piece, never on the thread or the addresses.
template <int Dim, class T, class Acc>
void decode_piece_with(const SequenceRows<T>& s, const std::int64_t* heads,
                       const std::int64_t* kv_heads, std::int64_t num_heads,
                       const std::int64_t* kv_read, std::int64_t num_kv_read,
                       const Progression& keys, std::int64_t dim, Acc scale, Acc* query,
                       Acc* scores, std::int64_t scores_stride, Acc* maxima, Acc* const* o,
                       Acc* const* lse) {
  using Vector = Eigen::Matrix<Acc, Dim, 1>;
  using Row = Eigen::Matrix<T, Dim, 1>;
  using Four = FourDots<Acc, Dim>;
  for (std::int64_t a = 0; a < num_heads; ++a)
    Eigen::Map<Vector>(query + a * dim, dim) =
        Eigen::Map<const Row>(s.q + heads[a] * s.q_head, dim).template cast<Acc>();
  // Position y's row (all kv heads) in place or in its page.
  auto position = [&](const T* base, std::int64_t stride, std::int64_t y) {
    return base + (s.pages == nullptr
                       ? y * stride
                       : static_cast<std::int64_t>(s.pages[y / s.page_size]) * s.page_stride +
                             (y % s.page_size) * stride);
  };
  auto row = [&](const T* at, std::int64_t head_stride, std::int64_t a) {
    return Eigen::Map<const Row>(at + kv_heads[a] * head_stride, dim);
  };
  // Head a's row at `at` as Acc. Half-width storage (bfloat16, half) at a compile-time head_dim
  // is widened into `widened` by kernels/widen.hpp (exact, vectorised) and read by the float
  // code; Eigen's cast does the same conversion one scalar at a time, which made these steps
  // 4-6x slower than float ones while they read half the bytes. Other head_dims keep the cast.
  constexpr bool widen_rows = !std::is_same_v<T, Acc> && Dim != Eigen::Dynamic;
  alignas(64) Acc widened[widen_rows ? 4 : 1][widen_rows ? Dim : 1];
  auto acc_row = [&](const T* at, std::int64_t head_stride, std::int64_t a) {
    if constexpr (widen_rows) {
      kernels::widen(row(at, head_stride, a).data(), widened[0], Dim);
      return Eigen::Map<const Vector, Eigen::Aligned64>(widened[0]);
    } else {
      return row(at, head_stride, a).template cast<Acc>();
    }
  };
  // The rows are strided (a dilated block, pages): the hardware prefetcher does not follow them
  // across pages, so each pass asks for its rows some keys ahead (about decode_prefetch_bytes in
  // flight).
  const std::int64_t row_bytes = dim * static_cast<std::int64_t>(sizeof(T));
  const std::int64_t ahead =
      std::clamp<std::int64_t>(decode_prefetch_bytes / (num_kv_read * row_bytes), 1, 8);
  for (std::int64_t j = 0; j < std::min(ahead, keys.count); ++j)
    prefetch_kv_rows(position(s.k, s.k_seq, keys.at(j)), kv_read, num_kv_read, s.k_head, row_bytes);
  // Both passes go through the piece in chunks of `chunk` positions and, within a chunk, head by
  // head: the first head's loop asks for every head's rows ahead, the others find them in cache,
  // and each head's running max and output stay in registers over the chunk.
  // at[] holds the chunk's rows and the `ahead` after them (the prefetch's), found by stepping
  // through the pages: one division per chunk, not one per key (a 64-bit idiv costs more than a
  // key's dot at D = 64).
  constexpr std::int64_t chunk = 32;
  const T* at[chunk + 8];
  auto positions = [&](const T* base, std::int64_t stride, std::int64_t j0, std::int64_t j1) {
    const std::int64_t end = std::min(keys.count, j1 + ahead);
    if (s.pages == nullptr) {
      for (std::int64_t j = j0; j < end; ++j) at[j - j0] = base + keys.at(j) * stride;
      return;
    }
    const std::int64_t y = keys.at(j0), page_step = keys.stride / s.page_size,
                       row_step = keys.stride % s.page_size;
    std::int64_t page = y / s.page_size, row_in_page = y % s.page_size;
    for (std::int64_t j = j0; j < end; ++j) {
      at[j - j0] =
          base + static_cast<std::int64_t>(s.pages[page]) * s.page_stride + row_in_page * stride;
      page += page_step;
      row_in_page += row_step;
      if (row_in_page >= s.page_size) {
        row_in_page -= s.page_size;
        ++page;
      }
    }
  };
  for (std::int64_t a = 0; a < num_heads; ++a) maxima[a] = negative_infinity<Acc>();
  for (std::int64_t j0 = 0; j0 < keys.count; j0 += chunk) {
    const std::int64_t j1 = std::min(keys.count, j0 + chunk);
    positions(s.k, s.k_seq, j0, j1);
    for (std::int64_t a = 0; a < num_heads; ++a) {
      const Eigen::Map<const Vector> q(query + a * dim, dim);
      Acc* const head_scores = scores + a * scores_stride;
      auto prefetch_ahead = [&](std::int64_t j) DILATED_ATTENTION_ALWAYS_INLINE {
        if (a == 0 && j + ahead < keys.count)
          prefetch_kv_rows(at[j + ahead - j0], kv_read, num_kv_read, s.k_head, row_bytes);
      };
      Acc max = maxima[a];
      std::int64_t j = j0;
      if constexpr (Four::available && (std::is_same_v<T, Acc> || widen_rows)) {
        // Four keys at a time (FourDots); the piece's last keys (fewer than four) one by one.
        using Quad = typename Four::Quad;
        Quad quad_max = Eigen::internal::pset1<Quad>(max);
        for (; j + 4 <= j1; j += 4) {
          const Acc* rows[4];
          for (int t = 0; t < 4; ++t) {
            prefetch_ahead(j + t);
            const T* r = row(at[j + t - j0], s.k_head, a).data();
            if constexpr (widen_rows) {
              kernels::widen(r, widened[t], Dim);
              rows[t] = widened[t];
            } else {
              rows[t] = r;
            }
          }
          const Quad four = Four::scores(q.data(), rows, scale);
          Eigen::internal::pstoreu(head_scores + j, four);
          quad_max = Eigen::internal::pmax(quad_max, four);
        }
        max = Eigen::internal::predux_max(quad_max);
      }
      for (; j < j1; ++j) {
        prefetch_ahead(j);
        const Acc score = scale * acc_row(at[j - j0], s.k_head, a).dot(q);
        head_scores[j] = score;
        max = std::max(max, score);
      }
      maxima[a] = max;
    }
  }
  // The weights, by Eigen's vectorised exp over the whole piece (each head's scores start on a
  // 64-byte boundary, so the same elements take the same path in every call), summed in order.
  using Array = Eigen::Array<Acc, Eigen::Dynamic, 1>;
  for (std::int64_t a = 0; a < num_heads; ++a) {
    Eigen::Map<Vector>(o[a], dim).setZero();
    Eigen::Map<Array> weights(scores + a * scores_stride, keys.count);
    weights = (weights - maxima[a]).exp();
  }
  for (std::int64_t j = 0; j < std::min(ahead, keys.count); ++j)
    prefetch_kv_rows(position(s.v, s.v_seq, keys.at(j)), kv_read, num_kv_read, s.v_head, row_bytes);
  for (std::int64_t j0 = 0; j0 < keys.count; j0 += chunk) {
    const std::int64_t j1 = std::min(keys.count, j0 + chunk);
    positions(s.v, s.v_seq, j0, j1);
    for (std::int64_t a = 0; a < num_heads; ++a) {
      const Acc* weights = scores + a * scores_stride;
      auto prefetch_ahead = [&](std::int64_t j) DILATED_ATTENTION_ALWAYS_INLINE {
        if (a == 0 && j + ahead < keys.count)
          prefetch_kv_rows(at[j + ahead - j0], kv_read, num_kv_read, s.v_head, row_bytes);
      };
      if constexpr (Dim != Eigen::Dynamic) {  // the chunk's sum in registers, then added
        Vector sum = Vector::Zero();
        for (std::int64_t j = j0; j < j1; ++j) {
          prefetch_ahead(j);
          sum += weights[j] * acc_row(at[j - j0], s.v_head, a);
        }
        Eigen::Map<Vector>(o[a], dim) += sum;
      } else {  // no fixed-size register vector: straight into the partial
        Eigen::Map<Vector> out(o[a], dim);
        for (std::int64_t j = j0; j < j1; ++j) {
          prefetch_ahead(j);
          out += weights[j] * acc_row(at[j - j0], s.v_head, a);
        }
      }
    }
  }
  for (std::int64_t a = 0; a < num_heads; ++a) {
    const Acc* weights = scores + a * scores_stride;
    Acc sum = Acc(0);
    for (std::int64_t j = 0; j < keys.count; ++j) sum += weights[j];
    Eigen::Map<Vector> out(o[a], dim);
    if (keys.count == 0 || !(sum > Acc(0))) {
      out.setZero();
      *lse[a] = negative_infinity<Acc>();
      continue;
    }
    out *= Acc(1) / sum;
    *lse[a] = maxima[a] + std::log(sum);
  }
}

template <class T, class Acc>
void decode_piece(const SequenceRows<T>& s, const std::int64_t* heads, const std::int64_t* kv_heads,
                  std::int64_t num_heads, const std::int64_t* kv_read, std::int64_t num_kv_read,
                  const Progression& keys, std::int64_t dim, Acc scale, Acc* query, Acc* scores,
                  std::int64_t scores_stride, Acc* maxima, Acc* const* o, Acc* const* lse) {
  switch (dim) {
    case 64:
      return decode_piece_with<64>(s, heads, kv_heads, num_heads, kv_read, num_kv_read, keys, dim,
                                   scale, query, scores, scores_stride, maxima, o, lse);
    case 128:
      return decode_piece_with<128>(s, heads, kv_heads, num_heads, kv_read, num_kv_read, keys, dim,
                                    scale, query, scores, scores_stride, maxima, o, lse);
    default:
      return decode_piece_with<Eigen::Dynamic>(s, heads, kv_heads, num_heads, kv_read, num_kv_read,
                                               keys, dim, scale, query, scores, scores_stride,
                                               maxima, o, lse);
  }
}

// The most pieces one row can have: per branch, its longest block's (w / r rounded up).
inline std::int64_t max_pieces_per_row(const Config& config) {
  std::int64_t pieces = 0;
  for (std::size_t i = 0; i < config.segment_lengths.size(); ++i) {
    const std::int64_t w = config.segment_lengths[i], r = config.dilation_rates[i];
    pieces += ((w + r - 1) / r + decode_key_piece - 1) / decode_key_piece;
  }
  return pieces;
}

}  // namespace detail

// Reusable scratch of the decode path: per thread a piece's scores and widened query rows for
// every head, and per call the pieces' partials and their index. It grows to what a call needs
// and is kept: once it has served a call, a call of the same or smaller batch, heads, head_dim,
// config and thread count allocates nothing here (docs/semantics.md "Inference forms" says what
// else a call allocates). Not shared by concurrent calls.
template <class T>
class DecodeWorkspace {
 public:
  using Acc = accumulator_t<T>;
  DecodeWorkspace() = default;

  // Sizes it for calls of up to `rows` (batch x heads) decode rows on `threads` threads.
  void reserve(const Config& config, const HeadShape& heads, std::int64_t rows, int threads,
               CpuIsa isa = CpuIsa::automatic) {
    const std::int64_t per_sequence = std::max<std::int64_t>(1, heads.num_heads);
    prepare(config, heads, (rows + per_sequence - 1) / per_sequence, threads, resolve_isa(isa));
  }

 private:
  // Scores of one head within a slot: a piece's worth, padded so that every head's start keeps
  // the 64-byte alignment of the first.
  static constexpr std::int64_t scores_stride = decode_key_piece + 64 / sizeof(Acc);

  struct Slot {
    Slot(std::int64_t dim, std::int64_t num_heads)
        : scores_storage(static_cast<std::size_t>(num_heads * scores_stride + 64 / sizeof(Acc))),
          query(static_cast<std::size_t>(num_heads * dim)),
          maxima(static_cast<std::size_t>(num_heads)),
          heads(static_cast<std::size_t>(num_heads)),
          o(static_cast<std::size_t>(num_heads)),
          lse(static_cast<std::size_t>(num_heads)),
          kv_heads(static_cast<std::size_t>(num_heads)),
          kv_read(static_cast<std::size_t>(num_heads)) {}
    std::vector<Acc> scores_storage;  // per head a piece's scores, then its weights
    std::vector<Acc> query;           // the query rows, widened
    std::vector<Acc> maxima;          // per head the piece's largest score
    std::vector<std::int64_t> heads;  // the heads of the piece
    std::vector<Acc*> o, lse;         // where their partials go
    Acc* scores() {                   // from a 64-byte boundary on
      const auto address = reinterpret_cast<std::uintptr_t>(scores_storage.data());
      return scores_storage.data() + ((64 - address % 64) % 64) / sizeof(Acc);
    }
    // The kv head of each head of the piece; those kv heads once each, ascending.
    std::vector<std::int64_t> kv_heads, kv_read;
  };

  void prepare(const Config& config, const HeadShape& heads, std::int64_t batch, int threads,
               CpuIsa isa) {
    if (dim_ != heads.head_dim || num_heads_ != heads.num_heads || isa_ != isa) {
      slots_.clear();
      dim_ = heads.head_dim;
      num_heads_ = heads.num_heads;
      isa_ = isa;
    }
    while (static_cast<int>(slots_.size()) < threads)
      slots_.push_back(std::make_unique<Slot>(dim_, num_heads_));
    const auto branches = static_cast<std::int64_t>(config.segment_lengths.size());
    const std::int64_t rows = batch * num_heads_;
    const std::int64_t pieces = rows * detail::max_pieces_per_row(config);
    if (static_cast<std::int64_t>(partial_lse_.size()) < pieces) {
      partial_lse_.resize(static_cast<std::size_t>(pieces));
      partial_o_.resize(static_cast<std::size_t>(pieces * dim_ + 16));
    }
    if (static_cast<std::int64_t>(branch_pieces_.size()) < rows * branches + 1)
      branch_pieces_.resize(static_cast<std::size_t>(rows * branches + 1));
    if (static_cast<std::int64_t>(unit_begin_.size()) < batch * branches + 1)
      unit_begin_.resize(static_cast<std::size_t>(batch * branches + 1));
    if (static_cast<std::int64_t>(row_o_.size()) < dim_)
      row_o_.resize(static_cast<std::size_t>(dim_));
  }

  template <class U, class Describe>
  friend void detail_decode(const Config&, const HeadShape&, std::int64_t, const Describe&, int,
                            CpuIsa, DecodeWorkspace<U>&);

  std::int64_t dim_ = 0, num_heads_ = 0;
  CpuIsa isa_ = CpuIsa::automatic;
  std::vector<std::unique_ptr<Slot>> slots_;
  std::vector<Acc> partial_o_, partial_lse_, row_o_;
  // Partials are stored by row (sequence, head), then branch, then piece: branch_pieces_ holds
  // the first piece of each (row, branch), and one past the last at rows * branches, so that
  // (row, branch)'s piece count is the difference of neighbours. Work units are
  // (sequence, branch, piece), each for all the heads that attend the branch: unit_begin_ holds
  // the first unit of each (sequence, branch).
  std::vector<std::int64_t> branch_pieces_, unit_begin_;

  // The partials from a 64-byte boundary on: a piece's output row then has the same alignment
  // whatever the allocation (so Eigen's vectorised loops over it peel the same elements).
  Acc* partial_o() {
    const auto address = reinterpret_cast<std::uintptr_t>(partial_o_.data());
    return partial_o_.data() + ((64 - address % 64) % 64) / sizeof(Acc);
  }
  std::atomic<int> next_slot_{0};
};

// The decode path over `count` sequences of at most one query row each (describe(b) gives
// sequence b's SequenceRows). Rows are (sequence, head); units (sequence, branch, piece), each
// for every head that attends the branch (they share its key rows: decode_piece).
template <class T, class Describe>
void detail_decode(const Config& config, const HeadShape& heads, std::int64_t count,
                   const Describe& describe, int num_threads, CpuIsa isa, DecodeWorkspace<T>& ws) {
  using Acc = accumulator_t<T>;
  const std::int64_t H = heads.num_heads, dim = heads.head_dim;
  const std::int64_t group = heads.num_heads / heads.num_kv_heads;
  const auto branches = static_cast<std::int64_t>(config.segment_lengths.size());
  const std::int64_t rows = count * H;
  ws.prepare(config, heads, count, num_threads, isa);
  const Acc scale = static_cast<Acc>(
      resolved_scale(config, Shape{1, 1, heads.num_heads, heads.num_kv_heads, dim}));
  const Acc branch_weight = Acc(1) / static_cast<Acc>(branches);

  // Where each (row, branch)'s pieces are stored; then the units of each (sequence, branch):
  // the pieces of its attending heads' block (all attending heads have the same keys).
  std::int64_t stored = 0;
  for (std::int64_t b = 0; b < count; ++b) {
    const detail::SequenceRows<T> s = describe(b);
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t i = 0; i < branches; ++i) {
        ws.branch_pieces_[static_cast<std::size_t>((b * H + h) * branches + i)] = stored;
        if (s.query_count == 1)
          stored +=
              detail::pieces_of(detail::decode_keys(config, H, i, h, s.query_begin, s.kv_len));
      }
  }
  ws.branch_pieces_[static_cast<std::size_t>(rows * branches)] = stored;
  auto pieces_at = [&](std::int64_t row, std::int64_t i) {
    const auto at = static_cast<std::size_t>(row * branches + i);
    return ws.branch_pieces_[at + 1] - ws.branch_pieces_[at];
  };
  ws.unit_begin_[0] = 0;
  for (std::int64_t b = 0; b < count; ++b)
    for (std::int64_t i = 0; i < branches; ++i) {
      std::int64_t pieces = 0;
      for (std::int64_t h = 0; h < H && pieces == 0; ++h) pieces = pieces_at(b * H + h, i);
      const auto at = static_cast<std::size_t>(b * branches + i);
      ws.unit_begin_[at + 1] = ws.unit_begin_[at] + pieces;
    }
  const std::int64_t units = ws.unit_begin_[static_cast<std::size_t>(count * branches)];

  // Phase 1: every piece's partials, by whichever thread takes it; stored by piece index.
  ws.next_slot_.store(0);
  run_units(units, num_threads, [&](const auto& next) {
    auto& slot = *ws.slots_[static_cast<std::size_t>(ws.next_slot_.fetch_add(1))];
    for (std::int64_t unit = next(); unit >= 0; unit = next()) {
      const auto found = std::upper_bound(ws.unit_begin_.begin(),
                                          ws.unit_begin_.begin() + count * branches + 1, unit);
      const std::int64_t at = (found - ws.unit_begin_.begin()) - 1;
      const std::int64_t b = at / branches, i = at % branches;
      const std::int64_t piece = unit - ws.unit_begin_[static_cast<std::size_t>(at)];
      const detail::SequenceRows<T> s = describe(b);
      // The heads that attend branch i: one offset, so one set of keys (decode_piece).
      Progression keys{};
      std::int64_t attending = 0, read = 0;
      for (std::int64_t h = 0; h < H; ++h) {
        const Progression head_keys = detail::decode_keys(config, H, i, h, s.query_begin, s.kv_len);
        if (head_keys.empty()) continue;
        keys = head_keys;
        const std::size_t a = static_cast<std::size_t>(attending++);
        const std::int64_t stored_at =
            ws.branch_pieces_[static_cast<std::size_t>((b * H + h) * branches + i)] + piece;
        slot.heads[a] = h;
        slot.kv_heads[a] = h / group;
        if (read == 0 || slot.kv_read[static_cast<std::size_t>(read - 1)] != h / group)
          slot.kv_read[static_cast<std::size_t>(read++)] = h / group;
        slot.o[a] = ws.partial_o() + stored_at * dim;
        slot.lse[a] = &ws.partial_lse_[static_cast<std::size_t>(stored_at)];
      }
      keys = keys.slice(piece * decode_key_piece, (piece + 1) * decode_key_piece);
      detail::decode_piece<T>(s, slot.heads.data(), slot.kv_heads.data(), attending,
                              slot.kv_read.data(), read, keys, dim, scale, slot.query.data(),
                              slot.scores(), ws.scores_stride, slot.maxima.data(), slot.o.data(),
                              slot.lse.data());
    }
  });

  // Phase 2: per row, the pieces of each block merge by LSE (a block of one piece is that
  // piece), then the blocks merge into the row exactly as the forward merges them.
  Acc* const row_o = ws.row_o_.data();
  for (std::int64_t b = 0; b < count; ++b) {
    const detail::SequenceRows<T> s = describe(b);
    if (s.query_count != 1) continue;
    for (std::int64_t h = 0; h < H; ++h) {
      std::fill_n(row_o, dim, Acc(0));
      Acc row_lse = negative_infinity<Acc>();
      for (std::int64_t i = 0; i < branches; ++i) {
        const std::int64_t unit =
            ws.branch_pieces_[static_cast<std::size_t>((b * H + h) * branches + i)];
        const std::int64_t pieces = pieces_at(b * H + h, i);
        if (pieces == 0) continue;
        Acc* block_o = ws.partial_o() + unit * dim;
        Acc block_lse = ws.partial_lse_[static_cast<std::size_t>(unit)];
        for (std::int64_t p = 1; p < pieces; ++p)  // in place into the first piece's partial
          detail::merge_partial_row(block_o, block_lse, ws.partial_o() + (unit + p) * dim,
                                    ws.partial_lse_[static_cast<std::size_t>(unit + p)], dim,
                                    Mixing::softmax, Acc(1));
        detail::merge_partial_row(row_o, row_lse, block_o, block_lse, dim, config.mixing,
                                  branch_weight);
      }
      T* destination = s.out + h * s.out_head;
      for (std::int64_t d = 0; d < dim; ++d) destination[d] = static_cast<T>(row_o[d]);
      if (s.lse != nullptr) s.lse[h * s.lse_head] = static_cast<lse_type_t<T>>(row_lse);
    }
  }
}

namespace detail {

// The window path over `count` sequences.
template <class T, class Describe>
void window_path(const Config& config, const HeadShape& heads, std::int64_t count,
                 const Describe& describe, int num_threads, CpuIsa isa) {
  const std::int64_t H = heads.num_heads, dim = heads.head_dim;
  const std::int64_t group = heads.num_heads / heads.num_kv_heads;
  std::vector<std::unique_ptr<Pattern>> patterns(static_cast<std::size_t>(count));
  std::vector<std::int64_t> unit_begin(static_cast<std::size_t>(count + 1), 0);
  std::int64_t window = 1, max_keys = 1;
  bool paged = false;
  for (std::int64_t b = 0; b < count; ++b) {
    const SequenceRows<T> s = describe(b);
    paged = paged || s.pages != nullptr;
    if (s.query_count > 0) {
      patterns[static_cast<std::size_t>(b)] =
          std::make_unique<Pattern>(config, Shape{1, s.kv_len, H, heads.num_kv_heads, dim});
      window = window_length(*patterns[static_cast<std::size_t>(b)]);
      max_keys = std::max(max_keys, longest_block(*patterns[static_cast<std::size_t>(b)]));
    }
  }
  for (std::int64_t b = 0; b < count; ++b) {
    const std::int64_t rows = describe(b).query_count;
    unit_begin[static_cast<std::size_t>(b + 1)] =
        unit_begin[static_cast<std::size_t>(b)] + H * ((rows + window - 1) / window);
  }
  const std::int64_t units = unit_begin[static_cast<std::size_t>(count)];
  const std::int64_t window_rows_max = window;
  run_units(units, num_threads, [&](const auto& next) {
    ForwardWorkspace<accumulator_t<T>> workspace(window_rows_max, dim, isa, max_keys);
    std::vector<T> k_buffer(paged ? static_cast<std::size_t>(max_keys * dim) : 0),
        v_buffer(paged ? static_cast<std::size_t>(max_keys * dim) : 0);
    for (std::int64_t unit = next(); unit >= 0; unit = next()) {
      const auto found = std::upper_bound(unit_begin.begin(), unit_begin.end(), unit);
      const std::int64_t b = (found - unit_begin.begin()) - 1;
      const SequenceRows<T> s = describe(b);
      const std::int64_t local = unit - unit_begin[static_cast<std::size_t>(b)];
      const std::int64_t windows = (s.query_count + window - 1) / window;
      const std::int64_t h = local / windows, w = local % windows;
      const std::int64_t x0 = s.query_begin + w * window;
      const std::int64_t x1 = std::min(s.query_begin + s.query_count, x0 + window);
      forward_rows<T>(
          *patterns[static_cast<std::size_t>(b)], h, x0, x1, s.head_rows(h),
          [&](const Progression& keys) {
            return s.key_rows(h / group, keys, dim, k_buffer.data(), v_buffer.data());
          },
          workspace);
    }
  });
}

template <class T, class Describe>
void run_forms(const Config& config, const HeadShape& heads, std::int64_t count,
               const Describe& describe, const CpuOptions& options, DecodeWorkspace<T>* workspace) {
  const int num_threads = resolve_num_threads(options);
  const CpuIsa isa = resolve_isa(options.isa);
  std::int64_t most_rows = 0;
  for (std::int64_t b = 0; b < count; ++b) most_rows = std::max(most_rows, describe(b).query_count);
  if (most_rows <= 1) {
    if (workspace != nullptr) {
      detail_decode<T>(config, heads, count, describe, num_threads, isa, *workspace);
    } else {
      DecodeWorkspace<T> local;
      detail_decode<T>(config, heads, count, describe, num_threads, isa, local);
    }
    return;
  }
  window_path<T>(config, heads, count, describe, num_threads, isa);
}

template <class T>
void check_type() {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double> ||
                    std::is_same_v<T, Eigen::bfloat16> || std::is_same_v<T, Eigen::half>,
                "dilated_attention (CPU inference forms): T is float, double, Eigen::bfloat16 or "
                "Eigen::half");
}

}  // namespace detail
}  // namespace cpu

// 1. Queries at an offset (decode, chunked prefill): q and out hold range.count rows at positions
// [range.begin, range.begin + range.count) of each batch element ([B, count, H, D]; lse, when not
// null, [B, H, count]); k and v hold its first shape.seq_len (= kv_len) rows. Equal, row for row,
// to the forward over kv_len positions (causal or not). `workspace` (optional) is the decode
// path's reusable scratch.
template <class T>
void forward(const Config& config, const Shape& shape, const QueryRange& range,
             const Inputs<detail::identity_t<T>>& inputs, const Outputs<T>& outputs,
             const CpuOptions& options = {}, cpu::DecodeWorkspace<T>* workspace = nullptr) {
  cpu::detail::check_type<T>();
  const View<const T> q = inputs.q, k = inputs.k, v = inputs.v;
  const View<T> out = outputs.out;
  validate_query_range(config, shape, range, q, k, v, out, outputs.lse);
  cpu::resolve_num_threads(options);  // throws before any output is written
  cpu::resolve_isa(options.isa);
  const HeadShape heads{shape.num_heads, shape.num_kv_heads, shape.head_dim};
  auto describe = [&](std::int64_t b) {
    lse_type_t<T>* lse =
        outputs.lse != nullptr ? outputs.lse + b * shape.num_heads * range.count : nullptr;
    return cpu::detail::SequenceRows<T>::queries(shape.seq_len, range.begin, range.count, q, out, b,
                                                 0, lse, range.count)
        .with_keys(k, v, b, 0);
  };
  cpu::detail::run_forms<T>(config, heads, shape.batch, describe, options, workspace);
}

// 2. Variable-length batch, packed: q and out [total_q, H, D] (views of batch 1), k and v
// [total_k, Hkv, D]; sequence b's queries are rows [query_offsets[b], query_offsets[b + 1]), its
// keys rows [kv_offsets[b], kv_offsets[b + 1]); lse (optional) [H, total_q]. Each sequence is its
// own sequence (its segments start at its first key row).
template <class T>
void forward(const Config& config, const HeadShape& heads, const Sequences& sequences,
             const Inputs<detail::identity_t<T>>& inputs, const Outputs<T>& outputs,
             const CpuOptions& options = {}, cpu::DecodeWorkspace<T>* workspace = nullptr) {
  cpu::detail::check_type<T>();
  const View<const T> q = inputs.q, k = inputs.k, v = inputs.v;
  const View<T> out = outputs.out;
  validate_sequences(config, heads, sequences, q, k, v, out, outputs.lse);
  cpu::resolve_num_threads(options);
  cpu::resolve_isa(options.isa);
  const std::int64_t total_q = sequences.total_queries();
  auto describe = [&](std::int64_t b) {
    const std::int64_t q0 = sequences.query_offsets[b], k0 = sequences.kv_offsets[b];
    return cpu::detail::SequenceRows<T>::queries(
               sequences.kv_length(b), sequences.query_begin(b), sequences.query_count(b), q, out,
               0, q0, outputs.lse != nullptr ? outputs.lse + q0 : nullptr, total_q)
        .with_keys(k, v, 0, k0);
  };
  cpu::detail::run_forms<T>(config, heads, sequences.count, describe, options, workspace);
}

// 3. Paged keys and values: q and out packed as in 2; sequence b's keys are its
// sequences.kv_lengths[b] positions in the pages of `paged` (sequences.kv_offsets is null).
// Bitwise the same call on contiguous K/V. Inference only: no backward.
template <class T>
void forward(const Config& config, const HeadShape& heads, const Sequences& sequences,
             View<const detail::identity_t<T>> q,
             const PagedKeyValues<detail::identity_t<T>>& paged, const Outputs<T>& outputs,
             const CpuOptions& options = {}, cpu::DecodeWorkspace<T>* workspace = nullptr) {
  cpu::detail::check_type<T>();
  const View<T> out = outputs.out;
  validate_paged(config, heads, sequences, q, paged, out, outputs.lse);
  cpu::resolve_num_threads(options);
  cpu::resolve_isa(options.isa);
  const std::int64_t total_q = sequences.total_queries();
  auto describe = [&](std::int64_t b) {
    const std::int64_t q0 = sequences.query_offsets[b];
    return cpu::detail::SequenceRows<T>::queries(
               sequences.kv_length(b), sequences.query_begin(b), sequences.query_count(b), q, out,
               0, q0, outputs.lse != nullptr ? outputs.lse + q0 : nullptr, total_q)
        .with_pages(paged, b);
  };
  cpu::detail::run_forms<T>(config, heads, sequences.count, describe, options, workspace);
}

// 4. Padded batch: the usual [B, N, H, D] tensors, valid.lengths[b] <= N rows of element b are
// its sequence; rows at or past the length get O = 0 and LSE = -inf, and q, k, v are not read
// there.
template <class T>
void forward(const Config& config, const Shape& shape, const ValidLengths& valid,
             const Inputs<detail::identity_t<T>>& inputs, const Outputs<T>& outputs,
             const CpuOptions& options = {}) {
  cpu::detail::check_type<T>();
  const View<const T> q = inputs.q, k = inputs.k, v = inputs.v;
  const View<T> out = outputs.out;
  validate_valid_lengths(config, shape, valid, q, k, v, out, outputs.lse);
  cpu::resolve_num_threads(options);
  cpu::resolve_isa(options.isa);
  const HeadShape heads{shape.num_heads, shape.num_kv_heads, shape.head_dim};
  for (std::int64_t b = 0; b < shape.batch; ++b)  // the rows past each length
    for (std::int64_t x = valid.lengths[b]; x < shape.seq_len; ++x)
      for (std::int64_t h = 0; h < shape.num_heads; ++h) {
        std::fill_n(out.data + b * out.batch_stride + x * out.seq_stride + h * out.head_stride,
                    shape.head_dim, T(0));
        if (outputs.lse != nullptr)
          outputs.lse[(b * shape.num_heads + h) * shape.seq_len + x] =
              negative_infinity<lse_type_t<T>>();
      }
  auto describe = [&](std::int64_t b) {
    lse_type_t<T>* lse =
        outputs.lse != nullptr ? outputs.lse + b * shape.num_heads * shape.seq_len : nullptr;
    return cpu::detail::SequenceRows<T>::queries(valid.lengths[b], 0, valid.lengths[b], q, out, b,
                                                 0, lse, shape.seq_len)
        .with_keys(k, v, b, 0);
  };
  cpu::detail::run_forms<T>(config, heads, shape.batch, describe, options,
                            static_cast<cpu::DecodeWorkspace<T>*>(nullptr));
}

namespace cpu::detail {

template <class T>
View<T> shifted(const View<T>& view, std::int64_t rows) {  // rows further on; extent unchecked
  return View<T>{view.data + rows * view.seq_stride, view.batch_stride, view.seq_stride,
                 view.head_stride, -1};
}

template <class T>
View<T> element(const View<T>& view, std::int64_t b) {  // batch element b as a batch of one
  return View<T>{view.data + b * view.batch_stride, view.batch_stride, view.seq_stride,
                 view.head_stride, -1};
}

template <class T>
void zero_view_rows(const View<T>& view, std::int64_t x0, std::int64_t x1, std::int64_t heads,
                    std::int64_t dim) {
  for (std::int64_t x = x0; x < x1; ++x)
    for (std::int64_t h = 0; h < heads; ++h)
      std::fill_n(view.data + x * view.seq_stride + h * view.head_stride, dim, T(0));
}

// The backward of rows [begin, begin + count) of one sequence of kv_len positions (batch of
// one; views already validated; lse[h * lse_head + j] the forward's LSE of query row j of head
// h). When the rows are the whole sequence (n = begin + count when causal, else kv_len, is
// count), the ordinary backward; otherwise the row-restricted one (cpu/backward_range.hpp), which
// costs the range's pairs and equals the ordinary backward over the first n positions fed
// zero q, O and dO on the other rows. d_q gets the range's rows; d_k, d_v all kv_len rows.
template <class T>
void backward_range(const Config& config, const HeadShape& heads, std::int64_t kv_len,
                    std::int64_t begin, std::int64_t count, View<const T> q, View<const T> k,
                    View<const T> v, View<const T> out, const lse_type_t<T>* lse,
                    std::int64_t lse_head, View<const T> d_out, View<T> d_q, View<T> d_k,
                    View<T> d_v, const CpuOptions& options) {
  using L = lse_type_t<T>;
  const std::int64_t H = heads.num_heads, G = heads.num_kv_heads, dim = heads.head_dim;
  const std::int64_t n = config.causal ? begin + count : kv_len;
  if (begin != 0 || count != n) {
    backward_range_rows<T>(config, heads, kv_len, begin, count, q, k, v, out, lse, lse_head, d_out,
                           d_q, d_k, d_v, options);
    return;
  }
  const Shape shape{1, n, H, G, dim};
  std::vector<L> lse_rows;  // [H, n] as the ordinary backward reads it
  if (lse_head != n) {
    lse_rows.resize(static_cast<std::size_t>(H * n));
    for (std::int64_t h = 0; h < H; ++h)
      std::copy_n(lse + h * lse_head, n, lse_rows.begin() + h * n);
  }
  backward<T>(config, shape, Inputs<T>{q, k, v},
              Outputs<const T>{out, lse_rows.empty() ? lse : lse_rows.data()}, d_out,
              Gradients<T>{d_q, d_k, d_v}, options);
  zero_view_rows(d_k, n, kv_len, G, dim);
  zero_view_rows(d_v, n, kv_len, G, dim);
}

}  // namespace cpu::detail

// Backward of 1 (chunked prefill, decode): the gradient of this call's rows. d_q [B, count, H,
// D] of the range's rows; d_k, d_v [B, kv_len, Hkv, D] with respect to every K/V row, all
// overwritten: the sum of d_k (d_v) over the chunks of a chunked prefill is the full sequence's.
// forward_outputs are what forward returned for the range (lse [B, H, count], not null). Costs
// the range's own (query, key) pairs -- about 3 times the range's forward -- plus writing
// d_k, d_v (cpu/backward_range.hpp); each element equals the ordinary backward's over the
// first begin + count positions (causal) or kv_len (not causal) with zero q, O, dO outside the
// range. Nothing prefix-sized is allocated: the range's rows are read and written in place.
template <class T>
void backward(const Config& config, const Shape& shape, const QueryRange& range,
              const Inputs<detail::identity_t<T>>& inputs,
              const Outputs<const detail::identity_t<T>>& forward_outputs,
              View<const detail::identity_t<T>> d_out, const Gradients<T>& gradients,
              const CpuOptions& options = {}) {
  cpu::detail::check_type<T>();
  const View<const T> q = inputs.q, k = inputs.k, v = inputs.v, out = forward_outputs.out;
  const lse_type_t<T>* const lse = forward_outputs.lse;
  validate_query_range_backward(config, shape, range, q, k, v, out, lse, d_out, gradients.d_q,
                                gradients.d_k, gradients.d_v);
  cpu::resolve_num_threads(options);
  cpu::resolve_isa(options.isa);
  using cpu::detail::element;
  const HeadShape heads{shape.num_heads, shape.num_kv_heads, shape.head_dim};
  for (std::int64_t b = 0; b < shape.batch; ++b) {
    const lse_type_t<T>* lse_b = lse + b * shape.num_heads * range.count;
    cpu::detail::backward_range<T>(config, heads, shape.seq_len, range.begin, range.count,
                                   element(q, b), element(k, b), element(v, b), element(out, b),
                                   lse_b, range.count, element(d_out, b), element(gradients.d_q, b),
                                   element(gradients.d_k, b), element(gradients.d_v, b), options);
  }
}

// Backward of 2 (variable-length batch): packed d_out, d_q [total_q, H, D], d_k, d_v [total_k,
// Hkv, D], overwritten; lse [H, total_q] as forward returned it. Each sequence's gradient is the
// ordinary backward over that sequence alone when its query rows are all of its rows, else that
// of its query rows as in 1 (at their own pairs' cost); rows of a sequence without queries get
// zero d_k, d_v.
template <class T>
void backward(const Config& config, const HeadShape& heads, const Sequences& sequences,
              const Inputs<detail::identity_t<T>>& inputs,
              const Outputs<const detail::identity_t<T>>& forward_outputs,
              View<const detail::identity_t<T>> d_out, const Gradients<T>& gradients,
              const CpuOptions& options = {}) {
  cpu::detail::check_type<T>();
  const View<const T> q = inputs.q, k = inputs.k, v = inputs.v, out = forward_outputs.out;
  const lse_type_t<T>* const lse = forward_outputs.lse;
  validate_sequences_backward(config, heads, sequences, q, k, v, out, lse, d_out, gradients.d_q,
                              gradients.d_k, gradients.d_v);
  cpu::resolve_num_threads(options);
  cpu::resolve_isa(options.isa);
  using cpu::detail::shifted;
  const std::int64_t total_q = sequences.total_queries();
  for (std::int64_t b = 0; b < sequences.count; ++b) {
    const std::int64_t q0 = sequences.query_offsets[b], k0 = sequences.kv_offsets[b];
    const std::int64_t length = sequences.kv_length(b), rows = sequences.query_count(b);
    const View<T> d_k = shifted(gradients.d_k, k0), d_v = shifted(gradients.d_v, k0);
    if (rows == 0) {
      cpu::detail::zero_view_rows(d_k, 0, length, heads.num_kv_heads, heads.head_dim);
      cpu::detail::zero_view_rows(d_v, 0, length, heads.num_kv_heads, heads.head_dim);
      continue;
    }
    cpu::detail::backward_range<T>(config, heads, length, sequences.query_begin(b), rows,
                                   shifted(q, q0), shifted(k, k0), shifted(v, k0), shifted(out, q0),
                                   lse + q0, total_q, shifted(d_out, q0),
                                   shifted(gradients.d_q, q0), d_k, d_v, options);
  }
}

// Backward of 4 (padded batch): d_q, d_k, d_v [B, N, ...] overwritten; rows at or past a length
// are written 0. lse [B, H, N] as forward returned it. Each element's valid rows are its whole
// sequence: the ordinary backward over its length.
template <class T>
void backward(const Config& config, const Shape& shape, const ValidLengths& valid,
              const Inputs<detail::identity_t<T>>& inputs,
              const Outputs<const detail::identity_t<T>>& forward_outputs,
              View<const detail::identity_t<T>> d_out, const Gradients<T>& gradients,
              const CpuOptions& options = {}) {
  cpu::detail::check_type<T>();
  const View<const T> q = inputs.q, k = inputs.k, v = inputs.v, out = forward_outputs.out;
  const lse_type_t<T>* const lse = forward_outputs.lse;
  validate_valid_lengths_backward(config, shape, valid, q, k, v, out, lse, d_out, gradients.d_q,
                                  gradients.d_k, gradients.d_v);
  cpu::resolve_num_threads(options);
  cpu::resolve_isa(options.isa);
  using cpu::detail::element;
  const HeadShape heads{shape.num_heads, shape.num_kv_heads, shape.head_dim};
  const std::int64_t N = shape.seq_len, dim = shape.head_dim;
  for (std::int64_t b = 0; b < shape.batch; ++b) {
    const std::int64_t length = valid.lengths[b];
    const View<T> d_q = element(gradients.d_q, b), d_k = element(gradients.d_k, b),
                  d_v = element(gradients.d_v, b);
    if (length > 0) {
      const lse_type_t<T>* lse_b = lse + b * shape.num_heads * N;
      cpu::detail::backward_range<T>(config, heads, length, 0, length, element(q, b), element(k, b),
                                     element(v, b), element(out, b), lse_b, N, element(d_out, b),
                                     d_q, d_k, d_v, options);
    }
    cpu::detail::zero_view_rows(d_q, length, N, shape.num_heads, dim);
    cpu::detail::zero_view_rows(d_k, length, N, shape.num_kv_heads, dim);
    cpu::detail::zero_view_rows(d_v, length, N, shape.num_kv_heads, dim);
  }
}

}  // namespace dilated_attention
