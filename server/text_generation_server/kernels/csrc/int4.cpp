// 4-bit GPTQ weights: the integer kernel (AVX2, and AVX-512 VNNI where the CPU has
// it) and the unpacking to float32 / bfloat16 for prefill products.
#include "common.h"
#include "ops.h"

namespace tgs {

// ---- 4-bit weights --------------------------------------------------------------------
//
// Weights, per output row n, chunks of 64 input features in 16 little-endian
// 16-bit words: word j holds the codes (0..15) of features j, 16 + j, 32 + j
// and 48 + j in its four nibbles, lowest first. Masks and shifts then give
// four vectors of 16 int16 codes, each matching 16 consecutive activations,
// without any shuffle. Rows go four at a time; each four-row tile has its
// scales (fp16) and zero points (uint8) beside it: meta [N / 4, G, 6] int16,
// per group 4 scales then 4 zero bytes, so a tile reads two sequential streams
// (codes, meta) and one group's values are one load. w = s * (q - z); with
// activations x ~ xd * xq per group (int16),
//   y[m, n] = sum_g s_g * xd_mg * (sum_k q_k xq_k) - s_g * z_g * xs_mg,
// where xs is the sum of the quantized group, so the zero point cancels
// exactly what the integer dot product adds. vpmaddwd sums pairs of 16-bit
// products into 32 bits: a chunk adds at most 64 * 15 * 32767 per lane.
// Groups of 32 cover half a chunk (nibbles 0-1 and 2-3).

inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

struct Nibbles {
  __m256i c[4];  // features 0-15, 16-31, 32-47, 48-63 of the chunk as int16
};

inline Nibbles unpack_chunk(const uint16_t* p) {
  const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i m = _mm256_set1_epi16(0x000F);
  return {{_mm256_and_si256(w, m), _mm256_and_si256(_mm256_srli_epi16(w, 4), m),
           _mm256_and_si256(_mm256_srli_epi16(w, 8), m), _mm256_srli_epi16(w, 12)}};
}

struct Int4Args {
  const int16_t* xq;     // [M, K]
  const float* xd;       // [M, G]
  const float* xs;       // [M, G]
  const uint16_t* qw;    // [N, K / 4] words
  const uint16_t* meta;  // [N / 4, G, 6]: 4 fp16 scales, 4 uint8 zeros
  float* y;
  int64_t N, K, G, gs;
};

inline void tile_meta(const uint16_t* meta, __m128* scales, __m128* zeros) {
  *scales = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(meta)));
  uint32_t z4;
  std::memcpy(&z4, meta + 4, 4);
  *zeros = _mm_cvtepi32_ps(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(static_cast<int>(z4))));
}

