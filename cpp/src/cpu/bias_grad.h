// The rpb gradient of the vectorised backward ops: each query work item adds
// dS by relative position into its own partial (add_bias_grad), and the
// partials are summed in item order (store_bias_grad), so that the gradient
// is deterministic whatever the thread count.
// Included inside the per-instruction-set namespace and target region of
// fast_kernels_impl.h (LIBNA_SIMD_NS), like every header of the vectorised
// kernels.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/lane_windows.h"
#include "cpu/neighbour_rows.h"
#include "cpu/simd.h"

namespace libna::cpu::LIBNA_SIMD_NS {

using simd::f32x8;
using simd::kLanes;

inline float lane_sum(f32x8 x) {
  alignas(32) float lanes[kLanes];
  simd::store(lanes, x);
  float s = 0;
  for (int l = 0; l < kLanes; ++l) s += lanes[l];
  return s;
}

// bias_grad (one head of the rpb gradient, from the key row's offset
// `bias_offset` on) += one key row's dS summed by relative position: entry j
// is the 8 floats at ds + j * entry_stride, and every lane's entry j is at
// relative position first + j - i0 (entries outside a lane's window hold 0).
inline void add_bias_grad_row(const LaneWindows& w, std::int64_t bias_offset,
                              std::int64_t kernel, std::int64_t step, const float* ds,
                              std::int64_t entry_stride, float* bias_grad) {
  const std::int64_t rel0 = w.first - w.i0 + kernel - 1;
  const std::int64_t j_begin = std::max<std::int64_t>(0, -rel0);
  const std::int64_t j_end = std::min(w.window, 2 * kernel - 1 - rel0);
  float* head = bias_grad + bias_offset;
  for (std::int64_t j = j_begin; j < j_end; ++j) {
    head[(rel0 + j) * step] += lane_sum(simd::load(ds + j * entry_stride));
  }
}

// add_bias_grad_row over a block's key rows `rows`, ds[r][j][lane].
inline void add_bias_grad(const LaneWindows& w, const RowList& rows,
                          std::int64_t kernel, std::int64_t step,
                          const float* ds, float* bias_grad) {
  for (std::int64_t r = 0; r < rows.size; ++r) {
    add_bias_grad_row(w, rows.bias[r], kernel, step, ds + r * w.window * kLanes, kLanes,
                      bias_grad);
  }
}

// drpb = the sum of the query pass' per-item rpb-gradient partials (items
// numbered (b, h, ...) with items_per_head innermost), added in item order:
// deterministic.
template <typename T, int Rank>
void store_bias_grad(const BiasBuffer<Rank, float>& bias_layout, const float* partials,
                     std::int64_t items, std::int64_t items_per_head, const TensorView& drpb) {
  const std::int64_t per_head = bias_layout.strides[0];
  const std::int64_t heads = bias_layout.size / per_head;
  std::vector<float> grad(bias_layout.size, 0.0f);
  for (std::int64_t item = 0; item < items; ++item) {
    const float* partial = partials + item * per_head;
    float* head = grad.data() + ((item / items_per_head) % heads) * per_head;
    for (std::int64_t i = 0; i < per_head; ++i) head[i] += partial[i];
  }
  bias_layout.template store_to<T>(grad, drpb);
}

}  // namespace libna::cpu::LIBNA_SIMD_NS
