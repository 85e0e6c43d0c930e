// CPU kernels for the decode fast path (x86-64 with AVX2 and FMA).
//
// Registered as torch operators in the `tgs_cpu` namespace and built on first
// use by text_generation_server.kernels. Every operator takes float32
// activations on the CPU; the Python wrappers only call them when that holds
// and otherwise use the plain torch formulation.
//
//  - int4_linear: GPTQ 4-bit weights (repacked once at load) times activations
//    quantized per group to 16 bits, integer dot products (vpmaddwd), the
//    checkpoint's fp16 scale and zero point per (row, group).
//  - int4_dequantize, int4_dequantize_bf16: the same weights unpacked to
//    float32 or bfloat16, the operand of a float matrix product (prefill).
//  - int8_linear: symmetric 8-bit weights, per-group scales (the LM head of a
//    quantized model).
//  - rms_norm, add_rms_norm_, rotary_, silu_mul, write_kv_: the elementwise
//    work of a decoder layer, one pass each instead of several torch ops.
//  - paged_attention_decode: one new query per sequence against its keys and
//    values read in place from the paged cache (no gather copy).
//
// Threads: at::parallel_for, i.e. torch's own intra-op pool, so these kernels
// never add a second set of threads next to torch's.

#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace {

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

void check_cpu_float(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), what, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == at::kFloat, what, " must be float32, got ", t.scalar_type());
}

// ---- activation quantization ---------------------------------------------------------

// Rows of x [M, K] to int16 with one scale per group of gs (a multiple of 32):
// xd[m, g] = max |x| / 32767 and xs[m, g] = xd * sum(xq), the group's sum as the
// integer kernel sees it. 16 bits keep the product within ~1e-5 of the float
// one, so the kernels' only loss is the weights' own.
void quantize_groups(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t gs, int16_t* xq, float* xd,
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

// Sum of the 8 lanes of each of four vectors: [sum(a0), sum(a1), sum(a2), sum(a3)].
inline __m128i hsum4(__m256i a0, __m256i a1, __m256i a2, __m256i a3) {
  const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(a0, a1), _mm256_hadd_epi32(a2, a3));
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
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

// k, v [T, kv_heads, D] (rows any stride) stored at cache rows `slots`.
void write_kv_(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
               const at::Tensor& slots) {
  check_cpu_float(k, "k");
  check_cpu_float(v, "v");
  check_cpu_float(k_cache, "k_cache");
  check_cpu_float(v_cache, "v_cache");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous(), "slots must be contiguous int64");
  const int64_t T = k.size(0), row = k.size(1) * k.size(2);
  TORCH_CHECK(k.stride(2) == 1 && k.stride(1) == k.size(2) && v.stride(2) == 1 && v.stride(1) == v.size(2),
              "k and v must have packed heads");
  TORCH_CHECK(k_cache.numel() % row == 0 && slots.numel() == T, "cache rows do not match k");
  const int64_t rows = k_cache.numel() / row;
  const int64_t* sp = slots.data_ptr<int64_t>();
  float *kc = k_cache.data_ptr<float>(), *vc = v_cache.data_ptr<float>();
  const float *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    const int64_t s = sp[t];
    TORCH_CHECK(s >= 0 && s < rows, "slot ", s, " outside the cache of ", rows, " rows");
    std::memcpy(kc + s * row, kp + t * k.stride(0), row * sizeof(float));
    std::memcpy(vc + s * row, vp + t * v.stride(0), row * sizeof(float));
  }
}

