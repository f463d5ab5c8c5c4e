#!/usr/bin/env bash
# Cross-builds libna's C++ core (CPU only: no CUDA, no Python) and the C++
# tests (tests/cpp) for aarch64 with the distribution's cross compiler,
# warnings as errors, and runs the tests under qemu-user: the portable
# kernels as ARM machines run them. tests/test_aarch64.py runs this script.
#
#   scripts/check-aarch64.sh [build-dir]        (default: build/aarch64)
#
# Needs aarch64-linux-gnu-g++ and qemu-aarch64 (Debian/Ubuntu: apt-get install
# g++-aarch64-linux-gnu qemu-user); exits 77 (skipped) without them.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=$(mkdir -p "${1:-$root/build/aarch64}" && cd "${1:-$root/build/aarch64}" && pwd)

for tool in aarch64-linux-gnu-g++ qemu-aarch64; do
  if ! command -v "$tool" >/dev/null; then
    echo "check-aarch64: skipped: $tool is not on PATH" \
         "(apt-get install g++-aarch64-linux-gnu qemu-user)" >&2
    exit 77
  fi
done

configure=(-DCMAKE_TOOLCHAIN_FILE="$root/cmake/aarch64-linux-gnu.cmake"
           -DCMAKE_BUILD_TYPE=Release -DCMAKE_COMPILE_WARNING_AS_ERROR=ON)
if command -v ninja >/dev/null; then configure+=(-G Ninja); fi
jobs=${CMAKE_BUILD_PARALLEL_LEVEL:-2}

cmake -S "$root" -B "$build/core" "${configure[@]}" -DLIBNA_CUDA=OFF -DLIBNA_PYTHON=OFF \
      -DCMAKE_INSTALL_PREFIX="$build/install" -DCMAKE_INSTALL_LIBDIR=lib
cmake --build "$build/core" --parallel "$jobs"
cmake --install "$build/core" >/dev/null

cmake -S "$root/tests/cpp" -B "$build/tests" "${configure[@]}" \
      -Dlibna_DIR="$build/install/lib/cmake/libna"
cmake --build "$build/tests" --parallel "$jobs"
ctest --test-dir "$build/tests" --output-on-failure