// Rows n..n+3 against activation rows m0..m0+MT-1; PARTS groups per 64-feature chunk
// (2 for groups of 32). Compile-time sizes keep the accumulators in registers.
template <int MT, int PARTS>
void int4_tile(const Int4Args& a, int64_t n, int64_t m0) {
  const int64_t words = a.K / 4;  // per row
  __m128 total[MT], tail[MT];
  for (int m = 0; m < MT; ++m) total[m] = tail[m] = _mm_setzero_ps();
  const int16_t* xq = a.xq + m0 * a.K;
  const uint16_t* meta = a.meta + (n / 4) * a.G * 6;
  // The next tile's codes, a tile ahead of use: four rows are one contiguous run.
  const char* next = reinterpret_cast<const char*>(a.qw + (n + 4) * words);
  if (n + 4 < a.N)
    for (int64_t off = 0; off < 4 * words * 2; off += 64) _mm_prefetch(next + off, _MM_HINT_T0);
  const int64_t chunks = PARTS == 2 ? 1 : a.gs / 64;  // chunks per group
  int64_t k = 0;  // first feature of the group
  for (int64_t g = 0; g < a.G; g += PARTS) {
    __m256i acc[4][MT][PARTS];
    for (int r = 0; r < 4; ++r)
      for (int m = 0; m < MT; ++m)
        for (int part = 0; part < PARTS; ++part) acc[r][m][part] = _mm256_setzero_si256();
    for (int64_t c = 0; c < chunks; ++c, k += 64) {
      for (int r = 0; r < 4; ++r) {
        const Nibbles q = unpack_chunk(a.qw + (n + r) * words + k / 4);
        for (int m = 0; m < MT; ++m) {
          const int16_t* x = xq + m * a.K + k;
          const __m256i p01 = _mm256_add_epi32(
              _mm256_madd_epi16(q.c[0], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))),
              _mm256_madd_epi16(q.c[1], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16))));
          const __m256i p23 = _mm256_add_epi32(
              _mm256_madd_epi16(q.c[2], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32))),
              _mm256_madd_epi16(q.c[3], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 48))));
          if constexpr (PARTS == 2) {
            acc[r][m][0] = _mm256_add_epi32(acc[r][m][0], p01);
            acc[r][m][PARTS - 1] = _mm256_add_epi32(acc[r][m][PARTS - 1], p23);
          } else {
            acc[r][m][0] = _mm256_add_epi32(acc[r][m][0], _mm256_add_epi32(p01, p23));
          }
        }
      }
    }
    for (int part = 0; part < PARTS; ++part) {
      const int64_t gg = g + part;
      __m128 s, z;
      tile_meta(meta + gg * 6, &s, &z);
      const __m128 sz = _mm_mul_ps(s, z);
      for (int m = 0; m < MT; ++m) {
        const __m128i dots = hsum4(acc[0][m][part], acc[1][m][part], acc[2][m][part], acc[3][m][part]);
        const float xd = a.xd[(m0 + m) * a.G + gg], xs = a.xs[(m0 + m) * a.G + gg];
        total[m] = _mm_fmadd_ps(_mm_cvtepi32_ps(dots), _mm_mul_ps(s, _mm_set1_ps(xd)), total[m]);
        tail[m] = _mm_fmadd_ps(sz, _mm_set1_ps(xs), tail[m]);
      }
    }
  }
  for (int m = 0; m < MT; ++m) _mm_storeu_ps(a.y + (m0 + m) * a.N + n, _mm_sub_ps(total[m], tail[m]));
}

void check_int4(const at::Tensor& qweight, const at::Tensor& meta, int64_t group_size, int64_t K) {
  TORCH_CHECK(qweight.scalar_type() == at::kShort && qweight.dim() == 2 && qweight.is_contiguous(),
              "qweight must be contiguous int16 words [N, K / 4]");
  const int64_t N = qweight.size(0);
  TORCH_CHECK(N % 4 == 0, "the output features (", N, ") must be a multiple of 4");
  TORCH_CHECK(K % 64 == 0, "the input features (", K, ") must be a multiple of 64");
  TORCH_CHECK(qweight.size(1) * 4 == K, "qweight holds ", qweight.size(1) * 4, " features, expected ", K);
  TORCH_CHECK(group_size == 32 || (group_size % 64 == 0 && group_size >= 64),
              "group_size must be 32 or a positive multiple of 64, got ", group_size);
  TORCH_CHECK(K % group_size == 0, "K=", K, " is not a multiple of group_size=", group_size);
  const int64_t G = K / group_size;
  TORCH_CHECK(meta.scalar_type() == at::kShort && meta.is_contiguous() && meta.dim() == 3 && meta.size(0) == N / 4 &&
                  meta.size(1) == G && meta.size(2) == 6,
              "meta must be contiguous int16 [N / 4, K / group_size, 6]");
}

// ---- 4-bit weights, AVX-512 VNNI ------------------------------------------------------
//
// Where the CPU has AVX-512 BW and VNNI, a row's 32 words of chunks c and c+1
// (128 features, one 512-bit load) unpack to four vectors whose low half is
// chunk c's features 16p..16p+15 and whose high half is chunk c+1's; the
// activations are laid out to match once per call (per chunk pair and p:
// chunk c's 16 values, then chunk c+1's), and vpdpwssd multiplies and
// accumulates in one instruction. The integer products and sums are the
// AVX2 kernel's, so both give the same result. Groups of 64 (a pair holds
// two groups, one per half) and multiples of 128 (whole pairs); an odd last
// chunk goes through the AVX2 steps.

#define TGS_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

// 0: the AVX2 kernel; 1: AVX-512 VNNI where the CPU has it (set_int4_isa).
int g_int4_isa = -1;

bool cpu_has_avx512_vnni() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