// One query per sequence: q [B, H, D] (packed heads, any row stride) attends
// to the first context_lens[b] tokens of its blocks in k/v cache
// [num_blocks, block_size, KVH, D]; query heads h*G..h*G+G-1 share KV head h.
at::Tensor paged_attention_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale) {
  check_cpu_float(q, "q");
  check_cpu_float(k_cache, "k_cache");
  check_cpu_float(v_cache, "v_cache");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2), "q must be [B, H, D] with packed heads");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes(),
              "k/v caches must be contiguous [blocks, block_size, kv_heads, D]");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.is_contiguous() && block_tables.dim() == 2,
              "block_tables must be contiguous int64 [B, max_blocks]");
  TORCH_CHECK(context_lens.scalar_type() == at::kLong && context_lens.is_contiguous(), "context_lens must be int64");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t NB = k_cache.size(0), BS = k_cache.size(1), KVH = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D, "head_dim of q and cache differ");
  TORCH_CHECK(H % KVH == 0, H, " query heads do not group over ", KVH, " kv heads");
  TORCH_CHECK(D % 8 == 0 && D <= 512, "head_dim must be a multiple of 8 up to 512");
  TORCH_CHECK(block_tables.size(0) == B && context_lens.numel() == B, "one block table and length per sequence");
  const int64_t GQ = H / KVH, MAXB = block_tables.size(1);
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lens[b] >= 1 && lens[b] <= MAXB * BS, "context length ", lens[b], " does not fit the block table");
    for (int64_t j = 0; j < (lens[b] + BS - 1) / BS; ++j)
      TORCH_CHECK(tables[b * MAXB + j] >= 0 && tables[b * MAXB + j] < NB, "block id outside the cache");
  }
  at::Tensor out = at::empty({B, H, D}, q.options());
  const float *qp = q.data_ptr<float>(), *kc = k_cache.data_ptr<float>(), *vc = v_cache.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t ldq = q.stride(0), tok = KVH * D;
  const float sc = static_cast<float>(scale);
  const int64_t nv = D / 8;
  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / KVH, h = task % KVH, L = lens[b];
      scores.resize(static_cast<size_t>(GQ * L));
      const int64_t* table = tables + b * MAXB;
      for (int64_t g = 0; g < GQ; ++g) {
        const float* qh = qp + b * ldq + (h * GQ + g) * D;
        float* srow = scores.data() + g * L;
        float mx = -INFINITY;
        for (int64_t t = 0; t < L; ++t) {
          const float* kt = kc + (table[t / BS] * BS + t % BS) * tok + h * D;
          __m256 acc = _mm256_setzero_ps();
          for (int64_t i = 0; i < nv; ++i) acc = _mm256_fmadd_ps(_mm256_loadu_ps(qh + 8 * i), _mm256_loadu_ps(kt + 8 * i), acc);
          const float s = hsum(acc) * sc;
          srow[t] = s;
          mx = std::max(mx, s);
        }
        const __m256 mv = _mm256_set1_ps(mx);
        __m256 sum = _mm256_setzero_ps();
        int64_t t = 0;
        for (; t + 8 <= L; t += 8) {
          const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(srow + t), mv));
          _mm256_storeu_ps(srow + t, e);
          sum = _mm256_add_ps(sum, e);
        }
        float total = hsum(sum);
        for (; t < L; ++t) {
          srow[t] = exp_scalar(srow[t] - mx);
          total += srow[t];
        }
        const float inv = 1.f / total;
        for (t = 0; t < L; ++t) srow[t] *= inv;
      }
      // out[g] = sum_t p[g, t] v_t, value rows read once for the whole group.
      __m256 acc[64];  // the group's outputs while GQ * D <= 512 floats
      const bool local = GQ * nv <= 64;
      std::vector<float> wide;
      if (!local) wide.assign(static_cast<size_t>(GQ * D), 0.f);
      if (local)
        for (int64_t i = 0; i < GQ * nv; ++i) acc[i] = _mm256_setzero_ps();
      for (int64_t t = 0; t < L; ++t) {
        const float* vt = vc + (table[t / BS] * BS + t % BS) * tok + h * D;
        for (int64_t g = 0; g < GQ; ++g) {
          const __m256 p = _mm256_set1_ps(scores[g * L + t]);
          if (local) {
            for (int64_t i = 0; i < nv; ++i) acc[g * nv + i] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vt + 8 * i), acc[g * nv + i]);
          } else {
            float* w = wide.data() + g * D;
            for (int64_t i = 0; i < nv; ++i)
              _mm256_storeu_ps(w + 8 * i, _mm256_fmadd_ps(p, _mm256_loadu_ps(vt + 8 * i), _mm256_loadu_ps(w + 8 * i)));
          }
        }
      }
      for (int64_t g = 0; g < GQ; ++g) {
        float* o = op + (b * H + h * GQ + g) * D;
        for (int64_t i = 0; i < nv; ++i)
          _mm256_storeu_ps(o + 8 * i, local ? acc[g * nv + i] : _mm256_loadu_ps(wide.data() + g * D + 8 * i));
      }
    }
  });
  return out;
}

// ---- decoder layer, decode step ------------------------------------------------------
//
// One Python call per half layer instead of a dozen: the steps above in the
// order a pre-norm Llama layer runs them. A linear is (kind, tensors, group):
//   kind 0 dense float32: [weight [N, K]] (+ optional bias in `bias`)
//   kind 1 4-bit:         [qweight, meta] with group_size
// Row counts from DENSE_FROM_ROWS on unpack 4-bit weights to float32 first,
// as the Python kernel does.

