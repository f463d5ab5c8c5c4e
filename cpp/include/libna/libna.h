// Umbrella header: everything a C++ application needs.
#pragma once

#include "libna/na.h"
#include "libna/tensor.h"
#include "libna/window.h"
