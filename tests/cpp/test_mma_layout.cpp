// Host test of the tensor-core forward's fragment and shared-memory
// addressing (libna/mma_layout.h), which cannot run on a GPU here:
//   - the header's m16n8k16 and ldmatrix layouts against the PTX ISA's,
//     written again below in inverse form (which lane and element holds a
//     cell), so that each layout is also checked to be a bijection;
//   - a simulated warp (32 lanes of registers) runs the kernel's steps with
//     those functions: Q A-fragments from memory, K through ldmatrix.x4,
//     m16n8k16 products into S, the online softmax with quad butterflies
//     over the rows' lanes, P taken from S's accumulators, V through
//     ldmatrix.x4.trans, O, the row sums and lse; S, the running row maxima,
//     O and lse must equal plain matrix arithmetic;
//   - shared-memory addressing: in bounds, one offset per (key, dim), 16-byte
//     aligned ldmatrix rows and vector stores, no bank conflict in any
//     ldmatrix phase.
// Prints "<name>: ok" per part and a summary; exits non-zero on any failure.
#include <libna/mma_layout.h>
#include <libna/tiling.h>

#include "check.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace {

namespace mma = libna::mma;
namespace tl = libna::tiling;

using namespace libna_test;

constexpr int kLanes = mma::kWarpSize;
constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// ---- the PTX ISA layouts, inverted: who holds cell (row, col) ----------------
struct Owner {
  int lane, element;
};
Owner ptx_a_owner(int row, int col) {  // A 16x16: a0..a7
  return {(row % 8) * 4 + (col % 8) / 2, col % 2 + 2 * (row / 8) + 4 * (col / 8)};
}
Owner ptx_b_owner(int k, int n) {  // B 16x8: b0..b3
  return {n * 4 + (k % 8) / 2, k % 2 + 2 * (k / 8)};
}
Owner ptx_c_owner(int row, int col) {  // C 16x8: c0..c3
  return {(row % 8) * 4 + col / 2, col % 2 + 2 * (row / 8)};
}
Owner ptx_ldmatrix_owner(int row, int col, bool trans) {  // 8x8: (lane, half)
  return trans ? Owner{col * 4 + row / 2, row % 2} : Owner{row * 4 + col / 2, col % 2};
}

void check_fragment_layouts() {
  g_case = "fragment layouts";
  bool ok = true;
  for (int lane = 0; lane < kLanes; ++lane) {
    for (int i = 0; i < 8; ++i) {
      const mma::Cell a = mma::a_cell(lane, i);
      const Owner o = ptx_a_owner(a.row, a.col);
      ok = ok && a.row >= 0 && a.row < 16 && a.col >= 0 && a.col < 16 && o.lane == lane &&
           o.element == i;
    }
    for (int i = 0; i < 4; ++i) {
      const mma::Cell bc = mma::b_cell(lane, i);
      const Owner ob = ptx_b_owner(bc.row, bc.col);
      ok = ok && bc.row >= 0 && bc.row < 16 && bc.col >= 0 && bc.col < 8 && ob.lane == lane &&
           ob.element == i;
      const mma::Cell c = mma::c_cell(lane, i);
      const Owner oc = ptx_c_owner(c.row, c.col);
      ok = ok && c.row >= 0 && c.row < 16 && c.col >= 0 && c.col < 8 && oc.lane == lane &&
           oc.element == i;
      // The kernel's row bookkeeping: c_half picks row groupID or groupID + 8.
      ok = ok && c.row == mma::group_id(lane) + 8 * mma::c_half(i);
    }
    for (int i = 0; i < 8; ++i) {  // Q rows: a_cell's row half, same groupID
      const mma::Cell a = mma::a_cell(lane, i);
      ok = ok && a.row - 8 * (a.row >> 3) == mma::group_id(lane);
    }
    for (int h = 0; h < 2; ++h) {
      for (bool trans : {false, true}) {
        const mma::Cell c = mma::ldmatrix_cell(lane, h, trans);
        const Owner o = ptx_ldmatrix_owner(c.row, c.col, trans);
        ok = ok && c.row >= 0 && c.row < 8 && c.col >= 0 && c.col < 8 && o.lane == lane &&
             o.element == h;
      }
    }
    const mma::MatrixRow s = mma::ldmatrix_source(lane);
    ok = ok && s.matrix * 8 + s.row == lane;
  }
  report(ok, "layouts match the PTX ISA (and are bijections: 32 lanes x n elements = cells)",
         __LINE__);
  // The quad butterfly reaches exactly the lanes of a row: same groupID.
  bool quad = true;
  for (int lane = 0; lane < kLanes; ++lane) {
    unsigned reached = 1u << lane;
    for (int step = 0; step < mma::kQuadSteps; ++step) {
      unsigned next = reached;
      for (int l = 0; l < kLanes; ++l) {
        if (reached >> l & 1u) next |= 1u << (l ^ mma::quad_offset(step));
      }
      reached = next;
    }
    for (int l = 0; l < kLanes; ++l) {
      quad = quad && ((reached >> l & 1u) != 0) == (mma::group_id(l) == mma::group_id(lane));
    }
  }
  report(quad, "quad butterfly covers the lanes of one row", __LINE__);
  // P's A fragment from S's C fragments: the same (row, key) cells.
  bool p_ok = true;
  for (int lane = 0; lane < kLanes; ++lane) {
    for (int chunk = 0; chunk < 4; ++chunk) {
      for (int i = 0; i < 8; ++i) {
        const mma::Cell a = mma::a_cell(lane, i);
        const mma::Source src = mma::p_source(chunk, i);
        const mma::Cell c = mma::c_cell(lane, src.index);
        p_ok = p_ok && src.index >= 0 && src.index < 4 && c.row == a.row &&
               mma::kN * src.tile + c.col == mma::kK * chunk + a.col;
      }
    }
  }
  report(p_ok, "P fragments come from S's accumulators", __LINE__);
}

