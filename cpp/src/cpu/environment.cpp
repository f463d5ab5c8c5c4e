#include "environment.h"

#include <algorithm>
#include <atomic>
#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif

#include "cpu/tuning.h"
#include "libna/na.h"

namespace libna::cpu {
namespace {

int available_cores() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  return std::max(1u, std::thread::hardware_concurrency());
}

// The integer in `variable` when it is one in [low, high] (above high: high),
// else `fallback`, with a message naming the variable, its value and the
// value used instead in `warnings`.
std::int64_t read_integer(const char* variable, const std::string& expected, std::int64_t low,
                          std::int64_t high, std::int64_t fallback, const std::string& fallback_is,
                          std::vector<std::string>& warnings) {
  const char* text = std::getenv(variable);
  if (text == nullptr) return fallback;
  const std::string value = text;
  std::int64_t n = 0;
  // Digits with an optional sign (std::from_chars itself takes no '+').
  const bool plus = value.size() > 1 && value[0] == '+' && value[1] != '-';
  const char* begin = value.data() + (plus ? 1 : 0);
  const char* end = value.data() + value.size();
  const auto [stop, error] = std::from_chars(begin, end, n);
  const bool integer = begin != end && error == std::errc() && stop == end;
  if (integer && low <= n && n <= high) return n;
  std::string used = std::to_string(fallback) + fallback_is;
  if (integer && n > high) {
    fallback = high;
    used = std::to_string(high);
  }
  warnings.push_back(std::string(variable) + "='" + value + "' is not " + expected + "; using " +
                     used + " instead");
  return fallback;
}

// A size in bytes (0 or more) from `variable`, else `fallback` (a whole
// number of MiB, as the warning names it).
std::int64_t read_bytes(const char* variable, std::int64_t fallback,
                        std::vector<std::string>& warnings) {
  return read_integer(variable, "a whole number of bytes (0 or more)", 0,
                      std::numeric_limits<std::int64_t>::max(), fallback,
                      " (" + std::to_string(fallback >> 20) + " MiB, the default)", warnings);
}

// One of `choices` from `variable`; -1 when it is unset, or not one of them
// (then with a message in `warnings` saying that `fallback_is` is used
// instead; `expected` names the choices).
int read_choice(const char* variable, std::initializer_list<int> choices,
                const std::string& expected, const std::string& fallback_is,
                std::vector<std::string>& warnings) {
  const char* text = std::getenv(variable);
  if (text == nullptr) return -1;
  const std::string value(text);
  for (const int choice : choices) {
    if (value == std::to_string(choice)) return choice;
  }
  warnings.push_back(std::string(variable) + "='" + value + "' is not " + expected + "; using " +
                     fallback_is + " instead");
  return -1;
}

struct Parsed {
  Environment settings;
  std::vector<std::string> warnings;
};

const Parsed& parsed() {
  static const Parsed result = [] {
    Parsed p;
    p.settings.num_threads = static_cast<int>(read_integer(
        "LIBNA_NUM_THREADS", "an integer from 1 to " + std::to_string(kMaxNumThreads), 1,
        kMaxNumThreads,
        std::min(available_cores(), kMaxNumThreads), " (the cores this process may use)",
        p.warnings));
    p.settings.saved_probs_bytes =
        read_bytes("LIBNA_CPU_SAVED_PROBS_BYTES", tuning::kDefaultSavedProbsBytes, p.warnings);
    p.settings.row_pairs =
        read_choice("LIBNA_CPU_ROW_PAIRS", {0, 1}, "0 or 1", "the kernel set's choice", p.warnings);
    p.settings.pair_group = std::max(0, read_choice("LIBNA_CPU_PAIR_GROUP", {1, 2, 3}, "1, 2 or 3",
                                                    "the kernel set's choice", p.warnings));
    p.settings.amx = read_choice("LIBNA_CPU_AMX", {0, 1}, "0 or 1", "1 (AMX where the CPU has it)",
                                 p.warnings);
    p.settings.host_cache_bytes =
        read_bytes("LIBNA_HOST_CACHE_BYTES", tuning::kDefaultHostCacheBytes, p.warnings);
    return p;
  }();
  return result;
}

// Whether the warnings have been printed or handed out (each happens once).
std::atomic<bool> warnings_reported{false};

}  // namespace

const std::string& cpu_kernels_variable() {
  static const std::string value = [] {
    const char* text = std::getenv("LIBNA_CPU_KERNELS");
    return std::string(text ? text : "");
  }();
  return value;
}

const Environment& environment() {
  const Parsed& p = parsed();
  if (!p.warnings.empty() && !warnings_reported.exchange(true)) {
    for (const std::string& warning : p.warnings) {
      std::fprintf(stderr, "libna: warning: %s\n", warning.c_str());
    }
  }
  return p.settings;
}

}  // namespace libna::cpu

namespace libna {

std::vector<std::string> environment_warnings() {
  const cpu::Parsed& p = cpu::parsed();
  if (cpu::warnings_reported.exchange(true)) return {};
  return p.warnings;
}

}  // namespace libna