bool use_avx512(int64_t group_size) {
  if (g_int4_isa < 0) g_int4_isa = cpu_has_avx512_vnni() ? 1 : 0;
  return g_int4_isa == 1 && (group_size == 64 || group_size % 128 == 0);
}

// "auto", "avx2" or "avx512-vnni"; returns the one in use ("avx512-vnni" only where the CPU has it).
std::string set_int4_isa(const std::string& name) {
  TORCH_CHECK(name == "auto" || name == "avx2" || name == "avx512-vnni",
              "int4 ISA must be auto, avx2 or avx512-vnni, got ", name);
  const bool can = cpu_has_avx512_vnni();
  TORCH_CHECK(name != "avx512-vnni" || can, "this CPU has no AVX-512 VNNI (needs avx512f, bw, vl and vnni)");
  g_int4_isa = (name == "avx2" || !can) ? 0 : 1;
  return g_int4_isa == 1 ? "avx512-vnni" : "avx2";
}

// xq [M, K] (natural order) -> the chunk-pair order above; an odd last chunk stays as it is.
void pair_layout(const int16_t* xq, int64_t M, int64_t K, int16_t* xp) {
  const int64_t pairs = K / 128;
  for (int64_t m = 0; m < M; ++m) {
    const int16_t* src = xq + m * K;
    int16_t* dst = xp + m * K;
    for (int64_t q = 0; q < pairs; ++q)
      for (int p = 0; p < 4; ++p)
        for (int h = 0; h < 2; ++h)
          std::memcpy(dst + q * 128 + p * 32 + h * 16, src + (2 * q + h) * 64 + 16 * p, 16 * sizeof(int16_t));
    std::memcpy(dst + pairs * 128, src + pairs * 128, (K - pairs * 128) * sizeof(int16_t));
  }
}

// The scale step of one group for rows n..n+3 (dots: their four integer sums).
inline void group_step(const Int4Args& a, const uint16_t* meta, int64_t g, int64_t m, __m128i dots, __m128& total,
                       __m128& tail) {
  __m128 s, z;
  tile_meta(meta + g * 6, &s, &z);
  const float xd = a.xd[m * a.G + g], xs = a.xs[m * a.G + g];
  total = _mm_fmadd_ps(_mm_cvtepi32_ps(dots), _mm_mul_ps(s, _mm_set1_ps(xd)), total);
  tail = _mm_fmadd_ps(_mm_mul_ps(s, z), _mm_set1_ps(xs), tail);
}

