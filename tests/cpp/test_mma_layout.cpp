// Host test of the tensor-core kernels' fragment and shared-memory
// addressing (cuda/mma_layout.h), which cannot run on a GPU here:
//   - the header's m16n8k16 and ldmatrix layouts against the PTX ISA's,
//     written again below in inverse form (which lane and element holds a
//     cell), so that each layout is also checked to be a bijection;
//   - a simulated warp (32 lanes of registers) runs the kernel's steps with
//     those functions: Q A-fragments from memory, K through ldmatrix.x4,
//     m16n8k16 products into S, the online softmax with quad butterflies
//     over the rows' lanes, P taken from S's accumulators, V through
//     ldmatrix.x4.trans, O, the row sums and lse; S, the running row maxima,
//     O and lse must equal plain matrix arithmetic;
//   - the backward's two kernels, all four warps of a block, over one and
//     three visited tiles, D_v = D and D_v < D: the dq kernel's D = dO . O
//     (over the A fragments' cells, a quad sum), S = Q K^T and dP = dO V^T
//     (Q and dO A fragments through ldmatrix), dS = P (dP - D) on the
//     accumulators and dq = scale dS K (dS fragments from the accumulators,
//     K through ldmatrix.trans); the dk/dv kernel's
//     S^T = K Q^T and dP^T = V dO^T (K and V A fragments through ldmatrix),
//     P^T and dS^T with lse and D per column, dv = P^T dO and dk = scale dS^T Q;
//     with masked pairs, invalid slots, a query and a key that see nothing,
//     and rows that see nothing in the first tile; every output element
//     stored exactly once;
//   - shared-memory addressing: in bounds, one offset per (row, dim), 16-byte
//     aligned ldmatrix rows and vector stores, no bank conflict in any
//     ldmatrix phase.
// Prints "<name>: ok" per part and a summary; exits non-zero on any failure.
#include "mma_layout.h"
#include "tiling.h"

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
  // The block's tile load: `rows` rows of `bucket` elements (row-major in
  // `data`, from row `first`) in 16-byte pieces at smem_offset; every piece
  // aligned and in bounds, every element written exactly once.
  bool stage(int rows, int bucket, const std::vector<double>& data, int first = 0) {
    bool ok = true;
    std::vector<int> written(cell.size(), 0);
    for (int j = 0; j < rows; ++j) {
      for (int d0 = 0; d0 < bucket; d0 += 8) {
        const int offset = mma::smem_offset(j, d0, bucket);
        ok = ok && offset % 8 == 0 && offset >= 0 && offset + 8 <= static_cast<int>(cell.size());
        if (!ok) continue;
        for (int e = 0; e < 8; ++e) {
          ++written[offset + e];
          cell[offset + e] = data[(first + j) * bucket + d0 + e];
        }
      }
    }
    int total = 0;
    for (int w : written) {
      ok = ok && w <= 1;
      total += w;
    }
    return ok && total == rows * bucket;
  }
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
    const int smem_size = keys * mma::smem_row_stride(bucket);
    Smem ks(smem_size), vs(smem_size);
    smem_ok = smem_ok && ks.stage(keys, bucket, k[t]) && vs.stage(keys, bucket, v[t]);

    std::vector<Regs8> s(key_tiles, lanes(4));
    for (int c = 0; c < dim_chunks; ++c) {
      for (int pair = 0; pair < key_tiles / 2; ++pair) {
        int offsets[kLanes];
        for (int lane = 0; lane < kLanes; ++lane) {
          const mma::Cell cell = mma::b_ldmatrix_cell(lane, pair, c);
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
          const mma::Cell cell = mma::b_trans_ldmatrix_cell(lane, c, pair);
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

// ldmatrix.x4 of a warp whose lanes address cell_of(lane) of `sm`'s rows.
template <typename CellOf>
Regs8 load_x4(Smem& sm, int bucket, bool trans, CellOf&& cell_of) {
  int offsets[kLanes];
  for (int lane = 0; lane < kLanes; ++lane) {
    const mma::Cell cell = cell_of(lane);
    offsets[lane] = mma::smem_offset(cell.row, cell.col, bucket);
  }
  return sm.ldmatrix_x4(offsets, trans);
}

// An A fragment from C fragments (P, dS, P^T, dS^T): mma::p_source.
Regs8 a_from_accumulators(const std::vector<Regs8>& acc, int chunk) {
  Regs8 a = lanes(8);
  for (int lane = 0; lane < kLanes; ++lane) {
    for (int i = 0; i < 8; ++i) {
      const mma::Source src = mma::p_source(chunk, i);
      a[lane][i] = acc[src.tile][lane][src.index];
    }
  }
  return a;
}

// acc[2 pair], acc[2 pair + 1] += a B for every n-tile pair, B from `rows`
// ([k][dim]) through ldmatrix.trans at k chunk `chunk` (the kernels'
// mma_rows_trans).
void mma_rows_trans(std::vector<Regs8>& acc, const Regs8& a, Smem& rows, int bucket, int chunk) {
  for (int pair = 0; pair < bucket / mma::kN / 2; ++pair) {
    const Regs8 b = load_x4(rows, bucket, true, [&](int lane) {
      return mma::b_trans_ldmatrix_cell(lane, chunk, pair);
    });
    mma_16816(acc[2 * pair], a, b);
    mma_16816(acc[2 * pair + 1], a, upper_half(b));
  }
}

// One backward problem: 64 queries and `keys` keys, or 64 keys and
// `queries` queries (one block's owned rows, four warps of 16, against
// visited tiles), D = bucket head dims for Q and K and dim_v for V and dO.
// Small integers keep S, dP and D exact; the reference is plain arithmetic.
struct BackwardProblem {
  int bucket, dim_v, queries, keys;
  std::vector<double> q, k, v, dout, out;  // rows of `bucket`, zero past the head dim
  std::vector<bool> keep;                  // [query][key]
  std::vector<bool> valid_query, valid_key;  // invalid slots: nothing kept, never stored
  // reference
  std::vector<double> s, dp, prob, ds, lse_log2, term, dq, dk, dv;
  double scale = 0.125;

  double scale_log2() const { return scale * 1.4426950408889634; }
  BackwardProblem(int bucket_, int dim_v_, int queries_, int keys_, unsigned seed)
      : bucket(bucket_), dim_v(dim_v_), queries(queries_), keys(keys_) {
    std::mt19937 rng(seed);
    std::uniform_int_distribution<int> small(-2, 2);
    std::bernoulli_distribution masked(0.3);
    auto fill = [&](std::vector<double>& x, int rows, int dim) {
      x.assign(static_cast<std::size_t>(rows) * bucket, 0.0);
      for (int r = 0; r < rows; ++r) {
        for (int d = 0; d < dim; ++d) x[r * bucket + d] = small(rng);
      }
    };
    fill(q, queries, bucket);
    fill(k, keys, bucket);
    fill(v, keys, dim_v);
    fill(dout, queries, dim_v);
    fill(out, queries, dim_v);
    valid_query.assign(queries, true);
    valid_key.assign(keys, true);
    keep.assign(static_cast<std::size_t>(queries) * keys, false);
    for (int i = 0; i < queries; ++i) {
      for (int j = 0; j < keys; ++j) keep[i * keys + j] = !masked(rng);
    }
  }
  void no_query(int i, bool invalid) {
    for (int j = 0; j < keys; ++j) keep[i * keys + j] = false;
    if (invalid) valid_query[i] = false;
  }
  void no_key(int j, bool invalid) {
    for (int i = 0; i < queries; ++i) keep[i * keys + j] = false;
    if (invalid) valid_key[j] = false;
  }
  void solve() {
    const int nq = queries, nk = keys;
    s.assign(nq * nk, 0);
    dp.assign(nq * nk, 0);
    prob.assign(nq * nk, 0);
    ds.assign(nq * nk, 0);
    lse_log2.assign(nq, 0);
    term.assign(nq, 0);
    for (int i = 0; i < nq; ++i) {
      for (int d = 0; d < bucket; ++d) term[i] += dout[i * bucket + d] * out[i * bucket + d];
      double m = kNegInf;
      for (int j = 0; j < nk; ++j) {
        for (int d = 0; d < bucket; ++d) {
          s[i * nk + j] += q[i * bucket + d] * k[j * bucket + d];
          dp[i * nk + j] += dout[i * bucket + d] * v[j * bucket + d];
        }
        if (keep[i * nk + j]) m = std::max(m, s[i * nk + j] * scale_log2());
      }
      double sum = 0;
      for (int j = 0; j < nk; ++j) {
        if (keep[i * nk + j]) sum += std::exp2(s[i * nk + j] * scale_log2() - m);
      }
      lse_log2[i] = m == kNegInf ? 0.0 : m + std::log2(sum);
      for (int j = 0; j < nk; ++j) {
        if (!keep[i * nk + j]) continue;
        prob[i * nk + j] = std::exp2(s[i * nk + j] * scale_log2() - lse_log2[i]);
        ds[i * nk + j] = prob[i * nk + j] * (dp[i * nk + j] - term[i]);
      }
    }
    dq.assign(nq * bucket, 0);
    dk.assign(nk * bucket, 0);
    dv.assign(nk * bucket, 0);
    for (int i = 0; i < nq; ++i) {
      for (int j = 0; j < nk; ++j) {
        for (int d = 0; d < bucket; ++d) {
          dq[i * bucket + d] += scale * ds[i * nk + j] * k[j * bucket + d];
          dk[j * bucket + d] += scale * ds[i * nk + j] * q[i * bucket + d];
          dv[j * bucket + d] += prob[i * nk + j] * dout[i * bucket + d];
        }
      }
    }
  }
};

bool near(double got, double ref) { return std::fabs(got - ref) <= 1e-9 * (1 + std::fabs(ref)); }

// Checks the stores of C fragments acc (16 rows of warp `warp`, head dims
// below `dim` of `bucket`) against ref rows (scaled by `scale`); counts
// stores per element.
bool check_rows(const std::vector<Regs8>& acc, int warp, int bucket, int dim, double scale,
                const std::vector<bool>& valid, const std::vector<double>& ref,
                std::vector<int>& stored) {
  bool ok = true;
  for (int lane = 0; lane < kLanes; ++lane) {
    for (int half = 0; half < 2; ++half) {
      const int row = mma::row_slot(warp, lane, half);
      if (!valid[row]) continue;
      for (int n = 0; n < bucket / mma::kN; ++n) {
        for (int j = 0; j < 2; ++j) {
          const int d = mma::kN * n + mma::c_cell(lane, 2 * half + j).col;
          if (d >= dim) continue;
          ++stored[row * bucket + d];
          ok = ok && near(acc[n][lane][2 * half + j] * scale, ref[row * bucket + d]);
        }
      }
    }
  }
  return ok;
}

bool stored_once(const std::vector<int>& stored, const std::vector<bool>& valid, int bucket,
                 int dim) {
  bool ok = true;
  for (std::size_t row = 0; row < valid.size(); ++row) {
    for (int d = 0; d < bucket; ++d) {
      ok = ok && stored[row * bucket + d] == (valid[row] && d < dim ? 1 : 0);
    }
  }
  return ok;
}

// The dq kernel's four warps (64 query rows) over `tiles` key tiles.
void simulate_dq(int bucket, int dim_v, int tiles, unsigned seed) {
  const int keys = tl::tc_dq_keys(bucket), rows = tl::tc_forward_queries();
  const int dim_chunks = bucket / mma::kK, key_chunks = keys / mma::kK;
  const int key_tiles = keys / mma::kN, dim_tiles = bucket / mma::kN;
  g_case = "dq, bucket " + std::to_string(bucket) + ", dim_v " + std::to_string(dim_v) + ", " +
           std::to_string(tiles) + " key tiles";
  BackwardProblem pr(bucket, dim_v, rows, tiles * keys, seed);
  pr.no_query(11, true);   // an invalid slot
  pr.no_query(40, false);  // a query that sees nothing: dq = 0
  for (int j = 0; j < keys && tiles > 1; ++j) pr.keep[3 * pr.keys + j] = false;  // not in tile 0
  pr.solve();

  // The block's Q and dO rows in shared memory (dO zero past dim_v).
  const int row_smem = rows * mma::smem_row_stride(bucket);
  Smem qs(row_smem), dos(row_smem);
  bool smem_ok = qs.stage(rows, bucket, pr.q) && dos.stage(rows, bucket, pr.dout);
  bool term_ok = true, s_ok = true, ds_ok = true, dq_ok = true;
  std::vector<int> stored(rows * bucket, 0);
  for (int warp = 0; warp < rows / mma::kM; ++warp) {
    // D over the cells of the lane's A fragments, then a quad sum.
    Regs8 term = lanes(2);
    for (int c = 0; c < dim_chunks; ++c) {
      for (int lane = 0; lane < kLanes; ++lane) {
        for (int i = 0; i < 8; ++i) {
          const mma::Cell cell = mma::a_cell(lane, i);
          const int r = cell.row >> 3, row = mma::row_slot(warp, lane, r);
          const int d = mma::kK * c + cell.col;
          if (d < dim_v) {
            term[lane][r] += dos.cell[mma::smem_offset(row, d, bucket)] * pr.out[row * bucket + d];
          }
        }
      }
    }
    for (int step = 0; step < mma::kQuadSteps; ++step) {
      const Regs8 before = term;
      for (int lane = 0; lane < kLanes; ++lane) {
        for (int r = 0; r < 2; ++r) {
          term[lane][r] = before[lane][r] + before[lane ^ mma::quad_offset(step)][r];
        }
      }
    }
    for (int lane = 0; lane < kLanes; ++lane) {
      for (int r = 0; r < 2; ++r) {
        term_ok = term_ok && term[lane][r] == pr.term[mma::row_slot(warp, lane, r)];
      }
    }

    std::vector<Regs8> dq(dim_tiles, lanes(4));
    for (int t = 0; t < tiles; ++t) {
      const int smem_size = keys * mma::smem_row_stride(bucket);
      Smem ks(smem_size), vs(smem_size);
      smem_ok = smem_ok && ks.stage(keys, bucket, pr.k, t * keys) &&
                vs.stage(keys, bucket, pr.v, t * keys);
      std::vector<Regs8> s(key_tiles, lanes(4)), dp(key_tiles, lanes(4));
      for (int c = 0; c < dim_chunks; ++c) {
        const auto a_cell = [&](int lane) { return mma::a_ldmatrix_cell(lane, warp, c); };
        const Regs8 q_frag = load_x4(qs, bucket, false, a_cell);
        const Regs8 do_frag = load_x4(dos, bucket, false, a_cell);
        for (int pair = 0; pair < key_tiles / 2; ++pair) {
          const auto cell = [&](int lane) { return mma::b_ldmatrix_cell(lane, pair, c); };
          const Regs8 k_frag = load_x4(ks, bucket, false, cell);
          const Regs8 v_frag = load_x4(vs, bucket, false, cell);
          mma_16816(s[2 * pair], q_frag, k_frag);
          mma_16816(s[2 * pair + 1], q_frag, upper_half(k_frag));
          mma_16816(dp[2 * pair], do_frag, v_frag);
          mma_16816(dp[2 * pair + 1], do_frag, upper_half(v_frag));
        }
      }
      // dS = P (dP - D) in place of dP, as the kernel computes it.
      for (int n = 0; n < key_tiles; ++n) {
        for (int lane = 0; lane < kLanes; ++lane) {
          for (int i = 0; i < 4; ++i) {
            const int r = mma::c_half(i), row = mma::row_slot(warp, lane, r);
            const int key = t * keys + mma::kN * n + mma::c_cell(lane, i).col;
            const int pair = row * pr.keys + key;
            s_ok = s_ok && s[n][lane][i] == pr.s[pair] && dp[n][lane][i] == pr.dp[pair];
            double ds = 0;
            if (pr.valid_query[row] && pr.keep[pair]) {
              const double x = s[n][lane][i] * pr.scale_log2();
              ds = std::exp2(x - pr.lse_log2[row]) * (dp[n][lane][i] - term[lane][r]);
            }
            ds_ok = ds_ok && near(ds, pr.ds[pair]);
            dp[n][lane][i] = ds;
          }
        }
      }
      for (int c = 0; c < key_chunks; ++c) {
        mma_rows_trans(dq, a_from_accumulators(dp, c), ks, bucket, c);
      }
      smem_ok = smem_ok && ks.in_bounds && ks.aligned && ks.conflict_free && vs.in_bounds &&
                vs.aligned && vs.conflict_free;
    }
    dq_ok = dq_ok && check_rows(dq, warp, bucket, bucket, pr.scale, pr.valid_query, pr.dq, stored);
  }
  smem_ok = smem_ok && qs.in_bounds && qs.aligned && qs.conflict_free && dos.in_bounds &&
            dos.aligned && dos.conflict_free;
  report(term_ok, "D = dO . O over the A fragments' cells and a quad sum", __LINE__);
  report(s_ok, "S = Q K^T and dP = dO V^T (Q, dO A fragments through ldmatrix)", __LINE__);
  report(ds_ok, "dS = P (dP - D) on S's and dP's accumulators", __LINE__);
  report(smem_ok, "dq shared memory: in bounds, written once, aligned, conflict-free", __LINE__);
  report(dq_ok, "dq = scale dS K through dS fragments and ldmatrix.trans", __LINE__);
  report(stored_once(stored, pr.valid_query, bucket, bucket), "every dq element stored once",
         __LINE__);
}

// The dk/dv kernel's four warps (64 key rows) over `tiles` query tiles.
void simulate_dkdv(int bucket, int dim_v, int tiles, unsigned seed) {
  const int queries = tl::tc_dkdv_queries(bucket), rows = tl::tc_dkdv_keys();
  const int dim_chunks = bucket / mma::kK, query_chunks = queries / mma::kK;
  const int query_tiles = queries / mma::kN, dim_tiles = bucket / mma::kN;
  g_case = "dk/dv, bucket " + std::to_string(bucket) + ", dim_v " + std::to_string(dim_v) +
           ", " + std::to_string(tiles) + " query tiles";
  BackwardProblem pr(bucket, dim_v, tiles * queries, rows, seed);
  pr.no_key(13, true);   // an invalid slot
  pr.no_key(37, false);  // a key that no query sees: dk = dv = 0
  pr.no_query(5, true);  // an invalid query slot of the first tile
  for (int i = 0; i < queries && tiles > 1; ++i) pr.keep[i * pr.keys + 50] = false;
  pr.solve();

  const int key_smem = rows * mma::smem_row_stride(bucket);
  Smem ks(key_smem), vs(key_smem);
  bool smem_ok = ks.stage(rows, bucket, pr.k) && vs.stage(rows, bucket, pr.v);
  bool s_ok = true, ds_ok = true, dk_ok = true, dv_ok = true;
  std::vector<int> stored_k(rows * bucket, 0), stored_v(rows * bucket, 0);
  for (int warp = 0; warp < rows / mma::kM; ++warp) {
    std::vector<Regs8> dk(dim_tiles, lanes(4)), dv(dim_tiles, lanes(4));
    for (int t = 0; t < tiles; ++t) {
      const int query_smem = queries * mma::smem_row_stride(bucket);
      Smem qs(query_smem), dos(query_smem);
      smem_ok = smem_ok && qs.stage(queries, bucket, pr.q, t * queries) &&
                dos.stage(queries, bucket, pr.dout, t * queries);
      std::vector<Regs8> s(query_tiles, lanes(4)), dp(query_tiles, lanes(4));
      for (int c = 0; c < dim_chunks; ++c) {
        const auto a_cell = [&](int lane) { return mma::a_ldmatrix_cell(lane, warp, c); };
        const Regs8 k_frag = load_x4(ks, bucket, false, a_cell);
        const Regs8 v_frag = load_x4(vs, bucket, false, a_cell);
        for (int pair = 0; pair < query_tiles / 2; ++pair) {
          const auto cell = [&](int lane) { return mma::b_ldmatrix_cell(lane, pair, c); };
          const Regs8 q_frag = load_x4(qs, bucket, false, cell);
          const Regs8 do_frag = load_x4(dos, bucket, false, cell);
          mma_16816(s[2 * pair], k_frag, q_frag);
          mma_16816(s[2 * pair + 1], k_frag, upper_half(q_frag));
          mma_16816(dp[2 * pair], v_frag, do_frag);
          mma_16816(dp[2 * pair + 1], v_frag, upper_half(do_frag));
        }
      }
      // P^T and dS^T in place of S^T and dP^T: rows keys, columns queries.
      for (int n = 0; n < query_tiles; ++n) {
        for (int lane = 0; lane < kLanes; ++lane) {
          for (int i = 0; i < 4; ++i) {
            const int key = mma::row_slot(warp, lane, mma::c_half(i));
            const int query = t * queries + mma::kN * n + mma::c_cell(lane, i).col;
            const int pair = query * pr.keys + key;
            s_ok = s_ok && s[n][lane][i] == pr.s[pair] && dp[n][lane][i] == pr.dp[pair];
            double prob = 0, ds = 0;
            if (pr.valid_key[key] && pr.valid_query[query] && pr.keep[pair]) {
              prob = std::exp2(s[n][lane][i] * pr.scale_log2() - pr.lse_log2[query]);
              ds = prob * (dp[n][lane][i] - pr.term[query]);
            }
            ds_ok = ds_ok && near(prob, pr.prob[pair]) && near(ds, pr.ds[pair]);
            s[n][lane][i] = prob;
            dp[n][lane][i] = ds;
          }
        }
      }
      for (int c = 0; c < query_chunks; ++c) {
        mma_rows_trans(dv, a_from_accumulators(s, c), dos, bucket, c);
        mma_rows_trans(dk, a_from_accumulators(dp, c), qs, bucket, c);
      }
      smem_ok = smem_ok && qs.in_bounds && qs.aligned && qs.conflict_free && dos.in_bounds &&
                dos.aligned && dos.conflict_free;
    }
    dk_ok = dk_ok && check_rows(dk, warp, bucket, bucket, pr.scale, pr.valid_key, pr.dk, stored_k);
    dv_ok = dv_ok && check_rows(dv, warp, bucket, dim_v, 1.0, pr.valid_key, pr.dv, stored_v);
  }
  smem_ok = smem_ok && ks.in_bounds && ks.aligned && ks.conflict_free && vs.in_bounds &&
            vs.aligned && vs.conflict_free;
  report(s_ok, "S^T = K Q^T and dP^T = V dO^T (K, V A fragments through ldmatrix)", __LINE__);
  report(ds_ok, "P^T and dS^T on the accumulators, lse and D per column", __LINE__);
  report(smem_ok, "dk/dv shared memory: in bounds, written once, aligned, conflict-free",
         __LINE__);
  report(dk_ok, "dk = scale dS^T Q through dS^T fragments and ldmatrix.trans", __LINE__);
  report(dv_ok, "dv = P^T dO through P^T fragments and ldmatrix.trans", __LINE__);
  report(stored_once(stored_k, pr.valid_key, bucket, bucket) &&
             stored_once(stored_v, pr.valid_key, bucket, dim_v),
         "every dk and dv element stored once", __LINE__);
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
  // The backward's blocks: dq (Q and dO of 64 queries, the key tile, 64
  // OwnedQuery of at most 64 bytes) and dk/dv (K and V of 64 keys, Q and dO
  // of a query tile, 64 OwnedKey, the query slots' positions, validity, lse
  // and D).
  for (int bucket : {32, 64, 128}) {
    const long stride = mma::smem_row_stride(bucket);
    const int keys = tl::tc_dq_keys(bucket), queries = tl::tc_dkdv_queries(bucket);
    CHECK(keys % mma::kK == 0 && queries % mma::kK == 0);
    CHECK(4L * 64 * stride + 4L * keys * stride + keys * (3 * 4 + 1) + 64L * 64 <= 48 * 1024);
    CHECK(4L * 64 * stride + 4L * queries * stride + 64L * 64 + queries * (3 * 4 + 4 + 4 + 1) <=
          48 * 1024);
  }
  CHECK(tl::tc_forward_queries() == tl::kThreads / mma::kWarpSize * mma::kM);
  CHECK(tl::tc_dkdv_keys() == tl::kThreads / mma::kWarpSize * mma::kM);
  // The block's rows: every query slot is held by exactly the four lanes of
  // one quad (one C fragment row), and its A fragment row is the same row.
  std::vector<int> holders(tl::tc_forward_queries(), 0);
  bool rows_ok = true;
  for (int warp = 0; warp < tl::kThreads / mma::kWarpSize; ++warp) {
    for (int lane = 0; lane < kLanes; ++lane) {
      for (int i = 0; i < 4; ++i) {
        const int half = mma::c_half(i);
        const int slot = mma::row_slot(warp, lane, half);
        rows_ok = rows_ok && slot >= 0 && slot < tl::tc_forward_queries() &&
                  slot == mma::kM * warp + mma::c_cell(lane, i).row;
        if (rows_ok && i % 2 == 0) ++holders[slot];
      }
      for (int i = 0; i < 8; ++i) {
        const mma::Cell a = mma::a_cell(lane, i);
        rows_ok = rows_ok && mma::row_slot(warp, lane, a.row >> 3) == mma::kM * warp + a.row;
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
  for (int bucket : {32, 64, 128}) {
    for (int tiles : {1, 3}) {
      // D_v = D, and D_v < D (dO and V zero past D_v, as the kernels load them).
      for (int dim_v : {bucket, bucket - 8}) {
        simulate_dq(bucket, dim_v, tiles, seed++);
        simulate_dkdv(bucket, dim_v, tiles, seed++);
      }
    }
  }
  std::printf("backward: %s\n", g_failed ? "FAILED" : "ok");
  check_block_shape();
  std::printf("block: %s\n", g_failed ? "FAILED" : "ok");
  std::printf("%lld passed, %lld failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
