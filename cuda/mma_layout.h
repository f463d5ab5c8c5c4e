// Where the operands of the tensor-core kernels (cuda/tc_forward.cuh,
// cuda/tc_backward.cuh) live:
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

// ---- operands in shared memory ---------------------------------------------------
// Tiles of K, V (and, in the backward, Q and dO) sit in shared memory as
// [row][dim] rows of 16-bit elements, each row padded by 8 elements: the
// 16-byte row starts stay aligned for ldmatrix, and the rows of one 8x8
// matrix fall into distinct banks (row stride = 4 banks modulo 32 for the
// head-dim buckets 32, 64 and 128), so every ldmatrix phase is conflict-free.

LIBNA_HOST_DEVICE constexpr int smem_row_stride(int dim) { return dim + 8; }
LIBNA_HOST_DEVICE constexpr int smem_offset(int row, int col, int dim) {
  return row * smem_row_stride(dim) + col;
}

// Three ways an operand reaches its fragments through ldmatrix.x4, for a
// matrix X stored as rows in shared memory. Each gives the cell (row, col)
// of X whose address `lane` hands to ldmatrix.
//
// A = X itself (rows 16 * m_tile .., columns 16 * chunk ..; no .trans):
// registers 0..3 are a0a1, a2a3, a4a5, a6a7.
LIBNA_HOST_DEVICE Cell a_ldmatrix_cell(int lane, int m_tile, int chunk) {
  const MatrixRow s = ldmatrix_source(lane);
  return {kM * m_tile + 8 * (s.matrix & 1) + s.row, kK * chunk + 8 * (s.matrix >> 1)};
}
// B = X^T, X stored [n][k] (K for S = Q K^T; V for dP = dO V^T; Q and dO for
// the key side's S^T = K Q^T and dP^T = V dO^T), k chunk `chunk` (no
// .trans): registers 0, 1 are b0b1, b2b3 of n-tile 2 * n_pair and 2, 3
// those of n-tile 2 * n_pair + 1.
LIBNA_HOST_DEVICE Cell b_ldmatrix_cell(int lane, int n_pair, int chunk) {
  const MatrixRow s = ldmatrix_source(lane);
  return {kK * n_pair + 8 * (s.matrix >> 1) + s.row, kK * chunk + 8 * (s.matrix & 1)};
}
// B = X, X stored [k][n] (V for O += P V; K for dQ += dS K; dO and Q for
// dV += P^T dO and dK += dS^T Q), k chunk `chunk` (.trans): registers 0, 1
// are b0b1, b2b3 of n-tile 2 * n_pair and 2, 3 those of n-tile 2 * n_pair + 1.
LIBNA_HOST_DEVICE Cell b_trans_ldmatrix_cell(int lane, int chunk, int n_pair) {
  const MatrixRow s = ldmatrix_source(lane);
  return {kK * chunk + 8 * (s.matrix & 1) + s.row, kK * n_pair + 8 * (s.matrix >> 1)};
}

// The row slot (of the block's 64 owned queries or keys) of row half `half`
// of `lane` in warp `warp`: each warp owns 16 consecutive slots (one m16
// tile).
LIBNA_HOST_DEVICE int row_slot(int warp, int lane, int half) {
  return kM * warp + group_id(lane) + 8 * half;
}

// An A fragment made from C fragments without leaving registers (P from S
// in the forward; dS from dP in dq; P^T and dS^T from S^T and dP^T in
// dk/dv): for k chunk `chunk`, element i is element `index` of n-tile
// `tile` of the accumulators.
struct Source {
  int tile, index;
};
LIBNA_HOST_DEVICE Source p_source(int chunk, int i) {
  return {2 * chunk + (i >> 2), (i & 1) + 2 * ((i >> 1) & 1)};
}

// ---- the products of the tensor-core kernels ---------------------------------------
// forward (cuda/tc_forward.cuh; a warp owns 16 query rows):
//   S  = Q K^T   A: Q from global memory (a_cell)   B: K (b_ldmatrix_cell)
//   O += P V     A: P from S (p_source)             B: V (b_trans_ldmatrix_cell)
// dq (cuda/tc_backward.cuh; a warp owns 16 query rows, the block's Q and dO
// rows sit in shared memory):
//   S  = Q K^T   A: Q (a_ldmatrix_cell)     B: K (b_ldmatrix_cell)
//   dP = dO V^T  A: dO (a_ldmatrix_cell)    B: V (b_ldmatrix_cell)
//   dQ += dS K   A: dS from dP (p_source)   B: K (b_trans_ldmatrix_cell)
//   D_i = dO_i . O_i over the cells of the lane's A fragments (a_cell) and a
//   quad sum.
// dk/dv (a warp owns 16 key rows): the transposed products are computed
// directly, so that P^T and dS^T are accumulators, never transposed through
// memory; the C fragment's columns are queries (lse and D per column):
//   S^T  = K Q^T   A: K (a_ldmatrix_cell)   B: Q (b_ldmatrix_cell)
//   dP^T = V dO^T  A: V (a_ldmatrix_cell)   B: dO (b_ldmatrix_cell)
//   dV += P^T dO   A: P^T (p_source)        B: dO (b_trans_ldmatrix_cell)
//   dK += dS^T Q   A: dS^T (p_source)       B: Q (b_trans_ldmatrix_cell)

}  // namespace libna::mma