template <int MT>
TGS_AVX512 void int4_tile_512(const Int4Args& a, const int16_t* xp, int64_t n, int64_t m0) {
  const int64_t words = a.K / 4, pairs = a.K / 128;
  __m128 total[MT], tail[MT];
  for (int m = 0; m < MT; ++m) total[m] = tail[m] = _mm_setzero_ps();
  const uint16_t* meta = a.meta + (n / 4) * a.G * 6;
  const char* next = reinterpret_cast<const char*>(a.qw + (n + 4) * words);
  if (n + 4 < a.N)
    for (int64_t off = 0; off < 4 * words * 2; off += 64) _mm_prefetch(next + off, _MM_HINT_T0);
  const __m512i mask = _mm512_set1_epi16(0x000F);
  const int64_t span = a.gs == 64 ? 1 : a.gs / 128;  // pairs per epilogue
  for (int64_t q = 0; q < pairs; q += span) {
    __m512i acc[4][MT];
    for (int r = 0; r < 4; ++r)
      for (int m = 0; m < MT; ++m) acc[r][m] = _mm512_setzero_si512();
    for (int64_t e = q; e < q + span; ++e) {
      for (int r = 0; r < 4; ++r) {
        const __m512i w = _mm512_loadu_si512(a.qw + (n + r) * words + e * 32);
        const __m512i c0 = _mm512_and_si512(w, mask), c1 = _mm512_and_si512(_mm512_srli_epi16(w, 4), mask);
        const __m512i c2 = _mm512_and_si512(_mm512_srli_epi16(w, 8), mask), c3 = _mm512_srli_epi16(w, 12);
        for (int m = 0; m < MT; ++m) {
          const int16_t* x = xp + (m0 + m) * a.K + e * 128;
          __m512i t = _mm512_dpwssd_epi32(acc[r][m], c0, _mm512_loadu_si512(x));
          t = _mm512_dpwssd_epi32(t, c1, _mm512_loadu_si512(x + 32));
          t = _mm512_dpwssd_epi32(t, c2, _mm512_loadu_si512(x + 64));
          acc[r][m] = _mm512_dpwssd_epi32(t, c3, _mm512_loadu_si512(x + 96));
        }
      }
    }
    for (int m = 0; m < MT; ++m) {
      const __m256i lo[4] = {_mm512_castsi512_si256(acc[0][m]), _mm512_castsi512_si256(acc[1][m]),
                             _mm512_castsi512_si256(acc[2][m]), _mm512_castsi512_si256(acc[3][m])};
      const __m256i hi[4] = {_mm512_extracti64x4_epi64(acc[0][m], 1), _mm512_extracti64x4_epi64(acc[1][m], 1),
                             _mm512_extracti64x4_epi64(acc[2][m], 1), _mm512_extracti64x4_epi64(acc[3][m], 1)};
      if (a.gs == 64) {  // the low half is group 2q, the high half group 2q + 1
        group_step(a, meta, 2 * q, m0 + m, hsum4(lo[0], lo[1], lo[2], lo[3]), total[m], tail[m]);
        group_step(a, meta, 2 * q + 1, m0 + m, hsum4(hi[0], hi[1], hi[2], hi[3]), total[m], tail[m]);
      } else {
        const __m128i dots = hsum4(_mm256_add_epi32(lo[0], hi[0]), _mm256_add_epi32(lo[1], hi[1]),
                                   _mm256_add_epi32(lo[2], hi[2]), _mm256_add_epi32(lo[3], hi[3]));
        group_step(a, meta, q * 128 / a.gs, m0 + m, dots, total[m], tail[m]);
      }
    }
  }
  if (a.K % 128) {  // the odd last chunk: a group of 64 of its own
    const int64_t k = a.K - 64, g = k / 64;
    __m256i acc[4][MT];
    for (int r = 0; r < 4; ++r) {
      const Nibbles w = unpack_chunk(a.qw + (n + r) * words + k / 4);
      for (int m = 0; m < MT; ++m) {
        const int16_t* x = xp + (m0 + m) * a.K + k;
        const __m256i p01 = _mm256_add_epi32(
            _mm256_madd_epi16(w.c[0], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))),
            _mm256_madd_epi16(w.c[1], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16))));
        const __m256i p23 = _mm256_add_epi32(
            _mm256_madd_epi16(w.c[2], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32))),
            _mm256_madd_epi16(w.c[3], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 48))));
        acc[r][m] = _mm256_add_epi32(p01, p23);
      }
    }
    for (int m = 0; m < MT; ++m)
      group_step(a, meta, g, m0 + m, hsum4(acc[0][m], acc[1][m], acc[2][m], acc[3][m]), total[m], tail[m]);
  }
  for (int m = 0; m < MT; ++m) _mm_storeu_ps(a.y + (m0 + m) * a.N + n, _mm_sub_ps(total[m], tail[m]));
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& meta, int64_t group_size) {
  check_cpu_float(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [M, K] with contiguous rows");
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  check_int4(qweight, meta, group_size, K);
  const int64_t G = K / group_size;
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  at::Tensor xq = at::empty({M, K}, x.options().dtype(at::kShort));
  at::Tensor xd = at::empty({M, G}, x.options());
  at::Tensor xs = at::empty({M, G}, x.options());
  quantize_groups(x.data_ptr<float>(), x.stride(0), M, K, group_size, xq.data_ptr<int16_t>(), xd.data_ptr<float>(),
                  xs.data_ptr<float>());
  const Int4Args a{xq.data_ptr<int16_t>(),
                   xd.data_ptr<float>(),
                   xs.data_ptr<float>(),
                   reinterpret_cast<const uint16_t*>(qweight.data_ptr<int16_t>()),
                   reinterpret_cast<const uint16_t*>(meta.data_ptr<int16_t>()),
                   y.data_ptr<float>(),
                   N,
                   K,
                   G,
                   group_size};
  if (use_avx512(group_size)) {
    at::Tensor xp = at::empty({M, K}, x.options().dtype(at::kShort));
    pair_layout(xq.data_ptr<int16_t>(), M, K, xp.data_ptr<int16_t>());
    const int16_t* xpp = xp.data_ptr<int16_t>();
    at::parallel_for(0, N / 4, 4, [&](int64_t ub, int64_t ue) {
      for (int64_t u = ub; u < ue; ++u) {
        int64_t m = 0;
        for (; m + 2 <= M; m += 2) int4_tile_512<2>(a, xpp, u * 4, m);
        for (; m < M; ++m) int4_tile_512<1>(a, xpp, u * 4, m);
      }
    });
    return y;
  }
  at::parallel_for(0, N / 4, 4, [&](int64_t ub, int64_t ue) {
    for (int64_t u = ub; u < ue; ++u) {
      int64_t m = 0;
      if (group_size == 32) {
        for (; m < M; ++m) int4_tile<1, 2>(a, u * 4, m);
      } else {
        for (; m + 2 <= M; m += 2) int4_tile<2, 1>(a, u * 4, m);
        for (; m < M; ++m) int4_tile<1, 1>(a, u * 4, m);
      }
    }
  });
  return y;
}

// float32 lanes to bfloat16, rounding to nearest even (finite inputs).
inline __m128i float_to_bf16(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  // packus works within 128-bit lanes: the halves of the result are lanes 0 and 1's four words each.
  const __m256i packed = _mm256_packus_epi32(rounded, rounded);
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0xD8));
}