// ---- a simulated warp -----------------------------------------------------------
using Regs8 = std::vector<std::vector<double>>;  // [lane][element]

Regs8 lanes(int elements) { return Regs8(kLanes, std::vector<double>(elements, 0.0)); }

// D += A B for fragments held as the PTX ISA distributes them.
void mma_16816(Regs8& d, const Regs8& a, const Regs8& b) {
  double am[16][16], bm[16][8];
  for (int lane = 0; lane < kLanes; ++lane) {
    for (int i = 0; i < 8; ++i) {
      const mma::Cell c = mma::a_cell(lane, i);
      am[c.row][c.col] = a[lane][i];
    }
    for (int i = 0; i < 4; ++i) {
      const mma::Cell c = mma::b_cell(lane, i);
      bm[c.row][c.col] = b[lane][i];
    }
  }
  for (int lane = 0; lane < kLanes; ++lane) {
    for (int i = 0; i < 4; ++i) {
      const mma::Cell c = mma::c_cell(lane, i);
      double acc = 0;
      for (int k = 0; k < 16; ++k) acc += am[c.row][k] * bm[k][c.col];
      d[lane][i] += acc;
    }
  }
}

// Shared memory of 16-bit elements (held as doubles), with the checks of a
// warp's ldmatrix.x4 reading it.
struct Smem {
  std::vector<double> cell;
  bool in_bounds = true, aligned = true, conflict_free = true;

  explicit Smem(int elements) : cell(elements, std::nan("")) {}
  // Registers [lane][4 matrices x 2 halves] from the lanes' row offsets.
  Regs8 ldmatrix_x4(const int* row_offset, bool trans) {
    for (int m = 0; m < 4; ++m) {
      unsigned banks = 0;  // one phase per matrix: its 8 rows of 16 bytes
      for (int r = 0; r < 8; ++r) {
        const int offset = row_offset[8 * m + r];
        in_bounds = in_bounds && offset >= 0 && offset + 8 <= static_cast<int>(cell.size());
        aligned = aligned && (offset * 2) % 16 == 0;
        const int bank = (offset * 2 / 4) % 32;
        const unsigned mask = 0xfu << bank;
        conflict_free = conflict_free && bank % 4 == 0 && (banks & mask) == 0;
        banks |= mask;
      }
    }
    Regs8 out = lanes(8);
    if (!in_bounds) return out;
    for (int lane = 0; lane < kLanes; ++lane) {
      for (int m = 0; m < 4; ++m) {
        for (int h = 0; h < 2; ++h) {
          const mma::Cell c = mma::ldmatrix_cell(lane, h, trans);
          out[lane][2 * m + h] = cell[row_offset[8 * m + c.row] + c.col];
        }
      }
    }
    return out;
  }
};

// Registers 2 and 3 of an x4 load: the second B fragment.
Regs8 upper_half(const Regs8& r) {
  Regs8 out = lanes(4);
  for (int lane = 0; lane < kLanes; ++lane) {
    for (int i = 0; i < 4; ++i) out[lane][i] = r[lane][4 + i];
  }
  return out;
}

