// Shared by every kernel file: includes, vector helpers and the activation
// quantization the integer kernels use. x86-64 with AVX2, FMA and F16C.
//
// Threads: at::parallel_for, i.e. torch's own intra-op pool, so these kernels
// never add a second set of threads next to torch's.
#pragma once

#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace tgs {

// ---- vector helpers ------------------------------------------------------------------

inline float hsum(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  __m128 sh = _mm_movehdup_ps(lo);
  __m128 s = _mm_add_ps(lo, sh);
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehl_ps(sh, s)));
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

// exp(x) for float32 lanes: range reduction by ln 2 and a degree-6 polynomial
// (Cephes expf coefficients); about 1 ulp over the clamped range.
inline __m256 exp_ps(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-87.3365478515625f);
  x = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
  __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

inline float exp_scalar(float x) {
  alignas(32) float buf[8] = {x, 0, 0, 0, 0, 0, 0, 0};
  _mm256_store_ps(buf, exp_ps(_mm256_load_ps(buf)));
  return buf[0];
}

inline void check_cpu_float(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), what, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == at::kFloat, what, " must be float32, got ", t.scalar_type());
}

// ---- activation quantization ---------------------------------------------------------

// Rows of x [M, K] to int16 with one scale per group of gs (a multiple of 32):
// xd[m, g] = max |x| / 32767 and xs[m, g] = xd * sum(xq), the group's sum as the
// integer kernel sees it. 16 bits keep the product within ~1e-5 of the float
// one, so the kernels' only loss is the weights' own.
inline void quantize_groups(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t gs, int16_t* xq, float* xd,
                     float* xs) {
  const int64_t G = K / gs;
  const __m256 sign = _mm256_set1_ps(-0.0f);
  at::parallel_for(0, M * G, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t m = i / G, g = i % G;
      const float* p = x + m * ldx + g * gs;
      __m256 mx = _mm256_setzero_ps();
      for (int64_t k = 0; k < gs; k += 8) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, _mm256_loadu_ps(p + k)));
      const float d = hmax(mx) / 32767.f;
      xd[i] = d;
      const __m256 inv = _mm256_set1_ps(d > 0.f ? 1.f / d : 0.f);
      __m256i isum = _mm256_setzero_si256();
      int16_t* out = xq + m * K + g * gs;
      for (int64_t k = 0; k < gs; k += 16) {
        const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(p + k), inv));
        const __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(p + k + 8), inv));
        isum = _mm256_add_epi32(isum, _mm256_add_epi32(i0, i1));
        // packs interleaves 128-bit lanes; the permute restores feature order.
        const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(i0, i1), 0xD8);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k), packed);
      }
      if (xs != nullptr) xs[i] = d * hsum(_mm256_cvtepi32_ps(isum));
    }
  });
}

// Sum of the 8 lanes of each of four vectors: [sum(a0), sum(a1), sum(a2), sum(a3)].
inline __m128i hsum4(__m256i a0, __m256i a1, __m256i a2, __m256i a3) {
  const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(a0, a1), _mm256_hadd_epi32(a2, a3));
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

}  // namespace tgs
