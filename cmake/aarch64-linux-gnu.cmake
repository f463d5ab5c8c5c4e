# Cross-compiling for 64-bit ARM Linux with the distribution's cross compiler
# (Debian/Ubuntu: g++-aarch64-linux-gnu, which installs its libraries under
# /usr/aarch64-linux-gnu); programs run under qemu-user. Used by
# scripts/check-aarch64.sh.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)

set(LIBNA_AARCH64_SYSROOT /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH ${LIBNA_AARCH64_SYSROOT})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
# Packages (libna itself, for tests/cpp) come from the cross build's install
# prefix, outside the sysroot.
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)

# ctest runs the test programs through this; -L finds the ARM dynamic loader
# and C++ runtime.
set(CMAKE_CROSSCOMPILING_EMULATOR qemu-aarch64 -L ${LIBNA_AARCH64_SYSROOT})
