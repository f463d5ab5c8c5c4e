// The fused forward's q.k inner loop in isolation (AVX-512): how many 16-lane
// FMAs per second each way of sharing the key loads reaches, keys in L1.
// Not part of the build; docs/benchmarks.md ("Groups of row pairs") quotes it:
//
//   g++ -O3 -march=sapphirerapids benchmarks/cpu/qk_inner_loop.cpp -o /tmp/qk && /tmp/qk
//
// Compare with torch.matmul's rate on one thread (16-lane FMAs per second =
// GFLOP/s / 32).
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <vector>

// GCC 12's _mm512_broadcast_f32x8 warns of its own uninitialised temporary.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

typedef float f32x16 __attribute__((vector_size(64)));

static inline f32x16 twice(const float* p) {  // 8 floats in both halves
  return (f32x16)_mm512_broadcast_f32x8(_mm256_loadu_ps(p));
}
static inline f32x16 load(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <int G, int N>
static void store(f32x16 (&acc)[G][N], float* out) {
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < N; ++j) std::memcpy(out + (g * N + j) * 16, &acc[g][j], 64);
}

constexpr int kPositions = 7;

// One pair, its q halves joined in the loop (the pair kernel before groups).
// (q: row a's eight lanes at q + d * 16, row b's at q + d * 16 + 8.)
__attribute__((noinline)) void pair_joining(const float* q, const float* key, long width,
                                            long dim, float* out) {
  const float *qa = q, *qb = q + 8;
  f32x16 acc[1][kPositions] = {};
  for (long d = 0; d < dim; ++d) {
    const f32x16 qd = (f32x16)_mm512_insertf32x8(
        _mm512_castps256_ps512(_mm256_loadu_ps(qa + d * 16)), _mm256_loadu_ps(qb + d * 16), 1);
    for (int j = 0; j < kPositions; ++j) acc[0][j] += qd * twice(key + d * width + j);
  }
  store(acc, out);
}

// G pairs with joined q ([d][16] each) per broadcast key load (groups).
template <int G>
__attribute__((noinline)) void pairs_sharing(const float* q, const float* key, long width,
                                             long dim, float* out) {
  f32x16 acc[G][kPositions] = {};
  for (long d = 0; d < dim; ++d) {
    f32x16 qd[G];
    for (int g = 0; g < G; ++g) qd[g] = load(q + (g * dim + d) * 16);
    for (int j = 0; j < kPositions; ++j) {
      const f32x16 x = twice(key + d * width + j);
      for (int g = 0; g < G; ++g) acc[g][j] += qd[g] * x;
    }
  }
  store(acc, out);
}

// R rows of 16 consecutive query columns: 64-byte unaligned key loads.
template <int R>
__attribute__((noinline)) void wide_rows(const float* q, const float* key, long width, long dim,
                                         float* out) {
  f32x16 acc[R][kPositions] = {};
  for (long d = 0; d < dim; ++d) {
    f32x16 qd[R];
    for (int r = 0; r < R; ++r) qd[r] = load(q + (r * dim + d) * 16);
    for (int j = 0; j < kPositions; ++j) {
      const f32x16 x = load(key + d * width + j);
      for (int r = 0; r < R; ++r) acc[r][j] += qd[r] * x;
    }
  }
  store(acc, out);
}

int main() {
  const long width = 72, dim = 32, rows = 8;
  std::vector<float> key(rows * dim * width + 64, 1.0f), q(4 * dim * 16, 0.5f), out(4 * 8 * 16);
  const int calls = 200000;
  struct Variant {
    const char* name;
    int fmas_per_position;
    void (*run)(const float* q, const float* key, long width, long dim, float* out);
  };
  const Variant variants[] = {
      {"one pair, q halves joined in the loop", 1, pair_joining},
      {"one pair, q joined beforehand", 1, pairs_sharing<1>},
      {"two pairs per key load", 2, pairs_sharing<2>},
      {"three pairs per key load", 3, pairs_sharing<3>},
      {"16 columns of one row, 64-byte key loads", 1, wide_rows<1>},
      {"16 columns of two rows, 64-byte key loads", 2, wide_rows<2>},
  };
  std::printf("| q.k inner loop | G FMA/s |\n|---|---:|\n");
  for (const Variant& v : variants) {
    double best = 1e9;
    for (int round = 0; round < 5; ++round) {
      const auto start = std::chrono::steady_clock::now();
      for (int i = 0; i < calls; ++i) {
        // Lane blocks start every 8 columns, as in a packed row.
        v.run(q.data(), key.data() + (i % rows) * dim * width + (i % 7) * 8 + 2, width, dim,
              out.data());
      }
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() -
                                                          start).count());
    }
    const double fmas = double(calls) * dim * kPositions * v.fmas_per_position;
    std::printf("| %s | %.2f |\n", v.name, fmas / best / 1e9);
  }
}
