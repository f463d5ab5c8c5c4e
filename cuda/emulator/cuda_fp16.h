// The CUDA header cuda_fp16.h, as the host emulation provides it (see emulator.h).
#pragma once
#include "emulator.h"
