// Host test of the CUDA kernels' tile scheduling (cuda/tiling.h): runs the
// very functions the kernels call, slot by slot as the threads of a block
// would, over a grid of ranks, extents, odd/even kernels, strides,
// dilations and per-axis causal flags, for every head-dim bucket and block
// shape (SIMT forward, dq, dk/dv; tensor-core forward), and proves
//   - every (query, key) pair a kernel keeps is in the reference
//     neighbourhood (axis_window), and every reference pair is kept exactly
//     once: by the forward and dq kernels (blocks own queries) and by the
//     dk/dv kernel (blocks own keys);
//   - tiles marked "full" need no mask (every slot is a valid, related key);
//   - no visited tile is unreachable (each keeps at least one pair);
//   - every position a kernel loads is inside the tensor;
//   - rpb offsets equal the reference's, and lie in [0, 2k-1);
//   - the unfused kernels' slot layout and its inverse agree with it.
// Prints "<name>: ok" per part and a summary; exits non-zero on any failure.
#include "tiling.h"
#include <libna/window.h>

#include "check.h"

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

namespace {

using i64 = std::int64_t;
using libna::AxisParams;
namespace tl = libna::tiling;

using namespace libna_test;

struct Case {
  int rank;
  AxisParams axes[tl::kAxes];
  i64 tokens = 1;
  i64 length[tl::kAxes] = {1, 1, 1};