constexpr int64_t kDenseFromRows = 96;

at::Tensor apply_linear(const at::Tensor& x, int64_t kind, const std::vector<at::Tensor>& t, int64_t group_size) {
  if (kind == 0) {
    TORCH_CHECK(t.size() == 1, "a dense linear takes [weight]");
    return at::mm(x, t[0].t());
  }
  TORCH_CHECK(kind == 1 && t.size() == 2, "a 4-bit linear takes [qweight, meta]");
  if (x.size(0) >= kDenseFromRows) return at::mm(x, int4_dequantize(t[0], t[1], group_size).t());
  return int4_linear(x, t[0], t[1], group_size);
}

// residual += hidden; x = norm; qkv (+ bias); rotary on q and k; k, v into the
// cache; attention over each sequence's blocks; returns o_proj(attention)
// (this rank's partial sum when o_proj is row-parallel).
at::Tensor attention_block_decode(const at::Tensor& hidden, at::Tensor& residual, const at::Tensor& norm_weight,
                                  double eps, int64_t qkv_kind, const std::vector<at::Tensor>& qkv, int64_t qkv_group,
                                  const c10::optional<at::Tensor>& qkv_bias, int64_t o_kind,
                                  const std::vector<at::Tensor>& o, int64_t o_group, int64_t num_heads,
                                  int64_t num_kv_heads, const at::Tensor& cos, const at::Tensor& sin,
                                  at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slots,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale) {
  const int64_t B = hidden.size(0), D = k_cache.size(3);
  at::Tensor x = add_rms_norm_(hidden, residual, norm_weight, eps);
  at::Tensor qkv_out = apply_linear(x, qkv_kind, qkv, qkv_group);
  if (qkv_bias.has_value()) qkv_out.add_(*qkv_bias);
  TORCH_CHECK(qkv_out.size(1) == (num_heads + 2 * num_kv_heads) * D, "qkv output does not match the heads");
  at::Tensor qk = qkv_out.narrow(1, 0, (num_heads + num_kv_heads) * D).view({B, num_heads + num_kv_heads, D});
  rotary_(qk, cos, sin);
  at::Tensor k = qkv_out.narrow(1, num_heads * D, num_kv_heads * D).view({B, num_kv_heads, D});
  at::Tensor v = qkv_out.narrow(1, (num_heads + num_kv_heads) * D, num_kv_heads * D).view({B, num_kv_heads, D});
  write_kv_(k, v, k_cache, v_cache, slots);
  at::Tensor q = qkv_out.narrow(1, 0, num_heads * D).view({B, num_heads, D});
  at::Tensor attn = paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens, scale);
  return apply_linear(attn.view({B, num_heads * D}), o_kind, o, o_group);
}

// residual += attention; x = norm; returns down(silu(gate) * up) (a partial
// sum when down_proj is row-parallel).
at::Tensor mlp_block(const at::Tensor& attention, at::Tensor& residual, const at::Tensor& norm_weight, double eps,
                     int64_t gate_up_kind, const std::vector<at::Tensor>& gate_up, int64_t gate_up_group,
                     int64_t down_kind, const std::vector<at::Tensor>& down, int64_t down_group) {
  at::Tensor x = add_rms_norm_(attention, residual, norm_weight, eps);
  return apply_linear(silu_mul(apply_linear(x, gate_up_kind, gate_up, gate_up_group)), down_kind, down, down_group);
}

// The decode step of a whole stack of decoder layers on one rank (no all-reduce
// between halves), one call instead of two per layer. Per layer, in order:
//   ints:    qkv_kind, qkv_count, qkv_group, has_qkv_bias, o_kind, o_count, o_group,
//            gate_up_kind, gate_up_count, gate_up_group, down_kind, down_count, down_group,
//            num_heads, num_kv_heads                                   (kStackInts values)
//   floats:  input norm eps, post-attention norm eps, attention scale   (kStackFloats values)
//   tensors: input norm weight, qkv tensors [, qkv bias], o tensors, post-attention norm
//            weight, gate_up tensors, down tensors
// Returns the last layer's MLP output; residual holds the stream before it.
constexpr size_t kStackInts = 15, kStackFloats = 3;

