// The rows (positions of all but the last spatial axis) in a neighbourhood:
// the key rows a query row sees (key_rows_of) and the query rows that see a
// key row (query_rows_of, the inverse neighbourhood), each with its offset
// into the rpb and its slot in the unfused ops' layout. The lanes handle the
// last axis (lane_windows.h).
// Included inside the per-instruction-set namespace and target region of
// fast_kernels_impl.h (LIBNA_SIMD_NS), like every header of the vectorised
// kernels.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

#include "cpu/backward.h"
#include "cpu/kernels.h"

namespace libna::cpu::LIBNA_SIMD_NS {

// Rows (positions of the leading axes) seen by one position of the leading
// axes, with each one's offset into a contiguous rpb head.
// `slot` is the first slot of the (key row, query row) pair in the unfused
// ops' prod(kernel) layout: row-major over the key's per-axis positions in
// the query's window, times the last axis' kernel.
struct RowList {
  std::vector<std::int64_t> rows, bias, slot;
  std::int64_t size = 0;
};

// Fills `out` with the rows of a cartesian product over the leading axes:
// axis a offers count[a] choices, and choice t is {position, rpb index, the
// key's position in the query's window} = pick(a, t) along that axis.
template <int Rank, typename Pick>
void product_rows(const Geometry<Rank>& g, const std::int64_t* count, Pick pick,
                  const std::int64_t* bias_strides, RowList& out) {
  std::int64_t n = 1;
  for (int a = 0; a < Rank - 1; ++a) n *= count[a];
  out.size = n;
  out.rows.resize(n);
  out.bias.resize(n);
  out.slot.resize(n);
  std::int64_t t[Rank] = {};
  for (std::int64_t r = 0; r < n; ++r) {
    std::int64_t row = 0, bias = 0, slot = 0;
    for (int a = 0; a < Rank - 1; ++a) {
      const auto [position, rpb_index, window_index] = pick(a, t[a]);
      row = row * g.spatial[a] + position;
      bias += rpb_index * bias_strides[a + 1];
      slot = slot * g.axes[a].kernel + window_index;
    }
    out.rows[r] = row;
    out.bias[r] = bias;
    out.slot[r] = slot * g.axes[Rank - 1].kernel;
    for (int a = Rank - 2; a >= 0; --a) {
      if (++t[a] < count[a]) break;
      t[a] = 0;
    }
  }
}

// Queries' view: the key rows of query row `c`.
template <int Rank>
void key_rows_of(const Geometry<Rank>& g, const std::int64_t* c, const std::int64_t* bias_strides,
                 RowList& out) {
  AxisWindow w[Rank];
  std::int64_t count[Rank] = {};
  for (int a = 0; a < Rank - 1; ++a) {
    w[a] = axis_window(c[a], g.axes[a]);
    count[a] = w[a].count;
  }
  product_rows(
      g, count,
      [&](int a, std::int64_t t) {
        return std::array<std::int64_t, 3>{w[a].first + t * w[a].step, w[a].rpb_first + t, t};
      },
      bias_strides, out);
}

// Keys' view: the query rows that see key row `c`, with the rpb offset of
// the key in each one's window.
template <int Rank>
void query_rows_of(const Geometry<Rank>& g, const Tables<Rank>& tables, const std::int64_t* c,
                   const std::int64_t* bias_strides, RowList& out) {
  std::int64_t count[Rank] = {};
  for (int a = 0; a < Rank - 1; ++a) count[a] = tables.axis[a].query_count[c[a]];
  product_rows(
      g, count,
      [&](int a, std::int64_t t) {
        const AxisTable& table = tables.axis[a];
        const std::int64_t query = table.first_query[c[a]] + t * g.axes[a].dilation;
        const AxisWindow& w = table.window[query];
        const std::int64_t index = (c[a] - w.first) / w.step;
        return std::array<std::int64_t, 3>{query, w.rpb_first + index, index};
      },
      bias_strides, out);
}

// The key rows of a pair of query rows (pair_kernels.h): the union of both
// rows' key rows, in increasing order, with each one's index in either list
// (-1: that row does not see it). Both lists are in increasing order, as
// key_rows_of makes them.
struct RowUnion {
  RowList rows;  // rows.rows and rows.size only
  std::vector<std::int64_t> index_a, index_b;
};

inline void unite_rows(const RowList& a, const RowList& b, RowUnion& out) {
  out.rows.rows.clear();
  out.index_a.clear();
  out.index_b.clear();
  std::int64_t i = 0, j = 0;
  while (i < a.size || j < b.size) {
    const bool take_a = i < a.size && (j == b.size || a.rows[i] <= b.rows[j]);
    const bool take_b = j < b.size && (i == a.size || b.rows[j] <= a.rows[i]);
    out.rows.rows.push_back(take_a ? a.rows[i] : b.rows[j]);
    out.index_a.push_back(take_a ? i++ : -1);
    out.index_b.push_back(take_b ? j++ : -1);
  }
  out.rows.size = static_cast<std::int64_t>(out.rows.rows.size());
}

// The most query rows (positions of the leading axes) that see one key row.
template <int Rank>
std::int64_t inverse_window_rows(const Tables<Rank>& tables) {
  std::int64_t n = 1;
  for (int a = 0; a < Rank - 1; ++a) {
    const auto& count = tables.axis[a].query_count;
    n *= std::max<std::int64_t>(1, *std::max_element(count.begin(), count.end()));
  }
  return n;
}

}  // namespace libna::cpu::LIBNA_SIMD_NS
