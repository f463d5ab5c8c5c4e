// The CPU backend's LIBNA_* environment variables, read once per process.
#pragma once

#include <cstdint>

namespace libna::cpu {

struct Environment {
  int num_threads;                 // LIBNA_NUM_THREADS, else the cores this process may use
  std::int64_t saved_probs_bytes;  // LIBNA_CPU_SAVED_PROBS_BYTES, else 16 MiB
};

// The first call reads the variables; an invalid value is replaced by the
// default, with one line on stderr for it unless environment_warnings() has
// handed the messages to its caller first (as the Python package does).
const Environment& environment();

}  // namespace libna::cpu
