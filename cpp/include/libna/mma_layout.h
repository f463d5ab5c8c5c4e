// Where the operands of the tensor-core kernels (cuda/tc_forward.cuh) live:
// the register fragments of mma.sync.aligned.m16n8k16 (f16/bf16 inputs,
// f32 accumulators) and of ldmatrix.m8n8.x4 (plain and .trans) as the PTX
// ISA defines them, and the shared-memory and fragment addressing the kernel
// builds on them. Host/device code without CUDA headers: the host test
// tests/cpp/test_mma_layout.cpp simulates a warp (32 lanes of registers)
// through these very functions, because the kernels were written without a
// GPU to run them on.
//
// PTX ISA ("Matrix Fragments for mma.m16n8k16 with floating point type",
// "ldmatrix"), with groupID = lane >> 2 and threadID_in_group = lane % 4:
//   A, 16x16 row-major, elements a0..a7 (four .f16x2/.bf16x2 registers, low
//     half first): row = groupID for a0, a1, a4, a5, groupID + 8 otherwise;
//     col = threadID_in_group * 2 + (i & 1), plus 8 for i >= 4.
//   B, 16x8 (k x n) column-major, b0..b3 (two registers):
//     row = threadID_in_group * 2 + (i & 1), plus 8 for i >= 2; col = groupID.
//   C/D, 16x8 f32, c0..c3: row = groupID for c0, c1, groupID + 8 otherwise;
//     col = threadID_in_group * 2 + (i & 1).
//   ldmatrix.m8n8.x4.b16: lanes 8m..8m+7 give the addresses of rows 0..7 of
//     matrix m (16 contiguous, 16-byte aligned bytes each); register m of a
//     lane receives two elements of matrix m: row lane / 4, columns
//     2 * (lane % 4) + {0, 1}; with .trans, rows 2 * (lane % 4) + {0, 1},
//     column lane / 4.
#pragma once

#include "libna/window.h"  // LIBNA_HOST_DEVICE

namespace libna::mma {

inline constexpr int kWarpSize = 32;
inline constexpr int kM = 16, kN = 8, kK = 16;  // m16n8k16

// A (row, column) cell of a matrix.
struct Cell {
  int row, col;
};

LIBNA_HOST_DEVICE int group_id(int lane) { return lane >> 2; }
LIBNA_HOST_DEVICE int thread_in_group(int lane) { return lane & 3; }

// Element i (0..7) of the A fragment of `lane`: register i / 2, half i % 2.
LIBNA_HOST_DEVICE Cell a_cell(int lane, int i) {
  return {group_id(lane) + 8 * ((i >> 1) & 1), 2 * thread_in_group(lane) + (i & 1) + 8 * (i >> 2)};
}
// Element i (0..3) of the B fragment: (k, n).
LIBNA_HOST_DEVICE Cell b_cell(int lane, int i) {
  return {2 * thread_in_group(lane) + (i & 1) + 8 * (i >> 1), group_id(lane)};
}
// Element i (0..3) of the C/D fragment.
LIBNA_HOST_DEVICE Cell c_cell(int lane, int i) {
  return {group_id(lane) + 8 * (i >> 1), 2 * thread_in_group(lane) + (i & 1)};
}

// ldmatrix.m8n8.x4: the row of which matrix `lane` gives the address of.
struct MatrixRow {
  int matrix, row;
};
LIBNA_HOST_DEVICE MatrixRow ldmatrix_source(int lane) { return {lane >> 3, lane & 7}; }
// The cell of its matrix that half `h` of a lane's register holds.
LIBNA_HOST_DEVICE Cell ldmatrix_cell(int lane, int h, bool trans) {
  const Cell plain{lane >> 2, 2 * (lane & 3) + h};
  return trans ? Cell{plain.col, plain.row} : plain;
}

// A C fragment row belongs to one of a lane's two row halves: rows groupID
// (c0, c1) and groupID + 8 (c2, c3). Its 8-column slice is spread over the
// four lanes of a quad (same groupID); a butterfly over lane ^ 1, lane ^ 2
// (shuffle offsets quad_offset(0 .. kQuadSteps - 1)) combines a row's
// values across them.
LIBNA_HOST_DEVICE int c_half(int i) { return i >> 1; }
inline constexpr int kQuadSteps = 2;
LIBNA_HOST_DEVICE constexpr int quad_offset(int step) { return 1 << step; }

// ---- the tensor-core forward's operands --------------------------------------
// Q (16 query rows x head dims per warp) is loaded from global memory
// straight into A fragments (a_cell). K and V tiles sit in shared memory as
// [key][dim] rows of 16-bit elements, each row padded by 8 elements: the
// 16-byte row starts stay aligned for ldmatrix, and the rows of one 8x8
// matrix fall into distinct banks (row stride = 4 banks modulo 32 for the
// head-dim buckets 32, 64 and 128), so every ldmatrix phase is conflict-free.

LIBNA_HOST_DEVICE constexpr int smem_row_stride(int dim) { return dim + 8; }
LIBNA_HOST_DEVICE constexpr int smem_offset(int row, int col, int dim) {
  return row * smem_row_stride(dim) + col;
}

// S = Q K^T, head-dim chunk `chunk` (16 dims): the K cell (key, dim) whose
// address `lane` gives to ldmatrix.x4 (no .trans) so that its registers
// 0, 1 are b0b1, b2b3 of key n-tile 2 * key_pair and 2, 3 those of n-tile
// 2 * key_pair + 1 (B = K^T: k is the head dim, n the key).
LIBNA_HOST_DEVICE Cell k_ldmatrix_cell(int lane, int key_pair, int chunk) {
  const MatrixRow s = ldmatrix_source(lane);
  return {kK * key_pair + 8 * (s.matrix >> 1) + s.row, kK * chunk + 8 * (s.matrix & 1)};
}

// O += P V, key chunk `chunk` (16 keys): the V cell (key, dim) whose address
// `lane` gives to ldmatrix.x4.trans so that registers 0, 1 are b0b1, b2b3 of
// head-dim n-tile 2 * dim_pair and 2, 3 those of n-tile 2 * dim_pair + 1.
LIBNA_HOST_DEVICE Cell v_ldmatrix_cell(int lane, int chunk, int dim_pair) {
  const MatrixRow s = ldmatrix_source(lane);
  return {kK * chunk + 8 * (s.matrix & 1) + s.row, kK * dim_pair + 8 * (s.matrix >> 1)};
}

// The query slot (of the block's tiling::tc_forward_queries()) of row half
// `half` of `lane` in warp `warp`: each warp owns 16 consecutive slots.
LIBNA_HOST_DEVICE int query_slot(int warp, int lane, int half) {
  return kM * warp + group_id(lane) + 8 * half;
}

// P's A fragment for key chunk `chunk` comes from S's C fragments without
// leaving registers: element i is element `index` of key n-tile `tile`.
struct Source {
  int tile, index;
};
LIBNA_HOST_DEVICE Source p_source(int chunk, int i) {
  return {2 * chunk + (i >> 2), (i & 1) + 2 * ((i >> 1) & 1)};
}

}  // namespace libna::mma
