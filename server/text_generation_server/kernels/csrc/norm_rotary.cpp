// The elementwise work of a decoder layer: RMSNorm (with the residual add),
// rotary embedding in place, SiLU-gate.
#include "common.h"
#include "ops.h"

namespace tgs {

// ---- elementwise ----------------------------------------------------------------------

// out = weight * (x / sqrt(mean(x^2) + eps)), one row at a time.
void rms_row(const float* x, const float* w, float* out, int64_t H, float eps) {
  __m256 ss0 = _mm256_setzero_ps(), ss1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= H; i += 16) {
    const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
    ss0 = _mm256_fmadd_ps(a, a, ss0);
    ss1 = _mm256_fmadd_ps(b, b, ss1);
  }
  float ss = hsum(_mm256_add_ps(ss0, ss1));
  for (; i < H; ++i) ss += x[i] * x[i];
  const float r = 1.f / std::sqrt(ss / static_cast<float>(H) + eps);
  const __m256 rv = _mm256_set1_ps(r);
  i = 0;
  for (; i + 8 <= H; i += 8)
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_loadu_ps(w + i), _mm256_mul_ps(_mm256_loadu_ps(x + i), rv)));
  for (; i < H; ++i) out[i] = w[i] * (x[i] * r);
}

void check_rows(const at::Tensor& x, const at::Tensor& w) {
  check_cpu_float(x, "x");
  check_cpu_float(w, "weight");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be contiguous [T, H]");
  TORCH_CHECK(w.is_contiguous() && w.numel() == x.size(1), "weight must hold H values");
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, weight);
  at::Tensor out = at::empty_like(x);
  const int64_t T = x.size(0), H = x.size(1);
  const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) rms_row(xp + t * H, wp, op + t * H, H, static_cast<float>(eps));
  });
  return out;
}

// residual += x; returns rms_norm(residual).
at::Tensor add_rms_norm_(const at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps) {
  check_rows(x, weight);
  check_rows(residual, weight);
  TORCH_CHECK(x.sizes() == residual.sizes(), "x and residual differ in shape");
  at::Tensor out = at::empty_like(x);
  const int64_t T = x.size(0), H = x.size(1);
  const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>();
  float *rp = residual.data_ptr<float>(), *op = out.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      float* row = rp + t * H;
      const float* add = xp + t * H;
      int64_t i = 0;
      for (; i + 8 <= H; i += 8) _mm256_storeu_ps(row + i, _mm256_add_ps(_mm256_loadu_ps(row + i), _mm256_loadu_ps(add + i)));
      for (; i < H; ++i) row[i] += add[i];
      rms_row(row, wp, op + t * H, H, static_cast<float>(eps));
    }
  });
  return out;
}

// x [T, heads, D] (any row stride, heads D apart) rotated in place by Llama's
// rotate-half rule with cos/sin [T, D]: x * cos + cat(-x2, x1) * sin.
void rotary_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check_cpu_float(x, "x");
  check_cpu_float(cos, "cos");
  check_cpu_float(sin, "sin");
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2), "x must be [T, heads, D] with packed heads");
  const int64_t T = x.size(0), heads = x.size(1), D = x.size(2), half = D / 2;
  TORCH_CHECK(D % 2 == 0, "head_dim must be even");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == T * D && sin.numel() == T * D,
              "cos and sin must be contiguous [T, D]");
  float* xp = x.data_ptr<float>();
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  const int64_t ld = x.stride(0);
  at::parallel_for(0, T * heads, 64, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t t = i / heads, h = i % heads;
      float* v = xp + t * ld + h * D;
      const float *c = cp + t * D, *s = sp + t * D;
      int64_t j = 0;
      for (; j + 8 <= half; j += 8) {
        const __m256 x1 = _mm256_loadu_ps(v + j), x2 = _mm256_loadu_ps(v + half + j);
        const __m256 o1 = _mm256_sub_ps(_mm256_mul_ps(x1, _mm256_loadu_ps(c + j)), _mm256_mul_ps(x2, _mm256_loadu_ps(s + j)));
        const __m256 o2 = _mm256_add_ps(_mm256_mul_ps(x2, _mm256_loadu_ps(c + half + j)),
                                        _mm256_mul_ps(x1, _mm256_loadu_ps(s + half + j)));
        _mm256_storeu_ps(v + j, o1);
        _mm256_storeu_ps(v + half + j, o2);
      }
      for (; j < half; ++j) {
        const float x1 = v[j], x2 = v[half + j];
        v[j] = x1 * c[j] - x2 * s[j];
        v[half + j] = x2 * c[half + j] + x1 * s[half + j];
      }
    }
  });
}

// x [T, 2I] (gate then up) -> gelu_tanh(gate) * up  [T, I], GELU's tanh approximation
// (Gemma's gelu_pytorch_tanh): 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))).
at::Tensor gelu_tanh_mul(const at::Tensor& x) {
  check_cpu_float(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) % 2 == 0, "x must be contiguous [T, 2 * I]");
  const int64_t T = x.size(0), I = x.size(1) / 2;
  at::Tensor out = at::empty({T, I}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  constexpr float kC0 = 0.7978845608028654f, kC1 = 0.044715f;
  const __m256 one = _mm256_set1_ps(1.f), two = _mm256_set1_ps(2.f), half = _mm256_set1_ps(0.5f);
  const __m256 c0 = _mm256_set1_ps(kC0), c1 = _mm256_set1_ps(kC1);
  at::parallel_for(0, T, 4, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const float *g = xp + t * 2 * I, *u = g + I;
      float* o = op + t * I;
      int64_t i = 0;
      for (; i + 8 <= I; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 inner = _mm256_mul_ps(c0, _mm256_fmadd_ps(_mm256_mul_ps(c1, gv), _mm256_mul_ps(gv, gv), gv));
        // tanh(y) = 1 - 2 / (exp(2y) + 1): exact at both ends (exp overflowing to inf gives 1).
        const __m256 th = _mm256_sub_ps(one, _mm256_div_ps(two, _mm256_add_ps(exp_ps(_mm256_mul_ps(two, inner)), one)));
        _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_mul_ps(half, _mm256_mul_ps(gv, _mm256_add_ps(one, th))),
                                              _mm256_loadu_ps(u + i)));
      }
      for (; i < I; ++i) o[i] = 0.5f * g[i] * (1.f + std::tanh(kC0 * (g[i] + kC1 * g[i] * g[i] * g[i]))) * u[i];
    }
  });
  return out;
}

// x [T, 2I] (gate then up) -> silu(gate) * up  [T, I]
at::Tensor silu_mul(const at::Tensor& x) {
  check_cpu_float(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) % 2 == 0, "x must be contiguous [T, 2 * I]");
  const int64_t T = x.size(0), I = x.size(1) / 2;
  at::Tensor out = at::empty({T, I}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const __m256 one = _mm256_set1_ps(1.f), neg = _mm256_set1_ps(-0.0f);
  at::parallel_for(0, T, 4, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const float *g = xp + t * 2 * I, *u = g + I;
      float* o = op + t * I;
      int64_t i = 0;
      for (; i + 8 <= I; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 sig = _mm256_div_ps(gv, _mm256_add_ps(one, exp_ps(_mm256_xor_ps(gv, neg))));
        _mm256_storeu_ps(o + i, _mm256_mul_ps(sig, _mm256_loadu_ps(u + i)));
      }
      for (; i < I; ++i) o[i] = g[i] / (1.f + exp_scalar(-g[i])) * u[i];
    }
  });
  return out;
}

}  // namespace tgs
