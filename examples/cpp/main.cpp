// libna from C++: a 2D neighbourhood-attention forward (with its log-sum-exp)
// on the CPU, checked against a naive loop written straight from the
// definition of NA. Exits non-zero if the two disagree.
#include <libna/libna.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <optional>
#include <random>
#include <string>
#include <vector>

namespace {

// Problem size: q [B, H, W, heads, D], k [B, H, W, heads_kv, D], v [B, H, W, heads_kv, Dv].
constexpr std::int64_t B = 2, H = 9, W = 10, heads = 4, heads_kv = 2, D = 16, Dv = 8;

struct Case {
  const char* name;
  std::int64_t kernel[2];
  std::int64_t dilation[2];
  std::int64_t stride[2];
  bool causal[2];
  bool with_rpb;
  std::optional<double> scale;  // default: D^-0.5
};

// The keys of query i along one axis (full-axis indices) and, for each, its
// rpb index (j' - i') + k - 1. Written from the definition of NA.
struct AxisKeys {
  std::vector<std::int64_t> index, rpb;
};

AxisKeys axis_keys(std::int64_t L, std::int64_t i, std::int64_t k, std::int64_t d,
                   std::int64_t s, bool causal) {
  const std::int64_t g = i % d, iq = i / d;  // dilation group, position in it
  const std::int64_t Lg = (L - g + d - 1) / d;  // group length ceil((L - g) / d)
  std::int64_t lo, hi;                          // window, inclusive, in group positions
  if (causal) {
    const std::int64_t leader = std::min((iq / s) * s + s - 1, Lg - 1);
    lo = std::max<std::int64_t>(0, leader - k + 1);
    hi = iq;
  } else {
    const std::int64_t leader = std::min((iq / s) * s + s / 2, Lg - 1);
    lo = std::clamp<std::int64_t>(leader - k / 2, 0, Lg - k);
    hi = lo + k - 1;
  }
  AxisKeys keys;
  for (std::int64_t j = lo; j <= hi; ++j) {
    keys.index.push_back(g + j * d);
    keys.rpb.push_back(j - iq + k - 1);
  }
  return keys;
}

// out = softmax(scale * q.k + rpb) v over each query's window, lse = log sum exp,
// accumulated in double.
void naive_forward(const Case& c, const std::vector<float>& q, const std::vector<float>& k,
                   const std::vector<float>& v, const std::vector<float>& rpb,
                   std::vector<double>& out, std::vector<double>& lse) {
  const double scale = c.scale ? *c.scale : 1.0 / std::sqrt(double(D));
  const std::int64_t r0 = 2 * c.kernel[0] - 1, r1 = 2 * c.kernel[1] - 1;
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t x = 0; x < H; ++x)
      for (std::int64_t y = 0; y < W; ++y) {
        const AxisKeys kx = axis_keys(H, x, c.kernel[0], c.dilation[0], c.stride[0], c.causal[0]);
        const AxisKeys ky = axis_keys(W, y, c.kernel[1], c.dilation[1], c.stride[1], c.causal[1]);
        for (std::int64_t h = 0; h < heads; ++h) {
          const std::int64_t hk = h / (heads / heads_kv);  // kv head of query head h
          const std::int64_t row = ((b * H + x) * W + y) * heads + h;
          std::vector<double> score;
          std::vector<std::int64_t> key;  // kv row of each score
          for (std::size_t a = 0; a < kx.index.size(); ++a)
            for (std::size_t e = 0; e < ky.index.size(); ++e) {
              const std::int64_t kv_row = ((b * H + kx.index[a]) * W + ky.index[e]) * heads_kv + hk;
              double s = 0;
              for (std::int64_t t = 0; t < D; ++t) s += double(q[row * D + t]) * k[kv_row * D + t];
              s *= scale;
              if (c.with_rpb) s += rpb[(h * r0 + kx.rpb[a]) * r1 + ky.rpb[e]];
              score.push_back(s);
              key.push_back(kv_row);
            }
          const double m = *std::max_element(score.begin(), score.end());
          double sum = 0;
          for (double& s : score) sum += (s = std::exp(s - m));
          for (std::int64_t t = 0; t < Dv; ++t) {
            double acc = 0;
            for (std::size_t n = 0; n < score.size(); ++n) acc += score[n] * v[key[n] * Dv + t];
            out[row * Dv + t] = acc / sum;
          }
          lse[row] = m + std::log(sum);
        }
      }
}

