// Pieces shared by libna's Python extension modules (_C and _jax_ffi).
#pragma once

#include <nanobind/nanobind.h>

#include <exception>

#include "libna/na.h"

// libna's dtype_error becomes TypeError (nanobind already maps
// std::invalid_argument to ValueError).
inline void register_dtype_error_as_type_error() {
  nanobind::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const libna::dtype_error& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    }
  });
}
