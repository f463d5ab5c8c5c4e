// The vectorised unfused forward ops, included after fast_forward_impl.h by
// fast_kernels_impl.h: na_qk (scores in the prod(kernel) slot layout) and
// na_av (their weighted sum of values), built from the fused forward's lane
// pieces. Both go through the lane layout [key row][window position][lane]
// and move entries to or from each query's slots one lane at a time.

namespace libna::cpu::LIBNA_SIMD_NS {

template <int Rank, typename T>
struct Unfused : LaneKernel<Rank, T> {
  using Base = LaneKernel<Rank, T>;
  using Base::g;
  using Base::k;
  using Base::v;

  struct Scratch {
    std::vector<float> lanes, values;  // [d][lane]; [row][window position][lane]
    RowList rows;
    std::vector<const float*> ptrs;
  };

  Unfused(const Geometry<Rank>& geometry, const ColumnLayout& columns, const Packed& packed_k,
          const Packed& packed_v, const NaParams& params, const TensorView* rpb)
      : Base(geometry, columns, packed_k, packed_v, params, rpb, 1.0) {}

  // Calls block(c, grp, w) for the lane blocks of one row, with s.rows
  // holding the row's key rows.
  template <typename Block>
  void for_blocks(std::int64_t row, Scratch& s, const Block& block) const {
    std::int64_t c[Rank];
    row_coords<Rank>(g, row, c);
    key_rows_of<Rank>(g, c, this->bias_strides, s.rows);
    const AxisParams& last = this->last();
    for (std::int64_t grp = 0; grp < last.dilation; ++grp) {
      const std::int64_t len = group_length(last.length, last.dilation, grp);
      for (std::int64_t i0 = 0; i0 < len; i0 += kLanes) {
        block(c, grp, query_lanes(last, len, i0, std::min<std::int64_t>(kLanes, len - i0)));
      }
    }
  }

  // Slot pointers of lane l: attn[b, c (lane positions), h, :].
  template <typename U>
  void slot_rows(const TensorView& attn, std::int64_t b, std::int64_t* c, std::int64_t h,
                 std::int64_t grp, const LaneWindows& w, U** rows) const {
    this->lane_tokens(attn, b, c, h, grp, w, rows);
  }

  LIBNA_SIMD_TARGET void qk_block(const detail::QkArgs& args, std::int64_t b, std::int64_t h,
                                  std::int64_t* c, std::int64_t grp, const LaneWindows& w,
                                  Scratch& s) const {
    const std::int64_t n_rows = s.rows.size, slots = args.params.window_size();
    s.lanes.resize(k.dim * kLanes);
    this->load_lanes(args.q, b, c, h, grp, w, 1.0f, s.lanes.data());
    s.values.resize(n_rows * w.window * kLanes);
    this->window_rows(k, b, h / this->heads_per_kv, grp, w, s.rows, s.ptrs);
    this->logits(s.lanes.data(), h, w, s.rows, s.ptrs.data(), s.values.data());

    T* attn[kLanes];
    slot_rows(args.attn, b, c, h, grp, w, attn);
    const std::int64_t stride = args.attn.strides[Rank + 2];
    const bool partial = n_rows * this->last().kernel < slots ||
                         std::any_of(w.count, w.count + w.lanes,
                                     [&](std::int64_t n) { return n < this->last().kernel; });
    for (std::int64_t l = 0; l < w.lanes; ++l) {
      if (partial) {  // a causal window near the start: unfilled slots hold -inf
        for (std::int64_t t = 0; t < slots; ++t) {
          store<T, float>(attn[l] + t * stride, -std::numeric_limits<float>::infinity());
        }
      }
      const std::int64_t j0 = w.lo[l] - l - w.first;
      for (std::int64_t r = 0; r < n_rows; ++r) {
        const float* src = s.values.data() + (r * w.window + j0) * kLanes + l;
        T* dst = attn[l] + s.rows.slot[r] * stride;
        for (std::int64_t t = 0; t < w.count[l]; ++t) {
          store<T, float>(dst + t * stride, src[t * kLanes]);
        }
      }
    }
  }