  Case(int r, const AxisParams* a) : rank(r) {
    for (int i = 0; i < tl::kAxes; ++i) {
      axes[i] = i < r ? a[i] : AxisParams{1, 1, 1, 1, false};
      length[i] = axes[i].length;
      tokens *= length[i];
    }
  }
  i64 flat(const i64* c) const { return (c[0] * length[1] + c[1]) * length[2] + c[2]; }
  void coords(i64 t, i64* c) const {
    for (int a = tl::kAxes - 1; a >= 0; --a) {
      c[a] = t % length[a];
      t /= length[a];
    }
  }
  std::string name() const {
    std::string s = "rank " + std::to_string(rank);
    for (int a = 0; a < rank; ++a) {
      const AxisParams& p = axes[a];
      s += " | L" + std::to_string(p.length) + " k" + std::to_string(p.kernel) + " s" +
           std::to_string(p.stride) + " d" + std::to_string(p.dilation) + (p.causal ? " causal" : "");
    }
    return s;
  }
};

// Reference: per (query, key) the rpb offset + 1 (0 = not a neighbour),
// from axis_window alone.
std::vector<int> reference(const Case& c) {
  std::vector<int> ref(c.tokens * c.tokens, 0);
  for (i64 qt = 0; qt < c.tokens; ++qt) {
    i64 q[3];
    c.coords(qt, q);
    libna::AxisWindow w[3];
    for (int a = 0; a < 3; ++a) w[a] = libna::axis_window(q[a], c.axes[a]);
    for (i64 t0 = 0; t0 < w[0].count; ++t0)
      for (i64 t1 = 0; t1 < w[1].count; ++t1)
        for (i64 t2 = 0; t2 < w[2].count; ++t2) {
          const i64 k[3] = {w[0].first + t0 * w[0].step, w[1].first + t1 * w[1].step,
                            w[2].first + t2 * w[2].step};
          const i64 r[3] = {w[0].rpb_first + t0, w[1].rpb_first + t1, w[2].rpb_first + t2};
          ref[qt * c.tokens + c.flat(k)] = static_cast<int>(
              (r[0] * (2 * c.axes[1].kernel - 1) + r[1]) * (2 * c.axes[2].kernel - 1) + r[2] + 1);
        }
  }
  return ref;
}

// Runs a fused kernel's schedule; `own_queries` picks forward/dq or dk/dv.
void run_schedule(const Case& c, const std::vector<int>& ref, int own_capacity,
                  int visit_capacity, bool own_queries) {
  const tl::Plan plan = tl::make_plan(c.axes, c.rank, own_capacity, visit_capacity, own_queries);
  CHECK((own_queries ? plan.q_slots : plan.k_slots) <= own_capacity);
  CHECK((own_queries ? plan.k_slots : plan.q_slots) <= visit_capacity);
  std::vector<int> kept(c.tokens * c.tokens, 0);
  int own_extent[3], visit_extent[3];
  tl::tile_extents(plan, own_queries, own_extent);
  tl::tile_extents(plan, !own_queries, visit_extent);
  bool all_ok = true;
  auto check = [&](bool ok, const char* what, int line) {
    if (!ok && all_ok) {
      all_ok = false;
      report(false, what, line);
    }
  };
#define CHECK_ALL(cond) check(static_cast<bool>(cond), #cond, __LINE__)
  for (i64 index = 0; index < plan.blocks; ++index) {
    const tl::Block b = tl::make_block(plan, index);
    if (b.empty) {
      CHECK_ALL(b.num_tiles == 0);
      continue;
    }
    // Per owned slot, what its thread holds: position, and the visited run
    // it relates to per axis (a query's window, or a key's query run).
    struct Owner {
      bool valid;
      int pos[3], lo[3], hi[3];
    };
    std::vector<Owner> owners(own_capacity);
    for (int s = 0; s < own_capacity; ++s) {
      Owner& o = owners[s];
      o.valid = tl::slot_position(s, own_extent, b.own_lo, b.own_hi, o.pos);
      if (!o.valid) continue;
      for (int a = 0; a < 3; ++a) {
        CHECK_ALL(o.pos[a] >= 0 && o.pos[a] < b.len_g[a]);
        CHECK_ALL(tl::full_index(b.group[a], o.pos[a], c.axes[a]) < c.length[a]);
        if (own_queries) {
          tl::window_in_group(o.pos[a], b.len_g[a], c.axes[a], &o.lo[a], &o.hi[a]);
        } else {
          int first = 0, last = 0;
          tl::queries_seeing(o.pos[a], b.len_g[a], c.axes[a], &first, &last);
          o.lo[a] = first;
          o.hi[a] = last + 1;
        }
      }
    }
    for (int t = 0; t < b.num_tiles; ++t) {
      const tl::Tile tile = tl::make_tile(plan, b, t);
      int pairs = 0;
      for (int vs = 0; vs < visit_capacity; ++vs) {
        int vpos[3];
        const bool valid_v = tl::slot_position(vs, visit_extent, tile.lo, tile.hi, vpos);
        if (valid_v) {
          for (int a = 0; a < 3; ++a) {
            CHECK_ALL(vpos[a] >= 0 && vpos[a] < b.len_g[a]);
            CHECK_ALL(tl::full_index(b.group[a], vpos[a], c.axes[a]) < c.length[a]);
          }
        }
        for (int s = 0; s < own_capacity; ++s) {
          const Owner& o = owners[s];
          if (!o.valid) continue;
          bool related = valid_v;
          for (int a = 0; related && a < 3; ++a) related = o.lo[a] <= vpos[a] && vpos[a] < o.hi[a];
          if (tile.full && vs < (own_queries ? plan.k_slots : plan.q_slots)) {
            CHECK_ALL(valid_v && related);  // a full tile needs no mask
          }
          const bool keep = valid_v && (tile.full || related);
          if (!keep) continue;
          ++pairs;
          const int* qpos = own_queries ? o.pos : vpos;
          const int* kpos = own_queries ? vpos : o.pos;
          i64 qf[3], kf[3];
          for (int a = 0; a < 3; ++a) {
            qf[a] = tl::full_index(b.group[a], qpos[a], c.axes[a]);
            kf[a] = tl::full_index(b.group[a], kpos[a], c.axes[a]);
          }
          const i64 pair = c.flat(qf) * c.tokens + c.flat(kf);
          kept[pair] += 1;
          int r[3];
          for (int a = 0; a < 3; ++a) {
            r[a] = tl::rpb_index(qpos[a], kpos[a], c.axes[a]);
            CHECK_ALL(r[a] >= 0 && r[a] < 2 * c.axes[a].kernel - 1);
          }
          const i64 rpb = (r[0] * (2 * c.axes[1].kernel - 1) + r[1]) * (2 * c.axes[2].kernel - 1) + r[2];
          CHECK_ALL(ref[pair] == 0 || ref[pair] == rpb + 1);
        }
      }
      CHECK_ALL(pairs > 0);  // no visited tile is unreachable
    }
  }
  i64 missed = 0, extra = 0, twice = 0;
  for (i64 i = 0; i < c.tokens * c.tokens; ++i) {
    if (ref[i] && kept[i] == 0) ++missed;
    if (!ref[i] && kept[i] > 0) ++extra;
    if (kept[i] > 1) ++twice;
  }
  CHECK_ALL(missed == 0);
  CHECK_ALL(extra == 0);
  CHECK_ALL(twice == 0);
  report(all_ok, own_queries ? "query-owned schedule" : "key-owned schedule", __LINE__);
#undef CHECK_ALL
}

// The unfused kernels' slot layout (slot_key) and its inverse (key_queries,
// slot_in_window) against the reference.
void run_unfused(const Case& c, const std::vector<int>& ref) {
  i64 slot_stride[3];
  tl::slot_strides(c.axes, slot_stride);
  const i64 slots = c.axes[0].kernel * c.axes[1].kernel * c.axes[2].kernel;
  std::vector<int> seen(c.tokens * c.tokens, 0);
  bool ok = true;
  for (i64 qt = 0; qt < c.tokens; ++qt) {
    i64 q[3];
    c.coords(qt, q);
    for (i64 s = 0; s < slots; ++s) {
      i64 k[3];
      int r[3];
      if (!tl::slot_key(c.axes, q, s, k, r)) continue;
      for (int a = 0; a < 3; ++a) ok = ok && k[a] >= 0 && k[a] < c.length[a];
      if (!ok) break;
      const i64 pair = qt * c.tokens + c.flat(k);
      seen[pair] += 1;
      const i64 rpb = (r[0] * (2 * c.axes[1].kernel - 1) + r[1]) * (2 * c.axes[2].kernel - 1) + r[2];
      ok = ok && ref[pair] == rpb + 1;
    }
  }
  for (i64 i = 0; ok && i < c.tokens * c.tokens; ++i) ok = (ref[i] != 0) == (seen[i] == 1);
  report(ok, "unfused slots", __LINE__);
  // Inverse: the queries listed for each key are exactly its reference
  // queries, and slot_in_window finds the slot that maps back to the key.
  ok = true;
  for (i64 kt = 0; ok && kt < c.tokens; ++kt) {
    i64 k[3], first[3], count[3];
    c.coords(kt, k);
    for (int a = 0; a < 3; ++a) tl::key_queries(k[a], c.axes[a], &first[a], &count[a]);
    i64 listed = 0;
    for (i64 t0 = 0; t0 < count[0]; ++t0)
      for (i64 t1 = 0; t1 < count[1]; ++t1)
        for (i64 t2 = 0; t2 < count[2]; ++t2) {
          const i64 q[3] = {first[0] + t0 * c.axes[0].dilation, first[1] + t1 * c.axes[1].dilation,
                            first[2] + t2 * c.axes[2].dilation};
          ++listed;
          ok = ok && ref[c.flat(q) * c.tokens + kt] != 0;
          i64 slot = 0;
          for (int a = 0; a < 3; ++a) slot += tl::slot_in_window(q[a], k[a], c.axes[a]) * slot_stride[a];
          i64 back[3];
          ok = ok && tl::slot_key(c.axes, q, slot, back, nullptr) && c.flat(back) == kt;
        }
    i64 expected = 0;
    for (i64 qt = 0; qt < c.tokens; ++qt) expected += ref[qt * c.tokens + kt] != 0;
    ok = ok && listed == expected;
  }
  report(ok, "unfused inverse", __LINE__);
}

void run_case(int rank, const AxisParams* axes, i64* cases) {
  for (int a = 0; a < rank; ++a) {
    const AxisParams& p = axes[a];
    if (p.kernel > p.length || p.kernel * p.dilation > p.length || p.stride > p.kernel) return;
  }
  const Case c(rank, axes);
  g_case = c.name();
  const std::vector<int> ref = reference(c);
  for (int bucket : {32, 64, 128, 256}) {
    run_schedule(c, ref, tl::forward_queries(bucket), tl::forward_keys(bucket), true);
    run_schedule(c, ref, tl::dq_queries(bucket), tl::forward_keys(bucket), true);
    run_schedule(c, ref, tl::backward_keys(bucket), tl::backward_queries(bucket), false);
    if (bucket <= tl::kTcMaxHeadDim) {  // the tensor-core forward, dq, dk/dv
      run_schedule(c, ref, tl::tc_forward_queries(), tl::tc_forward_keys(bucket), true);
      run_schedule(c, ref, tl::tc_forward_queries(), tl::tc_dq_keys(bucket), true);
      run_schedule(c, ref, tl::tc_dkdv_keys(), tl::tc_dkdv_queries(bucket), false);
    }
  }
  run_unfused(c, ref);
  ++*cases;
}

}  // namespace

