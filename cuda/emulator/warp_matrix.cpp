// The warp-level matrix instructions: mma.sync.m16n8k16 (float16/bfloat16
// in, float32 accumulate) and ldmatrix.x4(.trans), by the PTX ISA's fragment
// layouts, each a warp exchange of the lanes' registers or row addresses.
#include <cstring>

#include "internal.h"

namespace libna::emulator {

namespace {

// The register half `half` (0: low) of a 32-bit register as float.
float element(Operand type, std::uint32_t reg, int half) {
  const auto bits = static_cast<std::uint16_t>(half ? reg >> 16 : reg & 0xffffu);
  return type == Operand::f16 ? __half2float(__half{bits}) : __bfloat162float(__nv_bfloat16{bits});
}

struct MmaDeposit {
  std::uint32_t a[4], b[2];
};

}  // namespace

// PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type":
// groupID = lane / 4, threadID_in_group = lane % 4.
//   A (16 x 16): a0..a7 in four registers, low half first; row groupID for
//     a0, a1, a4, a5 and groupID + 8 for a2, a3, a6, a7; column
//     threadID_in_group * 2 + (i % 2), plus 8 for a4..a7.
//   B (16 x 8): b0..b3 in two registers; row (k) threadID_in_group * 2 +
//     (i % 2), plus 8 for b2, b3; column (n) groupID.
//   C, D (16 x 8, f32): c0..c3; row groupID for c0, c1 and groupID + 8 for
//     c2, c3; column threadID_in_group * 2 + (i % 2).
void mma_m16n8k16(Operand type, float* d, const std::uint32_t* a, const std::uint32_t* b) {
  Warp& w = enter_warp_operation(0xffffffffu, "mma.sync");
  MmaDeposit mine;
  std::memcpy(mine.a, a, sizeof(mine.a));
  std::memcpy(mine.b, b, sizeof(mine.b));
  int parity;
  {
    Bookkeeping bookkeeping;
    parity = static_cast<int>(w.barrier.generation & 1);
    if (w.barrier.arrived == 0) w.computed[parity] = false;
  }
  const unsigned char* all = warp_exchange(0xffffffffu, &mine, sizeof(mine));
  Bookkeeping bookkeeping;  // the warp's product, computed once, read by every lane
  if (!w.computed[parity]) {  // the first lane to go on computes the warp's product
    float A[16][16], B[16][8];
    for (int lane = 0; lane < kWarpSize; ++lane) {
      MmaDeposit x;
      std::memcpy(&x, all + kSlotBytes * lane, sizeof(x));
      const int group = lane / 4, in_group = lane % 4;
      for (int i = 0; i < 8; ++i) {
        const int row = group + ((i / 2) % 2 ? 8 : 0);
        const int col = in_group * 2 + i % 2 + (i >= 4 ? 8 : 0);
        A[row][col] = element(type, x.a[i / 2], i % 2);
      }
      for (int i = 0; i < 4; ++i) {
        const int k = in_group * 2 + i % 2 + (i >= 2 ? 8 : 0);
        B[k][group] = element(type, x.b[i / 2], i % 2);
      }
    }
    for (int lane = 0; lane < kWarpSize; ++lane) {
      const int group = lane / 4, in_group = lane % 4;
      for (int i = 0; i < 4; ++i) {
        const int row = group + (i >= 2 ? 8 : 0), col = in_group * 2 + i % 2;
        float sum = 0.f;
        for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
        w.product[parity][lane][i] = sum;
      }
    }
    w.computed[parity] = true;
  }
  for (int i = 0; i < 4; ++i) d[i] += w.product[parity][me().lane][i];
}

// PTX ISA, "ldmatrix": with .x4, lanes 8m .. 8m + 7 give the addresses of
// rows 0..7 of matrix m (8 16-bit elements, 16 contiguous bytes, 16-byte
// aligned, in shared memory). Register m of lane l receives row l / 4,
// elements 2 (l % 4) and 2 (l % 4) + 1 of matrix m (low half first); with
// .trans, element l / 4 of rows 2 (l % 4) and 2 (l % 4) + 1.
void ldmatrix_x4(std::uint32_t* r, const void* row, bool trans) {
  const auto address = reinterpret_cast<std::uintptr_t>(row);
  if (address % 16 != 0) fail("ldmatrix row address not 16-byte aligned");
  {
    Bookkeeping bookkeeping;
    const Block& b = *this_block;
    const auto base = reinterpret_cast<std::uintptr_t>(b.arena.data());
    bool in_shared = false;
    for (const SharedVariable& v : b.shared) {
      if (address >= base + v.offset && address + 16 <= base + v.offset + v.bytes) {
        in_shared = true;
      }
    }
    if (!in_shared) fail("ldmatrix row address outside every shared variable of the block");
  }
  enter_warp_operation(0xffffffffu, "ldmatrix");
  const unsigned char* all = warp_exchange(0xffffffffu, &row, sizeof(row));
  const int lane = lane_id();
  // The lane's reads of the warp's rows are the kernel's shared-memory reads.
  auto row_of = [&](int m, int i) {
    const unsigned char* p;
    std::memcpy(&p, all + kSlotBytes * (8 * m + i), sizeof(p));
    return p;
  };
  for (int m = 0; m < 4; ++m) {
    std::uint16_t half[2];
    for (int h = 0; h < 2; ++h) {
      if (trans) {
        std::memcpy(&half[h], row_of(m, 2 * (lane % 4) + h) + 2 * (lane / 4), 2);
      } else {
        std::memcpy(&half[h], row_of(m, lane / 4) + 2 * (2 * (lane % 4) + h), 2);
      }
    }
    r[m] = static_cast<std::uint32_t>(half[0]) | static_cast<std::uint32_t>(half[1]) << 16;
  }
}

}  // namespace libna::emulator