at::Tensor decoder_stack_decode(const at::Tensor& hidden, at::Tensor& residual, const std::vector<at::Tensor>& tensors,
                                const std::vector<int64_t>& ints, const std::vector<double>& floats,
                                const at::Tensor& cos, const at::Tensor& sin, const std::vector<at::Tensor>& k_caches,
                                const std::vector<at::Tensor>& v_caches, const at::Tensor& slots,
                                const at::Tensor& block_tables, const at::Tensor& context_lens) {
  const size_t layers = k_caches.size();
  TORCH_CHECK(v_caches.size() == layers && ints.size() == layers * kStackInts && floats.size() == layers * kStackFloats,
              "decoder_stack_decode: ", layers, " caches do not match ", ints.size(), " ints and ", floats.size(),
              " floats");
  at::Tensor out = hidden;
  size_t at = 0;
  auto take = [&](int64_t count) {
    TORCH_CHECK(count >= 0 && at + static_cast<size_t>(count) <= tensors.size(), "decoder_stack_decode: too few tensors");
    std::vector<at::Tensor> part(tensors.begin() + at, tensors.begin() + at + count);
    at += count;
    return part;
  };
  for (size_t l = 0; l < layers; ++l) {
    const int64_t* c = ints.data() + l * kStackInts;
    const double* f = floats.data() + l * kStackFloats;
    const at::Tensor ln1 = take(1)[0];
    const std::vector<at::Tensor> qkv = take(c[1]);
    c10::optional<at::Tensor> bias;
    if (c[3]) bias = take(1)[0];
    const std::vector<at::Tensor> o = take(c[5]);
    const at::Tensor ln2 = take(1)[0];
    const std::vector<at::Tensor> gate_up = take(c[8]);
    const std::vector<at::Tensor> down = take(c[11]);
    at::Tensor k_cache = k_caches[l], v_cache = v_caches[l];
    at::Tensor attention =
        attention_block_decode(out, residual, ln1, f[0], c[0], qkv, c[2], bias, c[4], o, c[6], c[13], c[14], cos, sin,
                               k_cache, v_cache, slots, block_tables, context_lens, f[2]);
    out = mlp_block(attention, residual, ln2, f[1], c[7], gate_up, c[9], c[10], down, c[12]);
  }
  TORCH_CHECK(at == tensors.size(), "decoder_stack_decode: ", tensors.size() - at, " tensors left over");
  return out;
}

}  // namespace

TORCH_LIBRARY(tgs_cpu, m) {
  m.def("int4_linear(Tensor x, Tensor qweight, Tensor meta, int group_size) -> Tensor", &int4_linear);
  m.def("set_int4_isa(str name) -> str", &set_int4_isa);
  m.def("int4_dequantize(Tensor qweight, Tensor meta, int group_size) -> Tensor", &int4_dequantize);
  m.def("int4_dequantize_bf16(Tensor qweight, Tensor meta, int group_size) -> Tensor", &int4_dequantize_bf16);
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scales, int group_size) -> Tensor", &int8_linear);
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &rms_norm);
  m.def("add_rms_norm_(Tensor x, Tensor(a!) residual, Tensor weight, float eps) -> Tensor", &add_rms_norm_);
  m.def("rotary_(Tensor(a!) x, Tensor cos, Tensor sin) -> ()", &rotary_);
  m.def("silu_mul(Tensor x) -> Tensor", &silu_mul);
  m.def("write_kv_(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots) -> ()", &write_kv_);
  m.def(
      "attention_block_decode(Tensor hidden, Tensor(a!) residual, Tensor norm_weight, float eps, int qkv_kind, "
      "Tensor[] qkv, int qkv_group, Tensor? qkv_bias, int o_kind, Tensor[] o, int o_group, int num_heads, "
      "int num_kv_heads, Tensor cos, Tensor sin, Tensor(b!) k_cache, Tensor(c!) v_cache, Tensor slots, "
      "Tensor block_tables, Tensor context_lens, float scale) -> Tensor",
      &attention_block_decode);
  m.def(
      "mlp_block(Tensor attention, Tensor(a!) residual, Tensor norm_weight, float eps, int gate_up_kind, "
      "Tensor[] gate_up, int gate_up_group, int down_kind, Tensor[] down, int down_group) -> Tensor",
      &mlp_block);
  m.def(
      "decoder_stack_decode(Tensor hidden, Tensor(a!) residual, Tensor[] tensors, int[] ints, float[] floats, "
      "Tensor cos, Tensor sin, Tensor(b!)[] k_caches, Tensor(c!)[] v_caches, Tensor slots, Tensor block_tables, "
      "Tensor context_lens) -> Tensor",
      &decoder_stack_decode);
  m.def("paged_attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, float scale) -> Tensor",
        &paged_attention_decode);
}