int main() {
  i64 cases[4] = {};
  // rank 1: long and short axes, odd and even kernels, stride up to the kernel
  for (i64 L : {2, 5, 8, 13, 33, 70})
    for (i64 k : {2, 3, 4, 5, 7, 8, 13})
      for (i64 d : {1, 2, 3})
        for (i64 s : {i64(1), i64(2), i64(3), k})
          for (bool causal : {false, true}) {
            const AxisParams ax[1] = {{L, k, s, d, causal}};
            run_case(1, ax, &cases[1]);
          }
  std::printf("rank1: %s (%lld cases)\n", g_failed ? "FAILED" : "ok", static_cast<long long>(cases[1]));
  // rank 2: per-axis kernels, strides, dilations, causal flags
  const i64 shapes2[][2] = {{7, 9}, {12, 5}, {16, 16}, {20, 11}};
  for (const auto& L : shapes2)
    for (i64 k0 : {2, 3, 5})
      for (i64 k1 : {2, 4, 5})
        for (i64 d : {1, 2})
          for (i64 s : {1, 2})
            for (int causal = 0; causal < 4; ++causal) {
              const AxisParams ax[2] = {{L[0], k0, s, d, (causal & 1) != 0},
                                        {L[1], k1, s > 1 ? k1 : 1, d == 2 ? 1 : 2, (causal & 2) != 0}};
              run_case(2, ax, &cases[2]);
            }
  std::printf("rank2: %s (%lld cases)\n", g_failed ? "FAILED" : "ok", static_cast<long long>(cases[2]));
  const i64 shapes3[][3] = {{5, 6, 7}, {8, 4, 9}};
  for (const auto& L : shapes3)
    for (i64 k : {2, 3})
      for (i64 d : {1, 2})
        for (i64 s : {1, 2})
          for (int causal = 0; causal < 8; causal += 3) {
            const AxisParams ax[3] = {{L[0], k, s, d, (causal & 1) != 0},
                                      {L[1], 2, 1, 1, (causal & 2) != 0},
                                      {L[2], k + 1, s, d == 2 ? 1 : 2, (causal & 4) != 0}};
            run_case(3, ax, &cases[3]);
          }
  std::printf("rank3: %s (%lld cases)\n", g_failed ? "FAILED" : "ok", static_cast<long long>(cases[3]));
  std::printf("%lld passed, %lld failed\n", static_cast<long long>(g_passed),
              static_cast<long long>(g_failed));
  return g_failed == 0 ? 0 : 1;
}
