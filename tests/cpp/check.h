// The checks of the host tests of the CUDA kernels' index math
// (test_tiling.cpp, test_mma_layout.cpp): CHECK(cond) counts a pass or
// prints the first 30 failures with the case being run (g_case).
#pragma once

#include <cstdio>
#include <string>

namespace libna_test {

inline long long g_passed = 0, g_failed = 0;
inline std::string g_case;

inline void report(bool ok, const char* what, int line) {
  if (ok) {
    ++g_passed;
  } else if (++g_failed <= 30) {
    std::printf("FAILED line %d: %s [%s]\n", line, what, g_case.c_str());
  }
}

}  // namespace libna_test

#define CHECK(cond) ::libna_test::report(static_cast<bool>(cond), #cond, __LINE__)
