// Tests of libna's C++ API, against the installed package:
//   (a) axis_window against a brute-force re-derivation of the window rule,
//   (b) every validation failure of na_forward throws the right type, naming
//       the op,
//   (c) float16 / bfloat16 forward against float32 forward on the same values,
//   (d) the thread-count setting, and bitwise identical results on 1 and 2
//       threads,
//   (e) composition: NA over the whole sequence plus additional keys, merged,
//       by hand and in the core (na_forward / na_backward with additional keys),
//       against a naive dense attention loop; its validation errors,
//   (f) the CPU kernel set that build_info reports: the one LIBNA_CPU_KERNELS
//       names, and the portable one off x86-64,
//   (g) the forward, backward and unfused ops in float32 (the vectorised
//       kernels) against float64 (the scalar ones) on the same data,
//   (h) concurrent callers: threads calling forward and backward ops at once,
//       while another changes the thread count, get bitwise the results of
//       lone calls (a ThreadSanitizer build runs this to find races),
//   (i) host memory for outputs: freed large blocks come back for the same
//       size, within LIBNA_HOST_CACHE_BYTES, from threads at once.
// Prints one line per failure and a summary; exits non-zero on any failure.
#include <libna/libna.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <type_traits>
#include <typeinfo>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
#endif

namespace {

int g_passed = 0, g_failed = 0;

void report(bool ok, const std::string& what, const char* file, int line) {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    std::printf("FAILED %s:%d: %s\n", file, line, what.c_str());
  }
}

#define CHECK(cond) report(static_cast<bool>(cond), #cond, __FILE__, __LINE__)
#define CHECK_MSG(cond, msg) report(static_cast<bool>(cond), std::string(#cond) + " -- " + (msg), __FILE__, __LINE__)

using libna::DType;
using libna::NaParams;
using libna::TensorView;
using i64 = std::int64_t;

// ---- (a) axis_window ---------------------------------------------------------

// The keys (full-axis indices) of query i, found by enumeration rather than by
// formula: the stride block of i's group position, its leader (the block
// member at offset floor(s/2), or s-1 when causal, else the block's last
// member), then the window that the leader's rule admits.
std::set<i64> brute_force_keys(i64 L, i64 k, i64 d, i64 s, bool causal, i64 i) {
  const i64 g = i % d;
  std::vector<i64> group;  // full-axis indices of i's group, in order
  for (i64 j = 0; j < L; ++j)
    if (j % d == g) group.push_back(j);
  const i64 Lg = static_cast<i64>(group.size());
  const i64 iq = static_cast<i64>(std::find(group.begin(), group.end(), i) - group.begin());
  std::vector<i64> block;  // group positions sharing i's stride block
  for (i64 p = 0; p < Lg; ++p)
    if (p / s == iq / s) block.push_back(p);
  const std::size_t offset = causal ? s - 1 : s / 2;
  const i64 leader = offset < block.size() ? block[offset] : block.back();
  std::set<i64> keys;
  if (causal) {  // the last k positions up to the leader, cut at the query
    for (i64 p = 0; p <= iq; ++p)
      if (p > leader - k) keys.insert(group[p]);
  } else {  // of the k-long windows inside the group, the one nearest centred on the leader
    i64 best = -1, best_dist = 0;
    for (i64 lo = 0; lo + k <= Lg; ++lo) {
      const i64 dist = std::abs(lo - (leader - k / 2));
      if (best < 0 || dist < best_dist) best = lo, best_dist = dist;
    }
    for (i64 p = best; p < best + k; ++p) keys.insert(group[p]);
  }
  return keys;
}

void test_axis_window() {
  int mismatches = 0, cases = 0;
  for (i64 L = 1; L <= 20; ++L)
    for (i64 k = 2; k <= L; ++k)
      for (i64 d = 1; d <= L / k; ++d)
        for (i64 s = 1; s <= k; ++s)
          for (bool causal : {false, true})
            for (i64 i = 0; i < L; ++i) {
              ++cases;
              const libna::AxisParams p{L, k, s, d, causal};
              const libna::AxisWindow w = libna::axis_window(i, p);
              std::set<i64> got;
              for (i64 t = 0; t < w.count; ++t) got.insert(w.first + t * w.step);
              const std::set<i64> want = brute_force_keys(L, k, d, s, causal, i);
              // rpb index of the first key: (j' - i') + k - 1 in group positions.
              const i64 want_rpb = want.empty() ? -1 : (*want.begin() / d - i / d) + k - 1;
              const bool in_range = w.count >= 1 && w.first >= 0 &&
                                    w.first + (w.count - 1) * w.step < L;
              const bool ok = in_range && w.step == d && got == want && w.rpb_first == want_rpb &&
                              static_cast<i64>(got.size()) == w.count;
              if (!ok && ++mismatches <= 10) {
                std::printf("  axis_window L=%lld k=%lld d=%lld s=%lld causal=%d i=%lld: "
                            "first=%lld step=%lld count=%lld rpb_first=%lld, expected %zu keys "
                            "from %lld, rpb_first=%lld\n",
                            (long long)L, (long long)k, (long long)d, (long long)s, int(causal),
                            (long long)i, (long long)w.first, (long long)w.step,
                            (long long)w.count, (long long)w.rpb_first, want.size(),
                            (long long)(want.empty() ? -1 : *want.begin()), (long long)want_rpb);
              }
            }
  CHECK_MSG(mismatches == 0, std::to_string(mismatches) + " of " + std::to_string(cases) +
                                 " axis_window cases differ from the brute force");
  CHECK(cases > 10000);  // the grid was actually walked
}

// ---- helpers for the forward tests ------------------------------------------------

// IEEE binary16 and bfloat16 bits from float, rounding to nearest even.
std::uint16_t float_to_half(float f) {
  std::uint32_t x;
  std::memcpy(&x, &f, 4);
  const std::uint32_t sign = (x >> 16) & 0x8000u;
  std::uint32_t a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7e00u);  // NaN
  if (a >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // >= 65520: inf
  if (a < 0x38800000u) {  // below 2^-14: subnormal half, in units of 2^-24
    float mag;
    std::memcpy(&mag, &a, 4);
    return static_cast<std::uint16_t>(sign | static_cast<std::uint32_t>(std::nearbyint(mag * 16777216.0f)));
  }
  a += 0xc8000000u + 0xfffu + ((a >> 13) & 1u);  // rebias exponent 127 -> 15, round
  return static_cast<std::uint16_t>(sign | (a >> 13));
}

float half_to_float(std::uint16_t h) {
  const int exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
  float mag;
  if (exponent == 0) mag = std::ldexp(static_cast<float>(mantissa), -24);
  else if (exponent == 31) mag = mantissa ? NAN : INFINITY;
  else mag = std::ldexp(static_cast<float>(mantissa | 0x400), exponent - 25);
  return (h & 0x8000u) ? -mag : mag;
}

std::uint16_t float_to_bf16(float f) {
  std::uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((x >> 16) | 0x40u);
  x += 0x7fffu + ((x >> 16) & 1u);
  return static_cast<std::uint16_t>(x >> 16);
}

