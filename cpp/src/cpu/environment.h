// The CPU backend's LIBNA_* environment variables, read once per process:
// the only place the library reads its environment.
#pragma once

#include <cstdint>
#include <string>

namespace libna::cpu {

struct Environment {
  int num_threads;                 // LIBNA_NUM_THREADS, else the cores this process may use
  std::int64_t saved_probs_bytes;  // LIBNA_CPU_SAVED_PROBS_BYTES, else 16 MiB (tuning.h)
  // LIBNA_CPU_ROW_PAIRS: 1 computes the fused forward two query rows at a
  // time (pair_kernels.h), 0 one row at a time; unset (-1), the kernel set
  // chooses (pairs with AVX-512, where they are faster). For comparing the
  // two ways, which give bitwise equal results.
  int row_pairs;
  // LIBNA_CPU_PAIR_GROUP: 1, 2 or 3 row pairs the fused forward computes
  // together, sharing their loads (pair_groups.h); unset (0), the kernel set
  // chooses (3 with AVX-512). Results are bitwise equal either way.
  int pair_group;
  // LIBNA_CPU_AMX: 0 keeps the bfloat16 forward off the AMX tiles
  // (amx_forward.cpp); unset (-1) or 1, it runs there where the CPU has them.
  int amx;
  std::int64_t host_cache_bytes;  // LIBNA_HOST_CACHE_BYTES, else 256 MiB (tuning.h)
};

// The first call reads the variables; an invalid value is replaced by the
// default, with one line on stderr for it unless environment_warnings() has
// handed the messages to its caller first (as the Python package does).
const Environment& environment();

// LIBNA_CPU_KERNELS ("" when unset), read at the first call: the first CPU
// op or build_info(), which is later than environment() may be read (the
// kernel set is checked by backend.cpp, which refuses a bad value).
const std::string& cpu_kernels_variable();

}  // namespace libna::cpu