// The dense [N, K] weights of a 4-bit layer, float32 or (bf16 = true) bfloat16:
// the float matrix product's operand for calls of many rows (prefill).
at::Tensor int4_dequantize_as(const at::Tensor& qweight, const at::Tensor& meta, int64_t group_size, bool bf16) {
  const int64_t N = qweight.size(0), K = qweight.size(1) * 4;
  check_int4(qweight, meta, group_size, K);
  const int64_t G = K / group_size;
  at::Tensor w = at::empty({N, K}, qweight.options().dtype(bf16 ? at::kBFloat16 : at::kFloat));
  const uint16_t* qp = reinterpret_cast<const uint16_t*>(qweight.data_ptr<int16_t>());
  const uint16_t* mp = reinterpret_cast<const uint16_t*>(meta.data_ptr<int16_t>());
  float* wp = bf16 ? nullptr : w.data_ptr<float>();
  uint16_t* bp = bf16 ? reinterpret_cast<uint16_t*>(w.data_ptr<at::BFloat16>()) : nullptr;
  at::parallel_for(0, N, 16, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      for (int64_t k = 0; k < K; k += 64) {
        const Nibbles q = unpack_chunk(qp + n * (K / 4) + k / 4);
        for (int part = 0; part < 4; ++part) {
          const int64_t g = (k + 16 * part) / group_size;
          const uint16_t* tm = mp + ((n / 4) * G + g) * 6;
          const __m256 s = _mm256_set1_ps(half_to_float(tm[n % 4]));
          const __m256 z = _mm256_set1_ps(static_cast<float>(reinterpret_cast<const uint8_t*>(tm + 4)[n % 4]));
          const __m128i lo = _mm256_castsi256_si128(q.c[part]), hi = _mm256_extracti128_si256(q.c[part], 1);
          const __m256 w0 = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(lo)), z), s);
          const __m256 w1 = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(hi)), z), s);
          const int64_t at = n * K + k + 16 * part;
          if (bf16) {
            _mm_storeu_si128(reinterpret_cast<__m128i*>(bp + at), float_to_bf16(w0));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(bp + at + 8), float_to_bf16(w1));
          } else {
            _mm256_storeu_ps(wp + at, w0);
            _mm256_storeu_ps(wp + at + 8, w1);
          }
        }
      }
    }
  });
  return w;
}

at::Tensor int4_dequantize(const at::Tensor& qweight, const at::Tensor& meta, int64_t group_size) {
  return int4_dequantize_as(qweight, meta, group_size, false);
}

at::Tensor int4_dequantize_bf16(const at::Tensor& qweight, const at::Tensor& meta, int64_t group_size) {
  return int4_dequantize_as(qweight, meta, group_size, true);
}

}  // namespace tgs
