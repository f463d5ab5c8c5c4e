// Symbol visibility for the libna shared library.
#pragma once

#if defined(_WIN32)
#  if defined(LIBNA_BUILDING)
#    define LIBNA_API __declspec(dllexport)
#  else
#    define LIBNA_API __declspec(dllimport)
#  endif
#else
#  define LIBNA_API __attribute__((visibility("default")))
#endif