  LIBNA_SIMD_TARGET void av_block(const detail::AvArgs& args, std::int64_t b, std::int64_t h,
                                  std::int64_t* c, std::int64_t grp, const LaneWindows& w,
                                  Scratch& s) const {
    const std::int64_t n_rows = s.rows.size;
    s.values.assign(n_rows * w.window * kLanes, 0.0f);
    const T* attn[kLanes];
    slot_rows(args.attn, b, c, h, grp, w, attn);
    const std::int64_t stride = args.attn.strides[Rank + 2];
    for (std::int64_t l = 0; l < w.lanes; ++l) {
      const std::int64_t j0 = w.lo[l] - l - w.first;
      for (std::int64_t r = 0; r < n_rows; ++r) {
        float* dst = s.values.data() + (r * w.window + j0) * kLanes + l;
        const T* src = attn[l] + s.rows.slot[r] * stride;
        for (std::int64_t t = 0; t < w.count[l]; ++t) dst[t * kLanes] = load<float>(src + t * stride);
      }
    }
    this->window_rows(v, b, h / this->heads_per_kv, grp, w, s.rows, s.ptrs);
    s.lanes.resize(v.dim * kLanes);
    pv_range(s.values.data(), s.ptrs.data(), n_rows, w.window, this->layout.width, v.dim,
             s.lanes.data());
    this->store_lanes(args.out, b, c, h, grp, w, simd::splat(1.0f), s.lanes.data());
  }
};

// Runs fn(b, h, row) over every (batch, head, row), rows innermost.
template <typename Fn>
void for_rows(std::int64_t batch, std::int64_t heads, std::int64_t rows, const Fn& fn) {
  parallel_for(batch * heads * rows, 1, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t item = begin; item < end; ++item) {
      fn(item / (rows * heads), (item / rows) % heads, item % rows);
    }
  });
}

template <int Rank, typename T>
void na_qk(const detail::QkArgs& args) {
  const Geometry<Rank> g(args.q, args.params);
  const ColumnLayout layout(g);
  float* buffer =
      workspace(layout.packed_size(g.batch, args.k.shape[Rank + 1], args.k.shape[Rank + 2]));
  const Packed k = pack<Rank, T>(args.k, g, layout, 1.0f, buffer);
  const Unfused<Rank, T> op(g, layout, k, k, args.params, args.rpb);
  for_rows(g.batch, g.heads, layout.rows, [&](std::int64_t b, std::int64_t h, std::int64_t row) {
    thread_local typename Unfused<Rank, T>::Scratch s;
    op.for_blocks(row, s, [&](std::int64_t* c, std::int64_t grp, const LaneWindows& w) {
      op.qk_block(args, b, h, c, grp, w, s);
    });
  });
}

template <int Rank, typename T>
void na_av(const detail::AvArgs& args) {
  const Geometry<Rank> g(args.attn, args.params);
  const ColumnLayout layout(g);
  float* buffer =
      workspace(layout.packed_size(g.batch, args.v.shape[Rank + 1], args.v.shape[Rank + 2]));
  const Packed v = pack<Rank, T>(args.v, g, layout, 1.0f, buffer);
  const Unfused<Rank, T> op(g, layout, v, v, args.params, nullptr);
  for_rows(g.batch, g.heads, layout.rows, [&](std::int64_t b, std::int64_t h, std::int64_t row) {
    thread_local typename Unfused<Rank, T>::Scratch s;
    op.for_blocks(row, s, [&](std::int64_t* c, std::int64_t grp, const LaneWindows& w) {
      op.av_block(args, b, h, c, grp, w, s);
    });
  });
}

}  // namespace libna::cpu::LIBNA_SIMD_NS
