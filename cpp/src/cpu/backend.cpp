// CPU backend entry points: dispatch rank and dtype once, to the kernels
// instantiated per rank in the generated cpu_rank*.cpp files.
#include "backend.h"
#include "dispatch.h"

namespace libna::cpu {

template <int Rank, typename T>
void na_forward(const detail::ForwardArgs&);
template <int Rank, typename T>
void na_qk(const detail::QkArgs&);
template <int Rank, typename T>
void na_av(const detail::AvArgs&);
template <int Rank, typename T>
void na_backward(const detail::BackwardArgs&);
template <int Rank, typename T>
void na_qk_backward(const detail::QkBackwardArgs&);
template <int Rank, typename T>
void na_av_backward(const detail::AvBackwardArgs&);


void na_forward(const detail::ForwardArgs& args) {
  detail::dispatch_rank(args.params.rank, "na_forward", [&](auto rank) {
    detail::dispatch_float_types(args.q.dtype, "na_forward", [&](auto tag) {
      na_forward<decltype(rank)::value, typename decltype(tag)::type>(args);
    });
  });
}

void na_qk(const detail::QkArgs& args) {
  detail::dispatch_rank(args.params.rank, "na_qk", [&](auto rank) {
    detail::dispatch_float_types(args.q.dtype, "na_qk", [&](auto tag) {
      na_qk<decltype(rank)::value, typename decltype(tag)::type>(args);
    });
  });
}

void na_av(const detail::AvArgs& args) {
  detail::dispatch_rank(args.params.rank, "na_av", [&](auto rank) {
    detail::dispatch_float_types(args.attn.dtype, "na_av", [&](auto tag) {
      na_av<decltype(rank)::value, typename decltype(tag)::type>(args);
    });
  });
}

void na_backward(const detail::BackwardArgs& args) {
  detail::dispatch_rank(args.params.rank, "na_backward", [&](auto rank) {
    detail::dispatch_float_types(args.q.dtype, "na_backward", [&](auto tag) {
      na_backward<decltype(rank)::value, typename decltype(tag)::type>(args);
    });
  });
}

void na_qk_backward(const detail::QkBackwardArgs& args) {
  detail::dispatch_rank(args.params.rank, "na_qk_backward", [&](auto rank) {
    detail::dispatch_float_types(args.q.dtype, "na_qk_backward", [&](auto tag) {
      na_qk_backward<decltype(rank)::value, typename decltype(tag)::type>(args);
    });
  });
}

void na_av_backward(const detail::AvBackwardArgs& args) {
  detail::dispatch_rank(args.params.rank, "na_av_backward", [&](auto rank) {
    detail::dispatch_float_types(args.attn.dtype, "na_av_backward", [&](auto tag) {
      na_av_backward<decltype(rank)::value, typename decltype(tag)::type>(args);
    });
  });
}

std::string simd_level() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__)
  return "avx2";
#elif defined(__x86_64__)
  return "sse2 (compiler auto-vectorisation)";
#elif defined(__aarch64__)
  return "neon (compiler auto-vectorisation)";
#else
  return "none";
#endif
}

}  // namespace libna::cpu