float bf16_to_float(std::uint16_t b) {
  const std::uint32_t x = static_cast<std::uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

// Every dtype of LIBNA_FOR_EACH_DTYPE has a name, a size and a CPU kernel:
// an all-zero forward in it gives zeros (a dtype a map forgot fails here).
void test_dtypes() {
  std::set<std::string> names;
  for (const DType dtype : libna::kDTypes) {
    const std::string name = libna::dtype_name(dtype);
    CHECK_MSG(name != "unknown" && names.insert(name).second, name);
    CHECK_MSG(libna::dtype_size(dtype) >= 2 && libna::dtype_size(dtype) <= 8, name);
    CHECK_MSG(libna::dtype_names().find(name) != std::string::npos, libna::dtype_names());
    std::vector<double> q(1 * 6 * 2 * 4, 0.0), out(q.size(), 1.0);  // room for any dtype
    const auto tensor = [&](std::vector<double>& data) {
      return TensorView::contiguous(data.data(), dtype, {1, 6, 2, 4});
    };
    NaParams p;
    p.rank = 1;
    p.kernel_size = {3, 0, 0};
    libna::na_forward(tensor(q), tensor(q), tensor(q), nullptr, tensor(out), nullptr, p);
    const auto* bytes = reinterpret_cast<const unsigned char*>(out.data());
    CHECK_MSG(std::all_of(bytes, bytes + 48 * libna::dtype_size(dtype),
                          [](unsigned char b) { return b == 0; }),
              name + ": the forward of zeros is zero");
  }
  CHECK(names.size() == libna::build_info().dtypes.size());
}

// plan_na_forward validates on data-less views and names its outputs; run
// checks only the outputs it is given, and runs what was planned.
void test_plan() {
  NaParams p;
  p.rank = 1;
  p.kernel_size = {3, 0, 0};
  const TensorView q = TensorView::contiguous(nullptr, DType::float32, {2, 7, 4, 8});
  const TensorView kv = TensorView::contiguous(nullptr, DType::float32, {2, 7, 2, 8});
  const TensorView v = TensorView::contiguous(nullptr, DType::float32, {2, 7, 2, 5});
  const libna::Plan plan = libna::plan_na_forward(q, kv, v, nullptr, p, /*with_lse=*/true);
  CHECK(plan.op() == "na1d" && plan.outputs().size() == 2);
  const libna::Plan::Output& out = plan.outputs()[0];
  CHECK(out.name == "out" && out.wanted && out.spec.ndim == 4 && out.spec.shape[3] == 5);
  CHECK(out.like == 0 && out.last == libna::Plan::Output::Last::input && out.last_value == 2);
  const libna::Plan::Output& lse = plan.outputs()[1];
  CHECK(lse.name == "lse" && lse.wanted && lse.spec.ndim == 3 && lse.spec.dtype == DType::float32);
  CHECK(!libna::plan_na_forward(q, kv, v, nullptr, p, false).outputs()[1].wanted);
  bool threw = false;
  try {  // the inputs have no data: planning is fine, running is not
    std::vector<float> o(2 * 7 * 4 * 5), l(2 * 7 * 4);
    plan.run({TensorView::contiguous(o.data(), DType::float32, {2, 7, 4, 5}),
              TensorView::contiguous(l.data(), DType::float32, {2, 7, 4})});
  } catch (const std::invalid_argument& e) {
    threw = std::string(e.what()).find("[na1d] input q has no data") != std::string::npos;
  }
  CHECK(threw);
  std::vector<float> qd(2 * 7 * 4 * 8, 0.5f), kd(2 * 7 * 2 * 8, 0.25f), vd(2 * 7 * 2 * 5, 2.0f);
  const libna::Plan real = libna::plan_na_forward(
      TensorView::contiguous(qd.data(), DType::float32, {2, 7, 4, 8}),
      TensorView::contiguous(kd.data(), DType::float32, {2, 7, 2, 8}),
      TensorView::contiguous(vd.data(), DType::float32, {2, 7, 2, 5}), nullptr, p, false);
  std::vector<float> o(2 * 7 * 4 * 5, -1.0f);
  threw = false;
  try {  // an output of the wrong shape
    real.run({TensorView::contiguous(o.data(), DType::float32, {2, 7, 4, 4}), TensorView{}});
  } catch (const std::invalid_argument& e) {
    threw = std::string(e.what()).find("output out must have shape (2, 7, 4, 5)") !=
            std::string::npos;
  }
  CHECK(threw);
  real.run({TensorView::contiguous(o.data(), DType::float32, {2, 7, 4, 5}), TensorView{}});
  CHECK(std::all_of(o.begin(), o.end(), [](float x) { return std::abs(x - 2.0f) < 1e-6f; }));
}

void test_converters() {
  CHECK(float_to_half(1.0f) == 0x3c00);
  CHECK(float_to_half(-2.0f) == 0xc000);
  CHECK(float_to_half(65504.0f) == 0x7bff);
  CHECK(float_to_half(65520.0f) == 0x7c00);
  CHECK(float_to_half(std::ldexp(1.0f, -24)) == 0x0001);
  CHECK(float_to_half(std::ldexp(1.0f, -14)) == 0x0400);
  CHECK(float_to_half(1.0f + std::ldexp(1.0f, -11)) == 0x3c00);      // tie -> even
  CHECK(float_to_half(1.0f + 3 * std::ldexp(1.0f, -11)) == 0x3c02);  // tie -> even
  CHECK(half_to_float(0x3555) == 0.333251953125f);
  CHECK(half_to_float(float_to_half(0.1f)) == 0.0999755859375f);
  CHECK(float_to_bf16(1.0f) == 0x3f80);
  CHECK(float_to_bf16(1.0f + std::ldexp(1.0f, -8)) == 0x3f80);  // tie -> even
  CHECK(bf16_to_float(float_to_bf16(-3.0f)) == -3.0f);
  CHECK(bf16_to_float(0x3eab) == 0.333984375f);
}

// One 2D forward problem, with its data as float; run() converts to `dtype`.
struct Problem {
  i64 B, H, W, heads, heads_kv, D, Dv;
  NaParams params;
  bool with_rpb = false;
  std::vector<float> q, k, v, rpb;

  Problem(i64 B_, i64 H_, i64 W_, i64 heads_, i64 heads_kv_, i64 D_, i64 Dv_, NaParams p,
          bool rpb_, unsigned seed)
      : B(B_), H(H_), W(W_), heads(heads_), heads_kv(heads_kv_), D(D_), Dv(Dv_), params(p),
        with_rpb(rpb_) {
    std::mt19937 gen(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    auto fill = [&](std::vector<float>& x, i64 n) {
      x.resize(n);
      for (float& e : x) e = normal(gen);
    };
    fill(q, B * H * W * heads * D);
    fill(k, B * H * W * heads_kv * D);
    fill(v, B * H * W * heads_kv * Dv);
    if (with_rpb) fill(rpb, heads * (2 * p.kernel_size[0] - 1) * (2 * p.kernel_size[1] - 1));
  }

  // Rounds the data to what `dtype` can hold (so float32 sees the same values).
  void round_to(DType dtype) {
    for (auto* x : {&q, &k, &v, &rpb})
      for (float& e : *x)
        e = dtype == DType::float16 ? half_to_float(float_to_half(e))
            : dtype == DType::bfloat16 ? bf16_to_float(float_to_bf16(e))
                                       : e;
  }

  // Runs na_forward in `dtype`; returns out (as float) and lse.
  void run(DType dtype, std::vector<float>& out, std::vector<float>& lse) const {
    const i64 n_out = B * H * W * heads * Dv;
    out.assign(n_out, 0.0f);
    lse.assign(B * H * W * heads, 0.0f);
    const i64 r0 = 2 * params.kernel_size[0] - 1, r1 = 2 * params.kernel_size[1] - 1;
    auto lse_view = TensorView::contiguous(lse.data(), DType::float32, {B, H, W, heads});
    if (dtype == DType::float32) {
      std::vector<float> q_ = q, k_ = k, v_ = v, rpb_ = rpb;
      forward(dtype, q_.data(), k_.data(), v_.data(), rpb_.data(), out.data(), lse_view, r0, r1);
      return;
    }
    auto to16 = [&](const std::vector<float>& x) {
      std::vector<std::uint16_t> y(x.size());
      for (std::size_t i = 0; i < x.size(); ++i)
        y[i] = dtype == DType::float16 ? float_to_half(x[i]) : float_to_bf16(x[i]);
      return y;
    };
    std::vector<std::uint16_t> q16 = to16(q), k16 = to16(k), v16 = to16(v), rpb16 = to16(rpb),
                               out16(n_out);
    forward(dtype, q16.data(), k16.data(), v16.data(), rpb16.data(), out16.data(), lse_view, r0,
            r1);
    for (i64 i = 0; i < n_out; ++i)
      out[i] = dtype == DType::float16 ? half_to_float(out16[i]) : bf16_to_float(out16[i]);
  }

 private:
  void forward(DType dtype, void* q_, void* k_, void* v_, void* rpb_, void* out_,
               const TensorView& lse_view, i64 r0, i64 r1) const {
    const auto qv = TensorView::contiguous(q_, dtype, {B, H, W, heads, D});
    const auto kv = TensorView::contiguous(k_, dtype, {B, H, W, heads_kv, D});
    const auto vv = TensorView::contiguous(v_, dtype, {B, H, W, heads_kv, Dv});
    const auto rv = TensorView::contiguous(rpb_, dtype, {heads, r0, r1});
    const auto ov = TensorView::contiguous(out_, dtype, {B, H, W, heads, Dv});
    libna::na_forward(qv, kv, vv, with_rpb ? &rv : nullptr, ov, &lse_view, params);
  }
};

NaParams params2d(i64 k0, i64 k1, i64 d0 = 1, i64 d1 = 1, i64 s0 = 1, i64 s1 = 1,
                  bool c0 = false, bool c1 = false) {
  NaParams p;
  p.rank = 2;
  p.kernel_size = {k0, k1, 0};
  p.dilation = {d0, d1, 1};
  p.stride = {s0, s1, 1};
  p.is_causal = {c0, c1, false};
  return p;
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double err = 0;
  for (std::size_t i = 0; i < a.size(); ++i) err = std::max(err, std::abs(double(a[i]) - b[i]));
  return err;
}

// ---- (b) validation ------------------------------------------------------------

// Arguments of one na_forward call; every view points into its own slot of
// one buffer, large enough for any of them (mutated or float64), so a check
// that fails to throw cannot read out of bounds. The slots are disjoint: the
// valid call's threads write out and lse at once.
struct Call {
  std::vector<double> buffer = std::vector<double>(1 << 16, 0.0);
  TensorView q, k, v, rpb, out, lse;
  bool use_rpb = false;
  NaParams params = params2d(3, 3);

  Call() {  // a valid call: B=1, 6x7, 4 heads, 2 kv heads, D=8, Dv=5
    auto slot = [this](int i) { return buffer.data() + i * (buffer.size() / 8); };
    const DType f = DType::float32;
    q = TensorView::contiguous(slot(0), f, {1, 6, 7, 4, 8});
    k = TensorView::contiguous(slot(1), f, {1, 6, 7, 2, 8});
    v = TensorView::contiguous(slot(2), f, {1, 6, 7, 2, 5});
    rpb = TensorView::contiguous(slot(3), f, {4, 5, 5});
    out = TensorView::contiguous(slot(4), f, {1, 6, 7, 4, 5});
    lse = TensorView::contiguous(slot(5), f, {1, 6, 7, 4});
  }
  void run() const { libna::na_forward(q, k, v, use_rpb ? &rpb : nullptr, out, &lse, params); }
  void check() const { libna::check_na_forward(q, k, v, use_rpb ? &rpb : nullptr, params); }
};

// Expects `fn` to throw exactly `dtype_error` (when want_dtype_error) or a
// std::invalid_argument that is not one, with the op name ("[na2d]") and
// `keyword` in the message.
void expect_error(const std::string& name, bool want_dtype_error, const char* op,
                  const char* keyword, const std::function<void()>& fn) {
  std::string problem;
  try {
    fn();
    problem = "did not throw";
  } catch (const libna::dtype_error& e) {
    if (!want_dtype_error) problem = std::string("threw dtype_error: ") + e.what();
    else if (!std::strstr(e.what(), op) || !std::strstr(e.what(), keyword))
      problem = std::string("message lacks ") + op + " or '" + keyword + "': " + e.what();
  } catch (const std::invalid_argument& e) {
    if (want_dtype_error) problem = std::string("threw invalid_argument, not dtype_error: ") + e.what();
    else if (!std::strstr(e.what(), op) || !std::strstr(e.what(), keyword))
      problem = std::string("message lacks ") + op + " or '" + keyword + "': " + e.what();
  } catch (const std::exception& e) {
    problem = std::string("threw ") + typeid(e).name() + ": " + e.what();
  } catch (...) {
    problem = "threw a non-std exception";
  }
  CHECK_MSG(problem.empty(), name + ": " + problem);
}

void test_validation() {
  {
    Call c;
    c.use_rpb = true;
    bool ok = true;
    try {
      c.run();
    } catch (const std::exception& e) {
      ok = false;
      std::printf("  valid call threw: %s\n", e.what());
    }
    CHECK_MSG(ok, "the unmodified call is valid");
  }
  struct Bad {
    const char* name;
    bool dtype_error;
    const char* keyword;
    bool input_only;  // check_na_forward must reject it too
    std::function<void(Call&)> mutate;
  };
  const std::vector<Bad> bad = {
      {"kernel 1", false, "kernel_size", true, [](Call& c) { c.params.kernel_size[1] = 1; }},
      {"kernel > extent", false, "kernel_size", true, [](Call& c) { c.params.kernel_size[0] = 7; }},
      {"kernel * dilation > extent", false, "dilation", true,
       [](Call& c) { c.params.dilation[0] = 3; }},
      {"dilation 0", false, "dilation", true, [](Call& c) { c.params.dilation[1] = 0; }},
      {"stride 0", false, "stride", true, [](Call& c) { c.params.stride[0] = 0; }},
      {"stride > kernel", false, "stride", true, [](Call& c) { c.params.stride[1] = 4; }},
      {"q rank wrong", false, "dimensions", true,
       [](Call& c) { c.q = TensorView::contiguous(c.buffer.data(), DType::float32, {6, 7, 4, 8}); }},
      {"spatial rank 4", false, "rank", true, [](Call& c) { c.params.rank = 4; }},  // "[na4d]"
      {"head dim mismatch", false, "head_dim", true, [](Call& c) { c.k.shape[4] = 6; }},
      {"heads not divisible", false, "heads", true, [](Call& c) {
         c.k.shape[3] = 3;
         c.v.shape[3] = 3;
       }},
      {"k spatial mismatch", false, "k shape", true, [](Call& c) { c.k.shape[2] = 6; }},
      {"v heads mismatch", false, "v shape", true, [](Call& c) { c.v.shape[3] = 1; }},
      {"rpb with causal", false, "rpb", true, [](Call& c) {
         c.use_rpb = true;
         c.params.is_causal[0] = true;
       }},
      {"rpb with stride", false, "rpb", true, [](Call& c) {
         c.use_rpb = true;
         c.params.stride[1] = 2;
       }},
      {"rpb wrong shape", false, "rpb", true, [](Call& c) {
         c.use_rpb = true;
         c.rpb.shape[2] = 4;
       }},
      {"rpb wrong heads", false, "rpb", true, [](Call& c) {
         c.use_rpb = true;
         c.rpb.shape[0] = 2;
       }},
      {"zero-size dim", false, "zero-size", true, [](Call& c) {
         for (TensorView* t : {&c.q, &c.k, &c.v, &c.out, &c.lse}) t->shape[0] = 0;
       }},
      {"zero-size head dim", false, "zero-size", true, [](Call& c) { c.v.shape[4] = 0; }},
      {"scale not finite", false, "scale", true, [](Call& c) { c.params.scale = NAN; }},
      {"mixed dtype k", true, "dtype", true, [](Call& c) { c.k.dtype = DType::float64; }},
      {"mixed dtype v", true, "dtype", true, [](Call& c) { c.v.dtype = DType::float16; }},
      {"mixed dtype rpb", true, "dtype", true, [](Call& c) {
         c.use_rpb = true;
         c.rpb.dtype = DType::float64;
       }},
      {"wrong out shape", false, "out", false, [](Call& c) { c.out.shape[4] = 8; }},
      {"wrong out dtype", true, "out", false, [](Call& c) { c.out.dtype = DType::bfloat16; }},
      {"wrong lse shape", false, "lse", false, [](Call& c) { c.lse.shape[3] = 2; }},
      {"wrong lse dtype", true, "lse", false, [](Call& c) { c.lse.dtype = DType::float16; }},
  };
  for (const Bad& b : bad) {
    Call c;
    b.mutate(c);
    const char* op = c.params.rank == 4 ? "[na4d]" : "[na2d]";
    expect_error(std::string("na_forward, ") + b.name, b.dtype_error, op, b.keyword,
                 [&] { c.run(); });
    if (b.input_only) {
      expect_error(std::string("check_na_forward, ") + b.name, b.dtype_error, op, b.keyword,
                   [&] { c.check(); });
    }
  }
}

// ---- (c) half precision ----------------------------------------------------------------

// A configuration of the dtype comparisons (here and in (g)), by name.
struct NamedParams {
  const char* name;
  NaParams params;
  bool rpb;
};

void test_half_precision() {
  const NamedParams configs[] = {
      {"dilated", params2d(3, 5, 2, 1), false},
      {"causal + stride", params2d(3, 5, 2, 1, 2, 3, true, false), false},
      {"rpb", params2d(5, 3, 1, 2), true},
  };
  struct Precision {
    DType dtype;
    const char* name;
    double out_tol, lse_tol;  // out in the dtype, lse in float32
  };
  // Inputs are rounded to the dtype first, so the errors are those of the
  // kernel's arithmetic plus the rounding of out (|out| < 3 here: a few ulp of
  // the dtype); lse is float32 from float32 accumulation in both runs.
  const Precision precisions[] = {{DType::float16, "float16", 3e-3, 1e-4},
                                  {DType::bfloat16, "bfloat16", 2e-2, 1e-4}};
  for (const Precision& pr : precisions)
    for (const NamedParams& cfg : configs) {
      Problem p(2, 9, 10, 4, 2, 16, 8, cfg.params, cfg.rpb, 7);
      p.round_to(pr.dtype);
      std::vector<float> out32, lse32, out16, lse16;
      p.run(DType::float32, out32, lse32);
      p.run(pr.dtype, out16, lse16);
      const double out_err = max_abs_diff(out16, out32), lse_err = max_abs_diff(lse16, lse32);
      std::printf("  %-8s %-16s max |out err| %.2e, max |lse err| %.2e\n", pr.name, cfg.name,
                  out_err, lse_err);
      CHECK_MSG(out_err <= pr.out_tol, std::string(pr.name) + " " + cfg.name + " out");
      CHECK_MSG(lse_err <= pr.lse_tol, std::string(pr.name) + " " + cfg.name + " lse");
    }
}

// ---- (d) threads -------------------------------------------------------------------------

void test_threads() {
  const int initial = libna::get_num_threads();
  CHECK(initial >= 1);
  for (int n : {1, 3, 2}) {
    libna::set_num_threads(n);
    CHECK(libna::get_num_threads() == n);
  }
  for (int n : {0, -1, libna::kMaxNumThreads + 1}) {
    bool threw = false;
    try {
      libna::set_num_threads(n);
    } catch (const std::invalid_argument&) {
      threw = true;
    }
    CHECK_MSG(threw, "set_num_threads(" + std::to_string(n) + ") throws");
  }
  CHECK(libna::get_num_threads() == 2);

  const NaParams configs[] = {params2d(5, 7, 1, 2), params2d(3, 5, 2, 1, 2, 3, true, false)};
  for (const NaParams& params : configs)
    for (DType dtype : {DType::float32, DType::float16}) {
      Problem p(2, 16, 18, 4, 2, 32, 16, params, false, 11);
      std::vector<float> out1, lse1, out2, lse2;
      libna::set_num_threads(1);
      p.run(dtype, out1, lse1);
      libna::set_num_threads(2);
      p.run(dtype, out2, lse2);
      const bool same = out1.size() == out2.size() && lse1.size() == lse2.size() &&
                        std::memcmp(out1.data(), out2.data(), out1.size() * sizeof(float)) == 0 &&
                        std::memcmp(lse1.data(), lse2.data(), lse1.size() * sizeof(float)) == 0;
      CHECK_MSG(same, std::string("1 and 2 threads agree bitwise, ") + libna::dtype_name(dtype));
    }

  // Changing the thread count right after a job, before the new workers
  // have even been scheduled, must neither hang nor lose a job.
  Problem small(1, 4, 9, 2, 2, 8, 8, params2d(3, 3, 1, 1), false, 5);
  std::vector<float> reference_out, reference_lse, out, lse;
  libna::set_num_threads(1);
  small.run(DType::float32, reference_out, reference_lse);
  bool all_same = true;
  for (int i = 0; i < 300; ++i) {
    libna::set_num_threads(2 + i % 3);
    small.run(DType::float32, out, lse);
    all_same = all_same && out == reference_out && lse == reference_lse;
  }
  CHECK_MSG(all_same, "results stay the same while the thread count changes between jobs");

  libna::set_num_threads(initial);
  CHECK(libna::get_num_threads() == initial);
}

// ---- (e) composition ----------------------------------------------------------------

void test_composition() {
  // 1D, kernel = extent (full self-attention), plus N additional keys: the
  // merged result is dense attention over all L + N keys.
  constexpr i64 L = 7, N = 3, heads = 2, D = 4;
  std::mt19937 gen(3);
  std::normal_distribution<double> normal;
  auto random = [&](i64 n) {
    std::vector<double> x(n);
    for (double& e : x) e = normal(gen);
    return x;
  };
  std::vector<double> q = random(L * heads * D), k = random(L * heads * D),
                      v = random(L * heads * D), xk = random(N * heads * D),
                      xv = random(N * heads * D);
  auto view = [](std::vector<double>& x, std::initializer_list<i64> shape) {
    return TensorView::contiguous(x.data(), DType::float64, shape);
  };
  NaParams p;
  p.rank = 1;
  p.kernel_size = {L, 0, 0};
  std::vector<double> na_out(L * heads * D), na_lse(L * heads), x_out(L * heads * D),
      x_lse(L * heads), out(L * heads * D), lse(L * heads);
  const TensorView qv = view(q, {1, L, heads, D}), xkv = view(xk, {1, N, heads, D}),
                   xvv = view(xv, {1, N, heads, D});
  const TensorView na_lse_v = view(na_lse, {1, L, heads}), x_lse_v = view(x_lse, {1, L, heads});
  libna::na_forward(qv, view(k, {1, L, heads, D}), view(v, {1, L, heads, D}), nullptr,
                    view(na_out, {1, L, heads, D}), &na_lse_v, p);
  libna::na_additional_forward(qv, xkv, xvv, view(x_out, {1, L, heads, D}), &x_lse_v, p);
  libna::merge_attentions({view(na_out, {1, L, heads, D}), view(x_out, {1, L, heads, D})},
                          {na_lse_v, x_lse_v}, view(out, {1, L, heads, D}),
                          view(lse, {1, L, heads}));
  double err = 0;
  for (i64 i = 0; i < L; ++i)
    for (i64 h = 0; h < heads; ++h) {
      std::vector<double> logits;
      for (i64 j = 0; j < L + N; ++j) {
        const double* key = j < L ? &k[(j * heads + h) * D] : &xk[((j - L) * heads + h) * D];
        double s = 0;
        for (i64 d = 0; d < D; ++d) s += q[(i * heads + h) * D + d] * key[d];
        logits.push_back(s / std::sqrt(double(D)));
      }
      const double m = *std::max_element(logits.begin(), logits.end());
      double sum = 0;
      for (double& l : logits) sum += (l = std::exp(l - m));
      err = std::max(err, std::abs(lse[i * heads + h] - (m + std::log(sum))));
      for (i64 d = 0; d < D; ++d) {
        double want = 0;
        for (i64 j = 0; j < L + N; ++j) {
          want += logits[j] / sum * (j < L ? v[(j * heads + h) * D + d]
                                           : xv[((j - L) * heads + h) * D + d]);
        }
        err = std::max(err, std::abs(out[(i * heads + h) * D + d] - want));
      }
    }
  CHECK_MSG(err < 1e-12, "merged NA + additional keys vs dense loop, error " + std::to_string(err));

  // The same composed in the core: na_forward with additional keys, with lse
  // and without (the lse workspace then comes from the core), and its backward.
  const TensorView kv = view(k, {1, L, heads, D}), vv = view(v, {1, L, heads, D});
  std::vector<double> c_out(L * heads * D), c_lse(L * heads), c_out2(L * heads * D);
  const TensorView c_lse_v = view(c_lse, {1, L, heads});
  libna::na_forward(qv, kv, vv, nullptr, view(c_out, {1, L, heads, D}), &c_lse_v, p, nullptr,
                    &xkv, &xvv);
  libna::na_forward(qv, kv, vv, nullptr, view(c_out2, {1, L, heads, D}), nullptr, p, nullptr,
                    &xkv, &xvv);
  double composed_err = 0;
  for (std::size_t i = 0; i < out.size(); ++i) {
    composed_err = std::max({composed_err, std::abs(c_out[i] - out[i]), std::abs(c_out2[i] - out[i])});
  }
  for (std::size_t i = 0; i < lse.size(); ++i) composed_err = std::max(composed_err, std::abs(c_lse[i] - lse[i]));
  CHECK_MSG(composed_err < 1e-12, "na_forward with additional keys vs the three ops, error " +
                                      std::to_string(composed_err));
  {
    const libna::Plan plan = libna::plan_na_forward(qv, kv, vv, nullptr, p, false, &xkv, &xvv);
    CHECK_MSG(plan.outputs()[1].wanted && plan.outputs()[1].workspace,
              "without lse, additional keys make lse a workspace output");
    CHECK(libna::plan_na_forward(qv, kv, vv, nullptr, p, false).outputs()[1].wanted == false);
  }
  std::vector<double> dout = random(L * heads * D);
  const TensorView outv = view(out, {1, L, heads, D}), doutv = view(dout, {1, L, heads, D}),
                   lsev = view(lse, {1, L, heads});
  using Buffer = std::vector<double>;
  Buffer dq(L * heads * D), dk(L * heads * D), dv(L * heads * D), x_dq(L * heads * D),
      dxk(N * heads * D), dxv(N * heads * D), c_dq(L * heads * D), c_dk(L * heads * D),
      c_dv(L * heads * D), c_dxk(N * heads * D), c_dxv(N * heads * D);
  libna::na_backward(qv, kv, vv, nullptr, outv, doutv, lsev, view(dq, {1, L, heads, D}),
                     view(dk, {1, L, heads, D}), view(dv, {1, L, heads, D}), nullptr, p);
  libna::na_additional_backward(qv, xkv, xvv, outv, doutv, lsev, view(x_dq, {1, L, heads, D}),
                                view(dxk, {1, N, heads, D}), view(dxv, {1, N, heads, D}), p);
  const TensorView c_dxk_v = view(c_dxk, {1, N, heads, D}), c_dxv_v = view(c_dxv, {1, N, heads, D});
  libna::na_backward(qv, kv, vv, nullptr, outv, doutv, lsev, view(c_dq, {1, L, heads, D}),
                     view(c_dk, {1, L, heads, D}), view(c_dv, {1, L, heads, D}), nullptr, p,
                     nullptr, nullptr, &xkv, &xvv, &c_dxk_v, &c_dxv_v);
  double grad_err = 0;
  for (std::size_t i = 0; i < dq.size(); ++i) {
    grad_err = std::max({grad_err, std::abs(c_dq[i] - (dq[i] + x_dq[i])), std::abs(c_dk[i] - dk[i]),
                         std::abs(c_dv[i] - dv[i])});
  }
  for (std::size_t i = 0; i < dxk.size(); ++i) {
    grad_err = std::max({grad_err, std::abs(c_dxk[i] - dxk[i]), std::abs(c_dxv[i] - dxv[i])});
  }
  CHECK_MSG(grad_err < 1e-12, "na_backward with additional keys vs the two backward ops, error " +
                                  std::to_string(grad_err));
  expect_error("additional keys without values", false, "[na1d]", "additional_values", [&] {
    libna::plan_na_forward(qv, kv, vv, nullptr, p, true, &xkv, nullptr);
  });
  expect_error("additional values head_dim_v vs v", false, "[na1d]", "head_dim_v", [&] {
    TensorView bad = xvv;
    bad.shape[3] = D - 1;
    libna::plan_na_forward(qv, kv, vv, nullptr, p, true, &xkv, &bad);
  });
  expect_error("additional keys' gradients missing", false, "[na1d_backward]", "d_additional_keys", [&] {
    libna::na_backward(qv, kv, vv, nullptr, outv, doutv, lsev, view(c_dq, {1, L, heads, D}),
                       view(c_dk, {1, L, heads, D}), view(c_dv, {1, L, heads, D}), nullptr, p,
                       nullptr, nullptr, &xkv, &xvv);
  });

  expect_error("additional_keys batch", false, "[na1d]", "additional_keys", [&] {
    TensorView bad = xkv;
    bad.shape[0] = 2;
    libna::check_na_additional_forward(qv, bad, xvv, p);
  });
  expect_error("additional_values head_dim_v vs out", false, "[na1d]", "out", [&] {
    libna::na_additional_forward(qv, xkv, xvv, view(x_out, {1, L, heads, D - 1}), nullptr, p);
  });
  expect_error("additional dtype", true, "[na1d]", "dtype", [&] {
    TensorView bad = xkv;
    bad.dtype = DType::float32;
    libna::check_na_additional_forward(qv, bad, xvv, p);
  });
  expect_error("merge nothing", false, "[merge_attentions]", "outs",
               [&] { libna::check_merge_attentions({}, {}); });
  expect_error("merge lse dtype", true, "[merge_attentions]", "lses[1]", [&] {
    TensorView bad = x_lse_v;
    bad.dtype = DType::float32;
    libna::check_merge_attentions({qv, qv}, {na_lse_v, bad});
  });
}

// ---- (f) CPU kernel set ------------------------------------------------------

void test_cpu_kernels() {
  const libna::BuildInfo info = libna::build_info();
  CHECK(info.cpu_kernels == "avx512" || info.cpu_kernels == "avx2" ||
        info.cpu_kernels == "portable");
  CHECK((info.cpu_kernels == "avx2") == (info.simd == "avx2+fma"));
  CHECK((info.cpu_kernels == "avx512") == (info.simd == "avx512+fma"));
  const char* forced = std::getenv("LIBNA_CPU_KERNELS");
  if (forced && *forced && std::string(forced) != "auto") CHECK(info.cpu_kernels == forced);
#if !defined(__x86_64__) && !defined(_M_X64)
  CHECK(info.cpu_kernels == "portable");
#endif
}

// ---- (g) vectorised against scalar kernels -------------------------------------
// float32 runs the vectorised kernels and float64 the scalar ones, which share
// no code with them; on ARM this is the C++ tests' check of the portable
// kernels' backward and unfused ops (scripts/check-aarch64.sh).

// The outputs of every op on the data of `p` in T, with random output
// gradients and attention weights, one after another: the forward's out and
// lse, dq, dk, dv and drpb, then (stride 1 only) na_qk, na_av and their
// backward's gradients.
template <typename T>
std::vector<double> every_op(const Problem& p) {
  const DType dt = std::is_same_v<T, float> ? DType::float32 : DType::float64;
  const i64 B = p.B, H = p.H, W = p.W, h = p.heads, hk = p.heads_kv, D = p.D, Dv = p.Dv;
  const i64 r0 = 2 * p.params.kernel_size[0] - 1, r1 = 2 * p.params.kernel_size[1] - 1;
  const i64 window = p.params.window_size();
  std::mt19937 gen(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto random = [&](i64 n) {
    std::vector<T> x(n);
    for (T& e : x) e = normal(gen);
    return x;
  };
  auto copy = [](const std::vector<float>& x) { return std::vector<T>(x.begin(), x.end()); };
  std::vector<T> q = copy(p.q), k = copy(p.k), v = copy(p.v), rpb = copy(p.rpb);
  std::vector<T> dout = random(B * H * W * h * Dv), attn = random(B * H * W * h * window),
                 dattn = random(B * H * W * h * window);
  std::vector<T> out(dout.size()), lse(B * H * W * h), dq(q.size()), dk(k.size()), dv(v.size()),
      drpb(rpb.size()), attn_out(attn.size()), dattn_out(attn.size());
  const auto qv = TensorView::contiguous(q.data(), dt, {B, H, W, h, D});
  const auto kv = TensorView::contiguous(k.data(), dt, {B, H, W, hk, D});
  const auto vv = TensorView::contiguous(v.data(), dt, {B, H, W, hk, Dv});
  const auto rv = TensorView::contiguous(rpb.data(), dt, {h, r0, r1});
  const auto drv = TensorView::contiguous(drpb.data(), dt, {h, r0, r1});
  const auto ov = TensorView::contiguous(out.data(), dt, {B, H, W, h, Dv});
  const auto dov = TensorView::contiguous(dout.data(), dt, {B, H, W, h, Dv});
  const auto lv = TensorView::contiguous(lse.data(), dt, {B, H, W, h});
  const auto dqv = TensorView::contiguous(dq.data(), dt, {B, H, W, h, D});
  const auto dkv = TensorView::contiguous(dk.data(), dt, {B, H, W, hk, D});
  const auto dvv = TensorView::contiguous(dv.data(), dt, {B, H, W, hk, Dv});
  const auto av = TensorView::contiguous(attn.data(), dt, {B, H, W, h, window});
  const auto dav = TensorView::contiguous(dattn.data(), dt, {B, H, W, h, window});
  const auto aov = TensorView::contiguous(attn_out.data(), dt, {B, H, W, h, window});
  const auto daov = TensorView::contiguous(dattn_out.data(), dt, {B, H, W, h, window});
  const TensorView* rpb_v = p.with_rpb ? &rv : nullptr;
  const TensorView* drpb_v = p.with_rpb ? &drv : nullptr;

  std::vector<double> results;
  auto keep = [&](const std::vector<T>& x) { results.insert(results.end(), x.begin(), x.end()); };
  libna::na_forward(qv, kv, vv, rpb_v, ov, &lv, p.params);
  libna::na_backward(qv, kv, vv, rpb_v, ov, dov, lv, dqv, dkv, dvv, drpb_v, p.params);
  for (const auto* x : {&out, &lse, &dq, &dk, &dv, &drpb}) keep(*x);
  if (p.params.stride[0] == 1 && p.params.stride[1] == 1) {
    libna::na_qk(qv, kv, rpb_v, aov, p.params);
    libna::na_av(av, vv, ov, p.params);
    libna::na_qk_backward(dav, qv, kv, dqv, dkv, drpb_v, p.params);
    libna::na_av_backward(dov, av, vv, daov, dvv, p.params);
    for (const auto* x : {&attn_out, &out, &dq, &dk, &drpb, &dattn_out, &dv}) keep(*x);
  }
  return results;
}

void test_vectorised_against_scalar() {
  const NamedParams configs[] = {
      {"rpb", params2d(5, 3, 1, 2), true},
      {"dilated + causal", params2d(3, 5, 2, 1, 1, 1, true, false), false},
      {"causal + stride", params2d(3, 5, 2, 1, 2, 3, true, false), false},
  };
  for (const NamedParams& cfg : configs) {
    const Problem p(2, 9, 10, 4, 2, 16, 8, cfg.params, cfg.rpb, 3);
    const std::vector<double> vectorised = every_op<float>(p), scalar = every_op<double>(p);
    double err = 0, largest = 1;
    for (std::size_t i = 0; i < scalar.size(); ++i) {
      if (vectorised[i] == scalar[i]) continue;  // also the -inf of unfilled causal slots
      err = std::max(err, std::abs(vectorised[i] - scalar[i]));
    }
    for (double x : scalar)
      if (std::isfinite(x)) largest = std::max(largest, std::abs(x));
    std::printf("  %-16s max |float32 - float64| %.2e of max |x| %.1f\n", cfg.name, err, largest);
    // float32 rounding of sums of a few hundred terms, as a fraction of the largest output.
    CHECK_MSG(vectorised.size() == scalar.size() && err <= 1e-5 * largest, cfg.name);
  }
}

// ---- (h) concurrent callers ------------------------------------------------------------

// A float32 tensor that owns its data, and its row-major view: zeros, or
// normal values when seed != 0. Moves keep the view valid; copies would not.
struct Tensor {
  std::vector<float> data;
  TensorView view;

  Tensor(std::initializer_list<i64> shape, unsigned seed = 0)
      : Tensor(TensorView::contiguous(nullptr, DType::float32, shape), seed) {}
  explicit Tensor(const TensorView& like, unsigned seed = 0) : data(like.numel()), view(like) {
    view.data = data.data();
    for (int d = view.ndim - 1; d >= 0; --d)
      view.strides[d] = d == view.ndim - 1 ? 1 : view.strides[d + 1] * view.shape[d + 1];
    std::mt19937 gen(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    if (seed != 0)
      for (float& e : data) e = normal(gen);
  }
  Tensor(Tensor&&) = default;
  Tensor(const Tensor&) = delete;
};

std::vector<float> concatenated(std::initializer_list<const Tensor*> tensors) {
  std::vector<float> all;
  for (const Tensor* t : tensors) all.insert(all.end(), t->data.begin(), t->data.end());
  return all;
}

// One op on fixed inputs, which every caller reads and none writes; each run
// returns fresh outputs, concatenated.
struct ConcurrentOp {
  std::string name;
  std::function<std::vector<float>()> run;
};

// na_backward of one na_forward (run here, once) on q, k, v, dout of `shape`
// [B, *spatial, heads, D], with an rpb of `rpb_shape` unless that is empty.
ConcurrentOp fused_backward_op(const char* name, std::initializer_list<i64> shape,
                               std::initializer_list<i64> rpb_shape, const NaParams& params) {
  struct Inputs {
    Tensor q, k, v, dout, rpb, out, lse;
    const TensorView* rpb_view() const { return rpb.view.ndim ? &rpb.view : nullptr; }
  };
  Tensor out(shape);
  const TensorView lse_shape = out.view.with_last_dim(-1);
  auto in = std::make_shared<const Inputs>(Inputs{Tensor(shape, 1), Tensor(shape, 2),
                                                  Tensor(shape, 3), Tensor(shape, 4),
                                                  Tensor(rpb_shape, 5), std::move(out),
                                                  Tensor(lse_shape)});
  libna::na_forward(in->q.view, in->k.view, in->v.view, in->rpb_view(), in->out.view,
                    &in->lse.view, params);
  return {name, [in, params] {
            Tensor dq(in->q.view), dk(in->k.view), dv(in->v.view), drpb(in->rpb.view);
            libna::na_backward(in->q.view, in->k.view, in->v.view, in->rpb_view(), in->out.view,
                               in->dout.view, in->lse.view, dq.view, dk.view, dv.view,
                               in->rpb_view() ? &drpb.view : nullptr, params);
            return concatenated({&dq, &dk, &dv, &drpb});
          }};
}

// na_qk_backward and na_av_backward, 2D, kernel 3x3.
ConcurrentOp unfused_backward_op() {
  struct Inputs {
    Tensor q, k, v, attn, dattn, dout;
  };
  const std::initializer_list<i64> qk_shape = {1, 10, 11, 2, 8}, v_shape = {1, 10, 11, 2, 6},
                                   attn_shape = {1, 10, 11, 2, 9};
  auto in = std::make_shared<const Inputs>(Inputs{Tensor(qk_shape, 6), Tensor(qk_shape, 7),
                                                  Tensor(v_shape, 8), Tensor(attn_shape, 9),
                                                  Tensor(attn_shape, 10), Tensor(v_shape, 11)});
  return {"na_qk_backward + na_av_backward 2d", [in] {
            const NaParams params = params2d(3, 3);
            Tensor dq(in->q.view), dk(in->k.view), dattn(in->attn.view), dv(in->v.view);
            libna::na_qk_backward(in->dattn.view, in->q.view, in->k.view, dq.view, dk.view,
                                  nullptr, params);
            libna::na_av_backward(in->dout.view, in->attn.view, in->v.view, dattn.view, dv.view,
                                  params);
            return concatenated({&dq, &dk, &dattn, &dv});
          }};
}

std::vector<ConcurrentOp> concurrent_ops() {
  std::vector<ConcurrentOp> ops;
  auto forward = std::make_shared<const Problem>(2, 12, 13, 4, 2, 16, 8, params2d(5, 3, 1, 2),
                                                 true, 21);
  for (DType dtype : {DType::float32, DType::bfloat16}) {
    ops.push_back({std::string("na_forward 2d ") + libna::dtype_name(dtype), [forward, dtype] {
                     std::vector<float> out, lse;
                     forward->run(dtype, out, lse);
                     out.insert(out.end(), lse.begin(), lse.end());
                     return out;
                   }});
  }
  NaParams dilated1d;
  dilated1d.rank = 1;
  dilated1d.kernel_size = {9, 0, 0};
  dilated1d.dilation = {2, 1, 1};
  ops.push_back(fused_backward_op("na_backward 1d", {1, 300, 2, 32}, {}, dilated1d));
  ops.push_back(fused_backward_op("na_backward 2d rpb", {2, 12, 13, 4, 16}, {4, 9, 5},
                                  params2d(5, 3)));
  ops.push_back(unfused_backward_op());
  return ops;
}

void test_concurrent_callers() {
  const int initial = libna::get_num_threads();
  libna::set_num_threads(2);
  const std::vector<ConcurrentOp> ops = concurrent_ops();
  std::vector<std::vector<float>> lone;
  for (const ConcurrentOp& op : ops) lone.push_back(op.run());

  // Each caller starts at another op, so that different ops overlap; a caller
  // that finds the pool busy runs its job on its own thread.
  constexpr int kCallers = 4, kRounds = 4, kChanges = 8;
  std::vector<std::vector<int>> differ(kCallers, std::vector<int>(ops.size(), 0));
  std::vector<std::string> errors(kCallers);
  std::atomic<int> callers_running{kCallers};
  std::atomic<int> changes{0};  // thread-count changes the setter made
  std::vector<std::thread> callers;
  for (int c = 0; c < kCallers; ++c) {
    callers.emplace_back([&, c] {
      try {
        // At least kRounds rounds, and on until the setter has changed the
        // thread count a few times: on a loaded machine the callers could
        // otherwise finish before the setter thread is first scheduled.
        for (std::size_t i = 0; i < kRounds * ops.size() || changes < kChanges; ++i) {
          const std::size_t op = (c + i) % ops.size();
          differ[c][op] += ops[op].run() != lone[op];
        }
      } catch (const std::exception& e) {
        errors[c] = e.what();
      }
      --callers_running;
    });
  }
  std::thread setter([&] {
    while (callers_running > 0) {
      libna::set_num_threads(1 + changes++ % 4);
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  });
  for (std::thread& t : callers) t.join();
  setter.join();

  for (int c = 0; c < kCallers; ++c) CHECK_MSG(errors[c].empty(), "caller threw: " + errors[c]);
  for (std::size_t op = 0; op < ops.size(); ++op) {
    int runs_that_differ = 0;
    for (int c = 0; c < kCallers; ++c) runs_that_differ += differ[c][op];
    CHECK_MSG(runs_that_differ == 0, ops[op].name + ": " + std::to_string(runs_that_differ) +
                                         " concurrent runs differ from a lone run");
  }
  CHECK_MSG(changes >= kChanges, "the thread count changed while the callers ran");
  libna::set_num_threads(initial);
}

void test_host_memory() {
  libna::empty_host_cache();
  const libna::HostCacheInfo start = libna::host_cache_info();
  CHECK(start.blocks == 0 && start.bytes == 0);
  const std::size_t large = (std::size_t{3} << 20) + 5;  // rounded up to 64 KiB inside
  void* a = libna::host_allocate(large);
  CHECK(reinterpret_cast<std::uintptr_t>(a) % 64 == 0);
  std::memset(a, 1, large);  // all of it is ours
  libna::host_free(a, large);
  if (start.limit >= (std::size_t{4} << 20)) {
    CHECK(libna::host_cache_info().blocks == 1);
    void* b = libna::host_allocate(large + 7);  // the same rounded size: the same block
    CHECK(b == a);
    CHECK(libna::host_cache_info().reused == start.reused + 1);
    libna::host_free(b, large + 7);
  }
  void* small = libna::host_allocate(100);  // not kept
  CHECK(reinterpret_cast<std::uintptr_t>(small) % 64 == 0);
  libna::host_free(small, 100);
  libna::host_free(nullptr, large);

  // Threads allocating, writing and freeing blocks of a few sizes at once.
  std::vector<std::thread> threads;
  std::atomic<int> corrupt{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([t, &corrupt] {
      for (int i = 0; i < 50; ++i) {
        const std::size_t bytes = (std::size_t{1} << 20) * (1 + (t + i) % 3);
        auto* p = static_cast<unsigned char*>(libna::host_allocate(bytes));
        std::memset(p, t, bytes);
        if (p[bytes - 1] != t || p[0] != t) ++corrupt;
        libna::host_free(p, bytes);
      }
    });
  }
  for (std::thread& t : threads) t.join();
  CHECK(corrupt == 0);
#if defined(__unix__) || defined(__APPLE__)
  // fork() while threads allocate and free: every child can allocate and free
  // a cached size (the cache's lock is not left held in it), within 10 s.
  std::atomic<bool> stop{false};
  for (int t = 0; t < 2; ++t) {
    threads[t] = std::thread([&stop] {
      while (!stop) libna::host_free(libna::host_allocate(std::size_t{2} << 20), std::size_t{2} << 20);
    });
  }
  int hung = 0, failed = 0;
  for (int i = 0; i < 20; ++i) {
    const pid_t child = fork();
    if (child == 0) {
      void* p = libna::host_allocate(std::size_t{2} << 20);
      libna::host_free(p, std::size_t{2} << 20);
      _exit(p != nullptr ? 0 : 1);
    }
    int status = 0;
    bool done = false;
    for (int wait = 0; wait < 1000 && !done; ++wait) {  // 10 s
      done = waitpid(child, &status, WNOHANG) == child;
      if (!done) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    if (!done) {
      kill(child, SIGKILL);
      waitpid(child, &status, 0);
      ++hung;
    } else if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      ++failed;
    }
  }
  stop = true;
  for (int t = 0; t < 2; ++t) threads[t].join();
  CHECK_MSG(hung == 0 && failed == 0, std::to_string(hung) + " forked children hung, " +
                                          std::to_string(failed) + " failed");
#endif
  const libna::HostCacheInfo after = libna::host_cache_info();
  CHECK(after.bytes <= after.limit);
  libna::empty_host_cache();
  CHECK(libna::host_cache_info().blocks == 0);
}

}  // namespace

int main() {
  libna::BuildInfo info;
  try {
    info = libna::build_info();
  } catch (const std::exception& e) {  // a LIBNA_CPU_KERNELS that this CPU cannot run
    std::printf("build_info: %s\n", e.what());
    return 2;
  }
  std::printf("libna %s, cpu kernels %s, simd %s\n", info.version.c_str(),
              info.cpu_kernels.c_str(), info.simd.c_str());
  const std::pair<const char*, void (*)()> tests[] = {
      {"axis_window", test_axis_window},   {"converters", test_converters},
      {"validation", test_validation},     {"half_precision", test_half_precision},
      {"threads", test_threads},           {"composition", test_composition},
      {"cpu_kernels", test_cpu_kernels},   {"vectorised_vs_scalar", test_vectorised_against_scalar},
      {"concurrent_callers", test_concurrent_callers}, {"dtypes", test_dtypes},
      {"plan", test_plan},                 {"host_memory", test_host_memory},
  };
  for (const auto& [name, fn] : tests) {
    const int failed_before = g_failed;
    try {
      fn();
    } catch (const std::exception& e) {
      report(false, std::string("unexpected exception: ") + e.what(), __FILE__, __LINE__);
    }
    std::printf("%s: %s\n", name, g_failed == failed_before ? "ok" : "FAILED");
  }
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
