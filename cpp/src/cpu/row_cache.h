// A thread's cache of packed rows: the fused kernels pack the rows their work
// items read into it, on demand, instead of packing whole tensors.
// Included inside the per-instruction-set namespace and target region of
// fast_kernels_impl.h (LIBNA_SIMD_NS), like every header of the vectorised
// kernels.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <vector>

#include "cpu/neighbour_rows.h"
#include "cpu/packed_layout.h"
#include "cpu/thread_scratch.h"

namespace libna::cpu::LIBNA_SIMD_NS {

// A thread's most recently used packed rows. The fused kernels pack the
// rows they read here, on demand and only the columns the current tile reads,
// instead of into a full-size copy of the tensor: a thread walks down the
// rows of one tile and consecutive query rows share all but a few key rows,
// so a row is packed once per tile and stays in the thread's cache, and the
// packed copy never travels to memory and back. get() pins a row until the
// next next_item(): a row's whole window stays valid while it is in use.
class RowCache {
 public:
  // Forgets every row (a new call, or a new chunk of items) and makes room
  // for `capacity` rows of `dim` channels of `stride` floats.
  void reset(std::int64_t capacity, std::int64_t dim, std::int64_t stride) {
    row_floats_ = dim * stride;
    stride_ = stride;
    data_ = memory_.reserve(capacity * row_floats_);  // only the packed columns are touched
    // Entries are taken in order, so the used ones are a prefix: a reset
    // only forgets how long it is (a small call resets once per thread, and
    // clearing every entry cost as much as its kernel's set-up).
    entries_.resize(capacity);
    hints_.resize(capacity);
    used_ = 0;
    stamp_ = 1;
  }
  void next_item() { ++stamp_; }

  // Row r of (b, h) with tile `tile`'s columns `cols` packed from `source`;
  // *finite (if given) becomes false unless all of them are finite.
  template <typename Source>
  const float* get(const Source& source, std::int64_t b, std::int64_t h, std::int64_t r,
                   std::int64_t tile, const ColumnRanges& cols, bool* finite = nullptr) {
    // Where row r went last: consecutive items ask for mostly the same rows,
    // so this usually finds it without a search.
    // (No entries: the search below finds no victim and says so.)
    std::int64_t* hint = nullptr;
    if (!hints_.empty()) {
      hint = &hints_[static_cast<std::size_t>(r) % hints_.size()];
      if (*hint < used_) {  // (a hint from before the last reset may point past them)
        Entry& e = entries_[static_cast<std::size_t>(*hint)];
        if (e.b == b && e.h == h && e.r == r && e.tile == tile) {
          e.stamp = stamp_;
          if (finite) *finite = *finite && e.finite;
          return e.row;
        }
      }
    }
    // The row, or the least recently used entry not pinned by this item; an
    // entry never used is older than all (the first of them: used ones stay
    // a prefix).
    Entry* victim = nullptr;
    for (Entry* e = entries_.data(); e != entries_.data() + used_; ++e) {
      if (e->b == b && e->h == h && e->r == r && e->tile == tile) {
        e->stamp = stamp_;
        if (finite) *finite = *finite && e->finite;
        *hint = e - entries_.data();
        return e->row;
      }
      if (e->stamp < stamp_ && (!victim || e->stamp < victim->stamp)) victim = e;
    }
    if (used_ < static_cast<std::int64_t>(entries_.size())) victim = &entries_[used_++];
    if (!victim) throw std::logic_error("libna: RowCache is smaller than one item's rows");
    if (cols.span(source.layout()) > stride_) {
      throw std::logic_error("libna: a packed row is wider than its RowCache's stride");
    }
    float* memory = data_ + (victim - entries_.data()) * row_floats_;
    bool row_finite = true;
    float* row = source.pack_columns(b, h, r, cols, memory, stride_, &row_finite);
    *victim = Entry{b, h, r, tile, stamp_, row, row_finite};
    *hint = victim - entries_.data();
    if (finite) *finite = *finite && row_finite;
    return row;
  }

 private:
  struct Entry {
    std::int64_t b = -1, h = -1, r = -1, tile = -1, stamp = 0;
    float* row = nullptr;  // as pack_columns returns it
    bool finite = true;    // no inf or NaN in its packed columns
  };

  GrowingBuffer memory_;
  float* data_ = nullptr;
  std::int64_t row_floats_ = 0, stride_ = 0, stamp_ = 1;
  std::int64_t used_ = 0;  // entries_[0, used_) hold rows packed since the last reset
  std::vector<Entry> entries_;
  std::vector<std::int64_t> hints_;  // by r % capacity: an entry index, maybe stale
};

// A thread's packed rows in the fused kernels: caches for the rows its lanes
// sit in (one row at a time) and for the window rows (`window_capacity`
// rows: more than a window, so that consecutive items reuse the rows they
// share; no more than needed, each cached row takes room in L2).
struct RowCaches {
  RowCache own_a, own_b, window_a, window_b;
  std::vector<const float*> bases_a, bases_b;  // the current item's window rows
  // Whether the current item's window rows are all finite: blocks then skip
  // masking the values outside each lane's window (pv_range).
  bool window_finite_a = true, window_finite_b = true;

  // (stride: of the packed rows, LaneKernel::row_stride; own_capacity: the
  // rows an item's lanes sit in, two for a row pair.)
  void reset(std::int64_t window_capacity, std::int64_t dim_a, std::int64_t dim_b,
             std::int64_t stride, std::int64_t own_capacity = 1) {
    own_a.reset(own_capacity, dim_a, stride);
    own_b.reset(own_capacity, dim_b, stride);
    window_a.reset(window_capacity, dim_a, stride);
    window_b.reset(window_capacity, dim_b, stride);
  }
  void next_item() {
    own_a.next_item();
    own_b.next_item();
    window_a.next_item();
    window_b.next_item();
    window_finite_a = window_finite_b = true;
  }

  // Loads the window rows `rows` of head h from sources a and b (tile t,
  // columns cols) into bases_a/bases_b at index slot * rows.size on; the
  // bases end there (fill slots 0, 1, ... in order).
  template <typename SourceA, typename SourceB>
  void load_window(const SourceA& a, const SourceB& b, std::int64_t batch, std::int64_t h,
                   const RowList& rows, std::int64_t t, const ColumnRanges& cols,
                   std::int64_t slot = 0) {
    bases_a.resize((slot + 1) * rows.size);
    bases_b.resize((slot + 1) * rows.size);
    for (std::int64_t r = 0; r < rows.size; ++r) {
      bases_a[slot * rows.size + r] = window_a.get(a, batch, h, rows.rows[r], t, cols, &window_finite_a);
      bases_b[slot * rows.size + r] = window_b.get(b, batch, h, rows.rows[r], t, cols, &window_finite_b);
    }
  }
};

}  // namespace libna::cpu::LIBNA_SIMD_NS