// One warp of the tensor-core forward over `tiles` key tiles, against plain
// arithmetic. Scores are in log2 units, as in the kernel.
void simulate_forward(int bucket, int tiles, unsigned seed) {
  const int keys = tl::tc_forward_keys(bucket);
  const int dim_chunks = bucket / mma::kK, key_chunks = keys / mma::kK;
  const int key_tiles = keys / mma::kN, dim_tiles = bucket / mma::kN;
  g_case = "bucket " + std::to_string(bucket) + ", " + std::to_string(tiles) + " key tiles";
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> small(-3, 3);
  std::bernoulli_distribution masked(0.3);

  // Small integers: every product and sum of S is exact.
  std::vector<double> q(16 * bucket);
  for (double& x : q) x = small(rng);
  std::vector<std::vector<double>> k(tiles, std::vector<double>(keys * bucket)), v = k;
  std::vector<std::vector<bool>> keep(tiles, std::vector<bool>(16 * keys));
  for (int t = 0; t < tiles; ++t) {
    for (double& x : k[t]) x = small(rng);
    for (double& x : v[t]) x = small(rng);
    for (int row = 0; row < 16; ++row) {
      for (int j = 0; j < keys; ++j) {
        // Row 3 sees nothing in the first tile (its statistics start from
        // the empty state later); row 11 sees nothing at all (an invalid
        // slot, which the kernel never stores).
        keep[t][row * keys + j] = row != 11 && !(row == 3 && t == 0 && tiles > 1) && !masked(rng);
      }
    }
  }
  const double scale_log2 = 0.125 * 1.4426950408889634;

  // Q: A fragments straight from memory (the kernel's loop).
  std::vector<Regs8> q_frag(dim_chunks, lanes(8));
  for (int c = 0; c < dim_chunks; ++c) {
    for (int lane = 0; lane < kLanes; ++lane) {
      for (int i = 0; i < 8; ++i) {
        const mma::Cell cell = mma::a_cell(lane, i);
        q_frag[c][lane][i] = q[cell.row * bucket + mma::kK * c + cell.col];
      }
    }
  }
  std::vector<Regs8> o(dim_tiles, lanes(4));
  Regs8 row_max(kLanes, std::vector<double>(2, kNegInf)), row_sum = lanes(2);
  std::vector<double> ref_max(16, kNegInf);
  bool s_ok = true, max_ok = true, smem_ok = true;

  for (int t = 0; t < tiles; ++t) {
    // The block's tile load: 16-byte pieces at smem_offset.
    const int smem_size = keys * mma::smem_row_stride(bucket);
    Smem ks(smem_size), vs(smem_size);
    std::vector<int> written(smem_size, 0);
    for (int j = 0; j < keys; ++j) {
      for (int d0 = 0; d0 < bucket; d0 += 8) {
        const int offset = mma::smem_offset(j, d0, bucket);
        smem_ok = smem_ok && offset % 8 == 0 && offset >= 0 && offset + 8 <= smem_size;
        if (!smem_ok) continue;
        for (int e = 0; e < 8; ++e) {
          ++written[offset + e];
          ks.cell[offset + e] = k[t][j * bucket + d0 + e];
          vs.cell[offset + e] = v[t][j * bucket + d0 + e];
        }
      }
    }
    int written_once = 0;
    for (int w : written) {
      smem_ok = smem_ok && w <= 1;
      written_once += w;
    }
    smem_ok = smem_ok && written_once == keys * bucket;

    std::vector<Regs8> s(key_tiles, lanes(4));
    for (int c = 0; c < dim_chunks; ++c) {
      for (int pair = 0; pair < key_tiles / 2; ++pair) {
        int offsets[kLanes];
        for (int lane = 0; lane < kLanes; ++lane) {
          const mma::Cell cell = mma::k_ldmatrix_cell(lane, pair, c);
          offsets[lane] = mma::smem_offset(cell.row, cell.col, bucket);
        }
        const Regs8 k_frag = ks.ldmatrix_x4(offsets, false);
        mma_16816(s[2 * pair], q_frag[c], k_frag);
        mma_16816(s[2 * pair + 1], q_frag[c], upper_half(k_frag));
      }
    }
    smem_ok = smem_ok && ks.in_bounds && ks.aligned && ks.conflict_free;

    // S against Q K^T; then scale and mask as the kernel does.
    Regs8 tile_max = lanes(2);
    for (int lane = 0; lane < kLanes; ++lane) tile_max[lane] = {kNegInf, kNegInf};
    for (int n = 0; n < key_tiles; ++n) {
      for (int lane = 0; lane < kLanes; ++lane) {
        for (int i = 0; i < 4; ++i) {
          const mma::Cell cell = mma::c_cell(lane, i);
          const int row = cell.row, key = mma::kN * n + cell.col;
          double dot = 0;
          for (int d = 0; d < bucket; ++d) dot += q[row * bucket + d] * k[t][key * bucket + d];
          s_ok = s_ok && s[n][lane][i] == dot;
          const double x = keep[t][row * keys + key] ? s[n][lane][i] * scale_log2 : kNegInf;
          s[n][lane][i] = x;
          const int r = mma::c_half(i);
          tile_max[lane][r] = std::max(tile_max[lane][r], x);
          ref_max[row] = std::max(ref_max[row], x);
        }
      }
    }
    // The quad butterfly: every lane reads its partner's value before any writes.
    for (int step = 0; step < mma::kQuadSteps; ++step) {
      const Regs8 before = tile_max;
      for (int lane = 0; lane < kLanes; ++lane) {
        for (int r = 0; r < 2; ++r) {
          tile_max[lane][r] =
              std::max(before[lane][r], before[lane ^ mma::quad_offset(step)][r]);
        }
      }
    }
    Regs8 base = lanes(2);
    for (int lane = 0; lane < kLanes; ++lane) {
      for (int r = 0; r < 2; ++r) {
        const double new_max = std::max(row_max[lane][r], tile_max[lane][r]);
        base[lane][r] = new_max == kNegInf ? 0.0 : new_max;
        const double correction = std::exp2(row_max[lane][r] - base[lane][r]);
        row_sum[lane][r] *= correction;
        row_max[lane][r] = new_max;
        max_ok = max_ok && new_max == ref_max[mma::group_id(lane) + 8 * r];
        for (int n = 0; n < dim_tiles; ++n) {
          o[n][lane][2 * r] *= correction;
          o[n][lane][2 * r + 1] *= correction;
        }
      }
    }
    for (int n = 0; n < key_tiles; ++n) {
      for (int lane = 0; lane < kLanes; ++lane) {
        for (int i = 0; i < 4; ++i) {
          const int r = mma::c_half(i);
          s[n][lane][i] = std::exp2(s[n][lane][i] - base[lane][r]);
          row_sum[lane][r] += s[n][lane][i];
        }
      }
    }
    for (int c = 0; c < key_chunks; ++c) {
      Regs8 p_frag = lanes(8);
      for (int lane = 0; lane < kLanes; ++lane) {
        for (int i = 0; i < 8; ++i) {
          const mma::Source src = mma::p_source(c, i);
          p_frag[lane][i] = s[src.tile][lane][src.index];
        }
      }
      for (int pair = 0; pair < dim_tiles / 2; ++pair) {
        int offsets[kLanes];
        for (int lane = 0; lane < kLanes; ++lane) {
          const mma::Cell cell = mma::v_ldmatrix_cell(lane, c, pair);
          offsets[lane] = mma::smem_offset(cell.row, cell.col, bucket);
        }
        const Regs8 v_frag = vs.ldmatrix_x4(offsets, true);
        mma_16816(o[2 * pair], p_frag, v_frag);
        mma_16816(o[2 * pair + 1], p_frag, upper_half(v_frag));
      }
    }
    smem_ok = smem_ok && vs.in_bounds && vs.aligned && vs.conflict_free;
  }
  report(s_ok, "S = Q K^T through ldmatrix and m16n8k16", __LINE__);
  report(max_ok, "running row maxima after the quad butterfly", __LINE__);
  report(smem_ok, "shared memory: in bounds, written once, aligned, conflict-free", __LINE__);

  // Finish: quad sums, O / sum, lse; against plain softmax(S) V.
  for (int step = 0; step < mma::kQuadSteps; ++step) {
    const Regs8 before = row_sum;
    for (int lane = 0; lane < kLanes; ++lane) {
      for (int r = 0; r < 2; ++r) {
        row_sum[lane][r] = before[lane][r] + before[lane ^ mma::quad_offset(step)][r];
      }
    }
  }
  bool o_ok = true, lse_ok = true, stored_once = true;
  std::vector<int> stored(16 * bucket, 0);
  for (int row = 0; row < 16; ++row) {
    if (row == 11) continue;  // no keys: never stored
    double m = kNegInf;
    std::vector<double> logits;
    for (int t = 0; t < tiles; ++t) {
      for (int j = 0; j < keys; ++j) {
        double dot = 0;
        for (int d = 0; d < bucket; ++d) dot += q[row * bucket + d] * k[t][j * bucket + d];
        logits.push_back(keep[t][row * keys + j] ? dot * scale_log2 : kNegInf);
        m = std::max(m, logits.back());
      }
    }
    double sum = 0;
    for (double x : logits) sum += std::exp2(x - m);
    for (int lane = 0; lane < kLanes; ++lane) {
      for (int r = 0; r < 2; ++r) {
        if (mma::group_id(lane) + 8 * r != row) continue;
        lse_ok = lse_ok && std::fabs((row_max[lane][r] + std::log2(row_sum[lane][r])) -
                                     (m + std::log2(sum))) < 1e-9;
        for (int n = 0; n < dim_tiles; ++n) {
          for (int jj = 0; jj < 2; ++jj) {
            const int d = mma::kN * n + mma::c_cell(lane, 2 * r + jj).col;
            ++stored[row * bucket + d];
            double ref = 0;
            for (int t = 0; t < tiles; ++t) {
              for (int j = 0; j < keys; ++j) {
                ref += std::exp2(logits[t * keys + j] - m) / sum * v[t][j * bucket + d];
              }
            }
            const double got = o[n][lane][2 * r + jj] / row_sum[lane][r];
            o_ok = o_ok && std::fabs(got - ref) <= 1e-9 * (1 + std::fabs(ref));
          }
        }
      }
    }
  }
  for (int row = 0; row < 16; ++row) {
    for (int d = 0; d < bucket; ++d) {
      stored_once = stored_once && stored[row * bucket + d] == (row != 11);
    }
  }
  report(o_ok, "O = softmax(S) V through P fragments and ldmatrix.trans", __LINE__);
  report(lse_ok, "lse from the row statistics", __LINE__);
  report(stored_once, "every output element stored by exactly one lane", __LINE__);
}

