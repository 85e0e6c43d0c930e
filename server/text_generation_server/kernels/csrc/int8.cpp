// 8-bit weights with per-group scales (the LM head of a quantized model).
#include "common.h"
#include "ops.h"

namespace tgs {

// ---- 8-bit weights --------------------------------------------------------------------
//
// y[m, n] = sum_g ws[n, g] * xd[m, g] * sum_k w_k xq_k, int8 weights against
// int16 activations. A 32-byte load of weights read as 16-bit words gives the
// even features (low bytes, sign-extended by a shift pair) and the odd ones
// (high bytes, arithmetic shift), so activations are laid out per 32-feature
// block as its 16 even features then its 16 odd ones. Rows go four at a
// time, their scales beside each other: [N / 4, G, 4] float32.

// Rows of x [M, K] to int16 like quantize_groups, each 32-feature block
// stored evens first (the order the 8-bit kernel reads weights in).
void quantize_groups_even_odd(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t gs, int16_t* xq,
                              float* xd) {
  std::vector<int16_t> plain(static_cast<size_t>(M * K));
  quantize_groups(x, ldx, M, K, gs, plain.data(), xd, nullptr);
  at::parallel_for(0, M * (K / 32), 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int16_t* src = plain.data() + i * 32;
      int16_t* dst = xq + i * 32;
      for (int j = 0; j < 16; ++j) {
        dst[j] = src[2 * j];
        dst[16 + j] = src[2 * j + 1];
      }
    }
  });
}

struct Int8Args {
  const int16_t* xq;  // [M, K], blocks of 32 as evens then odds
  const float* xd;    // [M, G]
  const int8_t* w;    // [N, K]
  const float* ws;    // [N / 4, G, 4]
  float* y;
  int64_t N, K, G, gs;
};

template <int MT>
void int8_tile(const Int8Args& a, int64_t n, int64_t m0) {
  const int64_t bpg = a.gs / 32;
  __m128 total[MT];
  for (int m = 0; m < MT; ++m) total[m] = _mm_setzero_ps();
  const int16_t* xq = a.xq + m0 * a.K;
  const float* ws = a.ws + (n / 4) * a.G * 4;
  const char* next = reinterpret_cast<const char*>(a.w + (n + 4) * a.K);
  if (n + 4 < a.N)
    for (int64_t off = 0; off < 4 * a.K; off += 64) _mm_prefetch(next + off, _MM_HINT_T0);
  for (int64_t g = 0; g < a.G; ++g) {
    __m256i acc[4][MT];
    for (int r = 0; r < 4; ++r)
      for (int m = 0; m < MT; ++m) acc[r][m] = _mm256_setzero_si256();
    for (int64_t bb = 0; bb < bpg; ++bb) {
      const int64_t k = (g * bpg + bb) * 32;
      for (int r = 0; r < 4; ++r) {
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.w + (n + r) * a.K + k));
        const __m256i even = _mm256_srai_epi16(_mm256_slli_epi16(w, 8), 8);
        const __m256i odd = _mm256_srai_epi16(w, 8);
        for (int m = 0; m < MT; ++m) {
          const int16_t* x = xq + m * a.K + k;
          acc[r][m] = _mm256_add_epi32(
              acc[r][m],
              _mm256_add_epi32(_mm256_madd_epi16(even, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))),
                               _mm256_madd_epi16(odd, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16)))));
        }
      }
    }
    const __m128 s = _mm_loadu_ps(ws + g * 4);
    for (int m = 0; m < MT; ++m) {
      const __m128i dots = hsum4(acc[0][m], acc[1][m], acc[2][m], acc[3][m]);
      total[m] = _mm_fmadd_ps(_mm_cvtepi32_ps(dots), _mm_mul_ps(s, _mm_set1_ps(a.xd[(m0 + m) * a.G + g])), total[m]);
    }
  }
  for (int m = 0; m < MT; ++m) _mm_storeu_ps(a.y + (m0 + m) * a.N + n, total[m]);
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales, int64_t group_size) {
  check_cpu_float(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [M, K] with contiguous rows");
  TORCH_CHECK(weight.scalar_type() == at::kChar && weight.dim() == 2 && weight.is_contiguous(),
              "weight must be contiguous int8 [N, K]");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "weight has ", weight.size(1), " input features, x has ", K);
  TORCH_CHECK(N % 4 == 0, "the output features (", N, ") must be a multiple of 4");
  TORCH_CHECK(group_size % 32 == 0 && group_size >= 32, "group_size must be a positive multiple of 32");
  TORCH_CHECK(K % group_size == 0, "K=", K, " is not a multiple of group_size=", group_size);
  const int64_t G = K / group_size;
  check_cpu_float(scales, "scales");
  TORCH_CHECK(scales.is_contiguous() && scales.dim() == 3 && scales.size(0) == N / 4 && scales.size(1) == G &&
                  scales.size(2) == 4,
              "scales must be contiguous float32 [N / 4, K / group_size, 4]");
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  at::Tensor xq = at::empty({M, K}, x.options().dtype(at::kShort));
  at::Tensor xd = at::empty({M, G}, x.options());
  quantize_groups_even_odd(x.data_ptr<float>(), x.stride(0), M, K, group_size, xq.data_ptr<int16_t>(),
                           xd.data_ptr<float>());
  const Int8Args a{xq.data_ptr<int16_t>(), xd.data_ptr<float>(), weight.data_ptr<int8_t>(), scales.data_ptr<float>(),
                   y.data_ptr<float>(), N, K, G, group_size};
  at::parallel_for(0, N / 4, 16, [&](int64_t ub, int64_t ue) {
    for (int64_t u = ub; u < ue; ++u) {
      int64_t m = 0;
      for (; m + 2 <= M; m += 2) int8_tile<2>(a, u * 4, m);
      for (; m < M; ++m) int8_tile<1>(a, u * 4, m);
    }
  });
  return y;
}

}  // namespace tgs