template <typename T, typename U>
double max_abs_diff(const std::vector<T>& a, const std::vector<U>& b) {
  double err = 0;
  for (std::size_t i = 0; i < a.size(); ++i) err = std::max(err, std::abs(double(a[i]) - double(b[i])));
  return err;
}

}  // namespace

int main() {
  const libna::BuildInfo info = libna::build_info();
  std::string backends;
  for (const auto& b : info.backends) backends += (backends.empty() ? "" : ", ") + b;
  std::printf("libna %s (backends: %s; simd: %s; %d threads)\n", info.version.c_str(),
              backends.c_str(), info.simd.c_str(), libna::get_num_threads());

  const Case cases[] = {
      // name                            kernel  dilation stride  causal         rpb    scale
      {"kernel (3, 5), dilation (2, 1)", {3, 5}, {2, 1}, {1, 1}, {false, false}, false, {}},
      {"causal axis 0, stride (2, 3)", {3, 5}, {2, 1}, {2, 3}, {true, false}, false, {}},
      {"rpb, kernel (5, 3), dilation (1, 2)", {5, 3}, {1, 2}, {1, 1}, {false, false}, true, 0.3},
  };

  std::mt19937 gen(0);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  auto random = [&](std::int64_t n) {
    std::vector<float> x(n);
    for (float& e : x) e = uniform(gen);
    return x;
  };
  std::vector<float> q = random(B * H * W * heads * D);
  std::vector<float> k = random(B * H * W * heads_kv * D);
  std::vector<float> v = random(B * H * W * heads_kv * Dv);
  const libna::DType f32 = libna::DType::float32;
  const auto qv = libna::TensorView::contiguous(q.data(), f32, {B, H, W, heads, D});
  const auto kv = libna::TensorView::contiguous(k.data(), f32, {B, H, W, heads_kv, D});
  const auto vv = libna::TensorView::contiguous(v.data(), f32, {B, H, W, heads_kv, Dv});

  const double tolerance = 1e-5;
  bool ok = true;
  for (const Case& c : cases) {
    libna::NaParams p;
    p.rank = 2;
    p.kernel_size = {c.kernel[0], c.kernel[1], 0};
    p.dilation = {c.dilation[0], c.dilation[1], 1};
    p.stride = {c.stride[0], c.stride[1], 1};
    p.is_causal = {c.causal[0], c.causal[1], false};
    p.scale = c.scale;

    std::vector<float> rpb;
    libna::TensorView rpb_view;
    if (c.with_rpb) {  // [heads, 2*k0 - 1, 2*k1 - 1]
      const std::int64_t r0 = 2 * c.kernel[0] - 1, r1 = 2 * c.kernel[1] - 1;
      rpb = random(heads * r0 * r1);
      rpb_view = libna::TensorView::contiguous(rpb.data(), f32, {heads, r0, r1});
    }

    std::vector<float> out(B * H * W * heads * Dv), lse(B * H * W * heads);
    const auto out_view = libna::TensorView::contiguous(out.data(), f32, {B, H, W, heads, Dv});
    const auto lse_view = libna::TensorView::contiguous(lse.data(), f32, {B, H, W, heads});
    libna::na_forward(qv, kv, vv, c.with_rpb ? &rpb_view : nullptr, out_view, &lse_view, p);

    std::vector<double> want_out(out.size()), want_lse(lse.size());
    naive_forward(c, q, k, v, rpb, want_out, want_lse);
    const double out_err = max_abs_diff(out, want_out), lse_err = max_abs_diff(lse, want_lse);
    const bool pass = out_err <= tolerance && lse_err <= tolerance;
    ok = ok && pass;
    std::printf("%-36s max |out err| %.2e, max |lse err| %.2e: %s\n", c.name, out_err, lse_err,
                pass ? "ok" : "FAILED");
  }
  std::printf(ok ? "all cases match the naive loop\n" : "MISMATCH against the naive loop\n");
  return ok ? 0 : 1;
}