// Static shared memory of the kernel within the per-block limit.
void check_block_shape() {
  g_case = "block shape";
  for (int bucket : {32, 64, 128}) {
    const int keys = tl::tc_forward_keys(bucket);
    const long bytes = 2L * keys * mma::smem_row_stride(bucket) * 2 + keys * (3 * 4 + 1);
    CHECK(bytes <= 48 * 1024);
    CHECK(keys % mma::kK == 0 && bucket % mma::kK == 0);
    // Row strides fall 4 banks apart (mod 32): conflict-free ldmatrix phases.
    CHECK(mma::smem_row_stride(bucket) * 2 / 4 % 32 == 4 ||
          mma::smem_row_stride(bucket) * 2 / 4 % 32 == 20);
  }
  CHECK(tl::tc_forward_queries() == tl::kThreads / mma::kWarpSize * mma::kM);
  // The block's rows: every query slot is held by exactly the four lanes of
  // one quad (one C fragment row), and its A fragment row is the same row.
  std::vector<int> holders(tl::tc_forward_queries(), 0);
  bool rows_ok = true;
  for (int warp = 0; warp < tl::kThreads / mma::kWarpSize; ++warp) {
    for (int lane = 0; lane < kLanes; ++lane) {
      for (int i = 0; i < 4; ++i) {
        const int half = mma::c_half(i);
        const int slot = mma::query_slot(warp, lane, half);
        rows_ok = rows_ok && slot >= 0 && slot < tl::tc_forward_queries() &&
                  slot == mma::kM * warp + mma::c_cell(lane, i).row;
        if (rows_ok && i % 2 == 0) ++holders[slot];
      }
      for (int i = 0; i < 8; ++i) {
        const mma::Cell a = mma::a_cell(lane, i);
        rows_ok = rows_ok && mma::query_slot(warp, lane, a.row >> 3) == mma::kM * warp + a.row;
      }
    }
  }
  for (int h : holders) rows_ok = rows_ok && h == 4;
  report(rows_ok, "query slots: one quad per slot, A and C rows agree", __LINE__);
}

}  // namespace

int main() {
  check_fragment_layouts();
  std::printf("layouts: %s\n", g_failed ? "FAILED" : "ok");
  unsigned seed = 1;
  for (int bucket : {32, 64, 128}) {
    for (int tiles : {1, 3}) simulate_forward(bucket, tiles, seed++);
  }
  std::printf("warp: %s\n", g_failed ? "FAILED" : "ok");
  check_block_shape();
  std::printf("block: %s\n", g_failed ? "FAILED" : "ok");
  std::printf("%lld passed, %lld failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
