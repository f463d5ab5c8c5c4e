// CPU kernels of attention composition: dense attention over additional keys
// (forward, and backward from the merged attention's out/lse) and the exact
// log-sum-exp merge of partial attentions. Plain loops with float32
// accumulation (float64 for float64): additional keys are few compared with
// the neighbourhood work, so these are not vectorised.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "backend.h"
#include "dispatch.h"
#include "cpu/tuning.h"
#include "thread_pool.h"

namespace libna::cpu {
namespace {

using detail::acc_t;
using detail::load;
using detail::store;
using detail::backward_lse;
using detail::softmax_lse;
using detail::softmax_normaliser;
using detail::softmax_shift;

// Element offset of item `index` of the row-major enumeration of dimensions
// [first, first + count) of t.
std::int64_t offset_of(const TensorView& t, int first, int count, std::int64_t index) {
  std::int64_t offset = 0;
  for (int d = first + count - 1; d >= first; --d) {
    offset += (index % t.shape[d]) * t.strides[d];
    index /= t.shape[d];
  }
  return offset;
}

std::int64_t product(const TensorView& t, int first, int count) {
  std::int64_t n = 1;
  for (int d = first; d < first + count; ++d) n *= t.shape[d];
  return n;
}

// A strided vector of `n` elements of type T read into accumulator precision.
template <typename T, typename Acc>
void load_row(const T* p, std::int64_t stride, std::int64_t n, Acc* into) {
  for (std::int64_t i = 0; i < n; ++i) into[i] = load<Acc>(p + i * stride);
}

template <typename Acc>
Acc dot(const Acc* a, const Acc* b, std::int64_t n) {
  Acc s = 0;
  for (std::int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Query rows [b, position, head] of q-shaped tensors of spatial rank `rank`.
struct QueryRows {
  int rank;
  std::int64_t positions, heads, batch;
  std::int64_t count() const { return batch * positions * heads; }
  struct Row {
    std::int64_t b, h;
    std::int64_t position;
  };
  Row row(std::int64_t r) const {
    return Row{r / (positions * heads), r % heads, (r / heads) % positions};
  }
  // Offset of [b, position, h, 0] in a q-shaped tensor t.
  std::int64_t offset(const TensorView& t, const Row& r) const {
    return r.b * t.strides[0] + offset_of(t, 1, rank, r.position) + r.h * t.strides[rank + 1];
  }
};

// Offset of [b, j, kv_head, 0] in an additional keys/values tensor.
std::int64_t key_offset(const TensorView& t, std::int64_t b, std::int64_t j, std::int64_t kvh) {
  return b * t.strides[0] + j * t.strides[1] + kvh * t.strides[2];
}

QueryRows query_rows(const TensorView& q, int rank) {
  return QueryRows{rank, product(q, 1, rank), q.shape[rank + 1], q.shape[0]};
}

// The log-sum-exp of a merge of `n` parts with log-sum-exps `parts`; -inf
// when every part is -inf (no keys), or when a part is +inf or NaN.
template <typename Acc>
Acc merged_lse(const Acc* parts, std::size_t n) {
  Acc max = -std::numeric_limits<Acc>::infinity();
  for (std::size_t i = 0; i < n; ++i) max = std::max(max, parts[i]);
  Acc sum = 0;
  if (!(std::isinf(max) && max < 0)) {
    for (std::size_t i = 0; i < n; ++i) sum += std::exp(parts[i] - max);
  }
  return sum > 0 ? max + std::log(sum) : -std::numeric_limits<Acc>::infinity();
}

// Weight of a part with log-sum-exp `part` in a merge whose total is `total`
// (a part of weight 0 is not read: its out may be anything).
template <typename Acc>
Acc merge_weight(Acc part, Acc total) {
  return std::isinf(total) && total < 0 ? Acc(0) : std::exp(part - total);
}

template <typename T>
void additional_forward(const detail::AdditionalArgs& a) {
  using Acc = acc_t<T>;
  const int n = a.rank;
  const QueryRows rows = query_rows(a.q, n);
  const std::int64_t keys = a.k.shape[1], dim = a.q.shape[n + 2], dim_v = a.v.shape[3];
  const std::int64_t group = rows.heads / a.k.shape[2];
  const T* q = static_cast<const T*>(a.q.data);
  const T* k = static_cast<const T*>(a.k.data);
  const T* v = static_cast<const T*>(a.v.data);
  T* out = static_cast<T*>(a.out.data);
  parallel_for(rows.count(), tuning::kAdditionalRowsPerTask, [&](std::int64_t begin, std::int64_t end) {
    std::vector<Acc> qrow(dim), krow(dim), logits(keys), acc(dim_v);
    for (std::int64_t r = begin; r < end; ++r) {
      const auto row = rows.row(r);
      const std::int64_t kvh = row.h / group;
      load_row(q + rows.offset(a.q, row), a.q.strides[n + 2], dim, qrow.data());
      Acc max = -std::numeric_limits<Acc>::infinity();
      for (std::int64_t j = 0; j < keys; ++j) {
        load_row(k + key_offset(a.k, row.b, j, kvh), a.k.strides[3], dim, krow.data());
        logits[j] = static_cast<Acc>(a.scale) * dot(qrow.data(), krow.data(), dim);
        max = std::max(max, logits[j]);
      }
      Acc sum = 0;
      std::fill(acc.begin(), acc.end(), Acc(0));
      const Acc shift = softmax_shift(max);
      for (std::int64_t j = 0; j < keys; ++j) {
        const Acc p = std::exp(logits[j] - shift);
        sum += p;
        const T* vj = v + key_offset(a.v, row.b, j, kvh);
        for (std::int64_t e = 0; e < dim_v; ++e) acc[e] += p * load<Acc>(vj + e * a.v.strides[3]);
      }
      T* o = out + rows.offset(a.out, row);
      const std::int64_t os = a.out.strides[n + 2];
      Acc* lse = a.lse == nullptr ? nullptr
                                  : static_cast<Acc*>(a.lse->data) + row.b * a.lse->strides[0] +
                                        offset_of(*a.lse, 1, n, row.position) +
                                        row.h * a.lse->strides[n + 1];
      const Acc normaliser = softmax_normaliser(sum);
      Acc part_lse = softmax_lse(max, sum);
      if (a.merge) {  // out, lse hold another part of these rows: combine the two
        const Acc parts[2] = {*lse, part_lse};
        const Acc total = merged_lse(parts, 2);
        const Acc w_other = merge_weight(parts[0], total), w_part = merge_weight(part_lse, total);
        for (std::int64_t e = 0; e < dim_v; ++e) {
          const Acc previous = w_other == 0 ? Acc(0) : w_other * load<Acc>(o + e * os);
          const Acc mine = w_part == 0 ? Acc(0) : w_part * acc[e] * normaliser;
          store<T, Acc>(o + e * os, previous + mine);
        }
        part_lse = total;
      } else {
        for (std::int64_t e = 0; e < dim_v; ++e) store<T, Acc>(o + e * os, acc[e] * normaliser);
      }
      if (lse != nullptr) *lse = part_lse;
    }
  });
}

template <typename T>
void additional_backward(const detail::AdditionalBackwardArgs& a) {
  using Acc = acc_t<T>;
  const int n = a.rank;
  const QueryRows rows = query_rows(a.q, n);
  const std::int64_t keys = a.k.shape[1], dim = a.q.shape[n + 2], dim_v = a.v.shape[3];
  const std::int64_t heads_kv = a.k.shape[2], group = rows.heads / heads_kv;
  const Acc scale = static_cast<Acc>(a.scale);
  const T* q = static_cast<const T*>(a.q.data);
  const T* k = static_cast<const T*>(a.k.data);
  const T* v = static_cast<const T*>(a.v.data);
  const T* out = static_cast<const T*>(a.out.data);
  const T* dout = static_cast<const T*>(a.dout.data);
  const Acc* lse = static_cast<const Acc*>(a.lse.data);
  auto lse_of = [&](const QueryRows::Row& row) {
    return backward_lse(load<Acc>(lse + row.b * a.lse.strides[0] + offset_of(a.lse, 1, n, row.position) +
                                  row.h * a.lse.strides[n + 1]));
  };

  // Row term D = dout . out of the merged attention, one per query row.
  std::vector<Acc> row_term(static_cast<std::size_t>(rows.count()));
  // Query pass: dq = scale * sum_j dS_j k_j, dS_j = P_j (dout . v_j - D).
  parallel_for(rows.count(), tuning::kAdditionalRowsPerTask, [&](std::int64_t begin, std::int64_t end) {
    std::vector<Acc> qrow(dim), krow(dim), vrow(dim_v), dorow(dim_v), orow(dim_v), dq(dim);
    for (std::int64_t r = begin; r < end; ++r) {
      const auto row = rows.row(r);
      const std::int64_t kvh = row.h / group;
      load_row(q + rows.offset(a.q, row), a.q.strides[n + 2], dim, qrow.data());
      load_row(dout + rows.offset(a.dout, row), a.dout.strides[n + 2], dim_v, dorow.data());
      load_row(out + rows.offset(a.out, row), a.out.strides[n + 2], dim_v, orow.data());
      Acc d = dot(dorow.data(), orow.data(), dim_v);
      if (a.dlse != nullptr) {  // the lse gradient enters the row term
        d -= load<Acc>(static_cast<const Acc*>(a.dlse->data) + row.b * a.dlse->strides[0] +
                       offset_of(*a.dlse, 1, n, row.position) + row.h * a.dlse->strides[n + 1]);
      }
      row_term[r] = d;
      const Acc l = lse_of(row);
      std::fill(dq.begin(), dq.end(), Acc(0));
      for (std::int64_t j = 0; j < keys; ++j) {
        load_row(k + key_offset(a.k, row.b, j, kvh), a.k.strides[3], dim, krow.data());
        load_row(v + key_offset(a.v, row.b, j, kvh), a.v.strides[3], dim_v, vrow.data());
        const Acc p = std::exp(scale * dot(qrow.data(), krow.data(), dim) - l);
        const Acc ds = p * (dot(dorow.data(), vrow.data(), dim_v) - d);
        for (std::int64_t e = 0; e < dim; ++e) dq[e] += ds * krow[e];
      }
      T* dst = static_cast<T*>(a.dq.data) + rows.offset(a.dq, row);
      const std::int64_t ds = a.dq.strides[n + 2];
      for (std::int64_t e = 0; e < dim; ++e) {
        const Acc previous = a.accumulate_dq ? load<Acc>(dst + e * ds) : Acc(0);
        store<T, Acc>(dst + e * ds, previous + scale * dq[e]);
      }
    }
  });

  // Key pass, one (b, kv head, key) at a time over every query row that reads
  // it: dk_j = scale * sum dS_j q, dv_j = sum P_j dout. Deterministic order.
  const std::int64_t batch = a.q.shape[0];
  parallel_for(batch * heads_kv * keys, 1, [&](std::int64_t begin, std::int64_t end) {
    std::vector<Acc> qrow(dim), krow(dim), vrow(dim_v), dorow(dim_v), dk(dim), dv(dim_v);
    for (std::int64_t item = begin; item < end; ++item) {
      const std::int64_t j = item % keys, kvh = (item / keys) % heads_kv,
                         b = item / (keys * heads_kv);
      load_row(k + key_offset(a.k, b, j, kvh), a.k.strides[3], dim, krow.data());
      load_row(v + key_offset(a.v, b, j, kvh), a.v.strides[3], dim_v, vrow.data());
      std::fill(dk.begin(), dk.end(), Acc(0));
      std::fill(dv.begin(), dv.end(), Acc(0));
      for (std::int64_t position = 0; position < rows.positions; ++position) {
        for (std::int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
          const QueryRows::Row row{b, h, position};
          load_row(q + rows.offset(a.q, row), a.q.strides[n + 2], dim, qrow.data());
          load_row(dout + rows.offset(a.dout, row), a.dout.strides[n + 2], dim_v, dorow.data());
          const Acc p = std::exp(scale * dot(qrow.data(), krow.data(), dim) - lse_of(row));
          const Acc d = row_term[(b * rows.positions + position) * rows.heads + h];
          const Acc ds = p * (dot(dorow.data(), vrow.data(), dim_v) - d);
          for (std::int64_t e = 0; e < dim; ++e) dk[e] += ds * qrow[e];
          for (std::int64_t e = 0; e < dim_v; ++e) dv[e] += p * dorow[e];
        }
      }
      T* dk_dst = static_cast<T*>(a.dk.data) + key_offset(a.dk, b, j, kvh);
      T* dv_dst = static_cast<T*>(a.dv.data) + key_offset(a.dv, b, j, kvh);
      for (std::int64_t e = 0; e < dim; ++e) store<T, Acc>(dk_dst + e * a.dk.strides[3], scale * dk[e]);
      for (std::int64_t e = 0; e < dim_v; ++e) store<T, Acc>(dv_dst + e * a.dv.strides[3], dv[e]);
    }
  });
}

template <typename T>
void merge(const detail::MergeArgs& a) {
  using Acc = acc_t<T>;
  const TensorView& first = a.outs[0];
  const int rows_ndim = first.ndim - 1;
  const std::int64_t rows = product(first, 0, rows_ndim), dim_v = first.shape[rows_ndim];
  const std::size_t parts = a.outs.size();
  parallel_for(rows, tuning::kMergeRowsPerTask, [&](std::int64_t begin, std::int64_t end) {
    std::vector<Acc> part_lse(parts), acc(dim_v);
    for (std::int64_t r = begin; r < end; ++r) {
      for (std::size_t i = 0; i < parts; ++i) {
        part_lse[i] = load<Acc>(static_cast<const Acc*>(a.lses[i].data) + offset_of(a.lses[i], 0, rows_ndim, r));
      }
      const Acc total = merged_lse(part_lse.data(), parts);
      std::fill(acc.begin(), acc.end(), Acc(0));
      for (std::size_t i = 0; i < parts; ++i) {
        const Acc w = merge_weight(part_lse[i], total);
        if (w == 0) continue;
        const T* o = static_cast<const T*>(a.outs[i].data) + offset_of(a.outs[i], 0, rows_ndim, r);
        for (std::int64_t e = 0; e < dim_v; ++e) {
          acc[e] += w * load<Acc>(o + e * a.outs[i].strides[rows_ndim]);
        }
      }
      T* o = static_cast<T*>(a.out.data) + offset_of(a.out, 0, rows_ndim, r);
      for (std::int64_t e = 0; e < dim_v; ++e) store<T, Acc>(o + e * a.out.strides[rows_ndim], acc[e]);
      static_cast<Acc*>(a.lse.data)[offset_of(a.lse, 0, rows_ndim, r)] = total;
    }
  });
}

template <typename T>
void merge_backward(const detail::MergeBackwardArgs& a) {
  using Acc = acc_t<T>;
  const TensorView& first = a.outs[0];
  const int rows_ndim = first.ndim - 1;
  const std::int64_t rows = product(first, 0, rows_ndim), dim_v = first.shape[rows_ndim];
  parallel_for(rows, tuning::kMergeRowsPerTask, [&](std::int64_t begin, std::int64_t end) {
    std::vector<Acc> dorow(dim_v), orow(dim_v);
    for (std::int64_t r = begin; r < end; ++r) {
      const Acc total = load<Acc>(static_cast<const Acc*>(a.lse.data) + offset_of(a.lse, 0, rows_ndim, r));
      const Acc dlse = a.dlse == nullptr
                           ? Acc(0)
                           : load<Acc>(static_cast<const Acc*>(a.dlse->data) + offset_of(*a.dlse, 0, rows_ndim, r));
      load_row(static_cast<const T*>(a.dout.data) + offset_of(a.dout, 0, rows_ndim, r),
               a.dout.strides[rows_ndim], dim_v, dorow.data());
      load_row(static_cast<const T*>(a.out.data) + offset_of(a.out, 0, rows_ndim, r),
               a.out.strides[rows_ndim], dim_v, orow.data());
      const Acc dout_dot_out = dot(dorow.data(), orow.data(), dim_v);
      for (std::size_t i = 0; i < a.outs.size(); ++i) {
        const Acc part = load<Acc>(static_cast<const Acc*>(a.lses[i].data) + offset_of(a.lses[i], 0, rows_ndim, r));
        const Acc w = merge_weight(part, total);
        const T* o = static_cast<const T*>(a.outs[i].data) + offset_of(a.outs[i], 0, rows_ndim, r);
        T* dst = static_cast<T*>(a.douts[i].data) + offset_of(a.douts[i], 0, rows_ndim, r);
        Acc dout_dot_part = 0;
        for (std::int64_t e = 0; e < dim_v; ++e) {
          dout_dot_part += dorow[e] * load<Acc>(o + e * a.outs[i].strides[rows_ndim]);
          store<T, Acc>(dst + e * a.douts[i].strides[rows_ndim], w * dorow[e]);
        }
        static_cast<Acc*>(a.dlses[i].data)[offset_of(a.dlses[i], 0, rows_ndim, r)] =
            w * (dout_dot_part - dout_dot_out + dlse);
      }
    }
  });
}

}  // namespace

void na_additional_forward(const detail::AdditionalArgs& args) {
  detail::dispatch_float_types(args.q.dtype, "na_additional_forward", [&](auto tag) {
    additional_forward<typename decltype(tag)::type>(args);
  });
}

void na_additional_backward(const detail::AdditionalBackwardArgs& args) {
  detail::dispatch_float_types(args.q.dtype, "na_additional_backward", [&](auto tag) {
    additional_backward<typename decltype(tag)::type>(args);
  });
}

void merge_attentions(const detail::MergeArgs& args) {
  detail::dispatch_float_types(args.outs[0].dtype, "merge_attentions", [&](auto tag) {
    merge<typename decltype(tag)::type>(args);
  });
}

void merge_attentions_backward(const detail::MergeBackwardArgs& args) {
  detail::dispatch_float_types(args.outs[0].dtype, "merge_attentions_backward", [&](auto tag) {
    merge_backward<typename decltype(tag)::type>(args);
  });
}

}  // namespace libna::cpu
