// The CUDA header cuda_runtime.h, as the host emulation provides it (see emulator.h).
#pragma once
#include "emulator.h"
