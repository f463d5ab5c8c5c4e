// Every tuning value of the CPU backend: the sizes of its work items, tiles,
// caches and register blocks. Each one trades speed on one side against
// something on the other; none changes what is computed, except where its
// comment says it fixes a summation order. Plain constants, included
// outside the per-instruction-set target regions: both kernel sets share them.
#pragma once

#include <cstdint>

namespace libna::cpu::tuning {

// ---- threading (thread_pool.cpp, every parallel_for) ---------------------
// Chunks each thread's share of a parallel_for is cut into: more balance the
// load when items cost unequal time, fewer take the shared counter less often.
inline constexpr std::int64_t kChunksPerThread = 4;

// ---- the scalar kernels (float64; kernels.h, backward.h, additional.cpp) --
// Queries (or keys) per work item of the scalar forward and backward: enough
// to amortise the pool's scheduling against fewer items to balance.
inline constexpr std::int64_t kScalarTokensPerTask = 16;
// Queries per block of the scalar backward's query pass; each block owns one
// rpb-gradient partial, summed in block order. Larger blocks: fewer partials
// in memory, less parallelism. Changing it changes the float64 rpb
// gradient's summation order (its last bits).
inline constexpr std::int64_t kScalarQueriesPerBlock = 64;
// Query rows per work item of the additional-keys forward and backward (each
// row reads every additional key): scheduling against balance.
inline constexpr std::int64_t kAdditionalRowsPerTask = 16;
// Rows per work item of merge_attentions and its backward (a few flops per
// row): scheduling against balance.
inline constexpr std::int64_t kMergeRowsPerTask = 64;

// ---- the vectorised kernels' register blocks (micro_kernels.h) -----------
// q.k: key rows and window positions per block of accumulators, 2 x 7 = 14
// f32x8 registers with the q vector and a key load, of the 16 that AVX2 has:
// bigger blocks reuse each q load more but spill.
inline constexpr int kQkKeyRows = 2;
inline constexpr int kQkWindowPositions = 7;
// P.V: head-dim channels accumulated at once, each an f32x8 register: more
// reuse each probability load more, until the accumulators spill.
inline constexpr int kPvChannels = 8;
// Row pairs (pair_kernels.h), whose 16-lane accumulators take two AVX2
// registers or one AVX-512 register (of 32): q.k window positions and P.V
// channels per block, with AVX2 and with AVX-512.
inline constexpr int kPairQkPositions = 4;
inline constexpr int kPairPvChannels = 4;
inline constexpr int kPairQkPositionsWide = 7;
inline constexpr int kPairPvChannelsWide = 8;

// ---- the vectorised kernels' tiles and caches ----------------------------
// Bytes of packed key and value columns a column tile's windows may cover
// (ColumnTiles): they stay in L2 while a thread walks down the tile's rows.
// Smaller tiles fit smaller caches but pack more window edges twice (once per
// tile); this is well under a 512 KiB L2.
inline constexpr std::int64_t kColumnTileBytes = 192 * 1024;
// Windows of packed rows a thread's row cache holds (RowCaches) in the
// forward and in the backward that computes P and dS again: more than one,
// so that consecutive items (rows of a tile, or the next tile's) reuse the
// rows they share; each cached row takes room in L2.
inline constexpr std::int64_t kRowCacheWindows = 2;
// Bytes of a strip of the backward that keeps P and dS (its ring and cached
// rows): above L2, where the rows stream through in order, because each strip
// edge computes P and dS of its neighbours' edge blocks again (measured at
// 56^2 .. 224^2).
inline constexpr std::int64_t kStripBytes = 768 * 1024;
// The fewest lane blocks in such a strip, whatever kStripBytes allows: the
// edge blocks computed twice stay a small share.
inline constexpr std::int64_t kMinStripBlocks = 4;
// The backward keeps P and dS only when its (batch, kv head, strip) items
// keep the threads busy: the items rounded up to a multiple of the threads
// are at most kSavedBalanceNumerator / kSavedBalanceDenominator of them.
// Otherwise it computes P and dS again over finer items (about 1.4x the
// flops, every thread busy).
inline constexpr std::int64_t kSavedBalanceNumerator = 5;
inline constexpr std::int64_t kSavedBalanceDenominator = 4;
// The default of LIBNA_CPU_SAVED_PROBS_BYTES (environment.h): the memory per
// thread the backward may keep P and dS in. More keeps them for bigger
// problems (five products of the head dim per pair instead of seven), at the
// cost of that memory.
inline constexpr std::int64_t kDefaultSavedProbsBytes = std::int64_t{16} << 20;

// Host outputs (host_memory.cpp): the default of LIBNA_HOST_CACHE_BYTES, the
// freed blocks kept for reuse in all, and the size from which a block is kept
// (smaller ones the C allocator's own free lists reuse). A kept block spares
// the next output of its size the page faults of fresh memory (a 51 MB
// output, 112x112 at batch 8 with 4 heads of 32: 12,500 of them, 11 % of the
// forward's time here and 38 % of the backward's), at the cost of that memory
// held while unused.
inline constexpr std::int64_t kDefaultHostCacheBytes = std::int64_t{256} << 20;
inline constexpr std::size_t kHostCachedFrom = std::size_t{1} << 20;

}  // namespace libna::cpu::tuning
