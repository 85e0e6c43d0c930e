// Dense weights kept in 16 bits (bfloat16 or float16, a checkpoint's own dtype) multiplied by
// float32 activations: y [M, N] = x [M, K] @ W [N, K].T, every product and sum in float32.
//
// Decode steps are memory-bound: the weights are read once per step and 16-bit weights are
// half the bytes of float32 ones. Each weight vector is widened in registers (bfloat16: a
// shift; float16: F16C's vcvtph2ps) and multiplied into every row of x, so the only rounding
// is the weights' own. Weight rows are taken one at a time, each against a register tile of x
// rows; the row (K * 2 bytes) stays in L1 while further tiles of x pass over it, so the weights
// leave memory once per call whatever M is. AVX-512 where the CPU has it (16 lanes, tiles of
// eight rows of x), AVX2 otherwise (tiles of four).
//
// From 16 rows of x on the product is compute-bound, and where the CPU has AVX-512 BF16,
// bfloat16 weights go through its dot products (dense_bf16_dot): x rounded to bfloat16 once per
// call, each vdpbf16ps 32 products summed pairwise into float32, twice the products per
// instruction of a float32 FMA. Tiles of four weight rows by four rows of x, blocks of 64 rows
// of x; the first tile of x rows prefetches the next weight rows. The outputs stay float32.
#include "common.h"
#include "ops.h"

namespace tgs {

namespace {

#define TGS_AVX512F __attribute__((target("avx512f,avx512bw,avx512vl")))

inline __m256 widen8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 widen8(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

TGS_AVX512F inline __m512 widen16(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
TGS_AVX512F inline __m512 widen16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Up to this many rows of x, weight rows are read one at a time (memory-bound); more rows take
// four-row tiles, whose widened vectors each feed four rows of x (compute-bound).
constexpr int64_t kRowAtATimeRows = 4;
// Rows of x per block of the compute-bound products.
constexpr int64_t kBlockRows = 64;

struct Args {
  const float* x;
  int64_t ldx, M, K, N;
  float* y;
};

// Weight row n against rows m..m+MT-1 of x, with UK independent accumulators per row of x (the
// single-row product's FMA chains), features [0, K8) in 8-lane vectors and the rest one by one.
// One weight row at a time: each thread then reads its rows as one sequential stream, which the
// hardware prefetchers follow (four rows interleaved were measured at under half the bandwidth).
template <int MT, int UK, typename W>
void row_avx2(const Args& a, const W* w, int64_t n, int64_t m) {
  __m256 acc[MT][UK];
  for (int j = 0; j < MT; ++j)
    for (int u = 0; u < UK; ++u) acc[j][u] = _mm256_setzero_ps();
  const int64_t K = a.K, K8 = K & ~int64_t{7};
  const W* wr = w + n * K;
  const float* xr[MT];
  for (int j = 0; j < MT; ++j) xr[j] = a.x + (m + j) * a.ldx;
  int64_t k = 0;
  for (; k + 8 * UK <= K8; k += 8 * UK)
    for (int u = 0; u < UK; ++u) {
      const __m256 wv = widen8(wr + k + 8 * u);
      for (int j = 0; j < MT; ++j) acc[j][u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xr[j] + k + 8 * u), acc[j][u]);
    }
  for (; k < K8; k += 8) {
    const __m256 wv = widen8(wr + k);
    for (int j = 0; j < MT; ++j) acc[j][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xr[j] + k), acc[j][0]);
  }
  for (int j = 0; j < MT; ++j) {
    for (int u = 1; u < UK; ++u) acc[j][0] = _mm256_add_ps(acc[j][0], acc[j][u]);
    float s = hsum(acc[j][0]);
    for (int64_t i = K8; i < K; ++i) s += static_cast<float>(wr[i]) * xr[j][i];
    a.y[(m + j) * a.N + n] = s;
  }
}

template <int MT, int UK, typename W>
TGS_AVX512F void row_avx512(const Args& a, const W* w, int64_t n, int64_t m) {
  __m512 acc[MT][UK];
  for (int j = 0; j < MT; ++j)
    for (int u = 0; u < UK; ++u) acc[j][u] = _mm512_setzero_ps();
  const int64_t K = a.K, K16 = K & ~int64_t{15};
  const W* wr = w + n * K;
  const float* xr[MT];
  for (int j = 0; j < MT; ++j) xr[j] = a.x + (m + j) * a.ldx;
  int64_t k = 0;
  for (; k + 16 * UK <= K16; k += 16 * UK)
    for (int u = 0; u < UK; ++u) {
      const __m512 wv = widen16(wr + k + 16 * u);
      for (int j = 0; j < MT; ++j) acc[j][u] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xr[j] + k + 16 * u), acc[j][u]);
    }
  for (; k < K16; k += 16) {
    const __m512 wv = widen16(wr + k);
    for (int j = 0; j < MT; ++j) acc[j][0] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xr[j] + k), acc[j][0]);
  }
  for (int j = 0; j < MT; ++j) {
    for (int u = 1; u < UK; ++u) acc[j][0] = _mm512_add_ps(acc[j][0], acc[j][u]);
    float s = _mm512_reduce_add_ps(acc[j][0]);
    for (int64_t i = K16; i < K; ++i) s += static_cast<float>(wr[i]) * xr[j][i];
    a.y[(m + j) * a.N + n] = s;
  }
}

// Rows n..n+NT-1 of W against rows m..m+MT-1 of x, features [0, K8) with 8-lane vectors and the
// rest one by one.
template <int NT, int MT, typename W>
void tile_avx2(const Args& a, const W* w, int64_t n, int64_t m) {
  __m256 acc[NT][MT];
  for (int i = 0; i < NT; ++i)
    for (int j = 0; j < MT; ++j) acc[i][j] = _mm256_setzero_ps();
  const int64_t K = a.K, K8 = K & ~int64_t{7};
  const W* wr[NT];
  for (int i = 0; i < NT; ++i) wr[i] = w + (n + i) * K;
  const float* xr[MT];
  for (int j = 0; j < MT; ++j) xr[j] = a.x + (m + j) * a.ldx;
  for (int64_t k = 0; k < K8; k += 8) {
    __m256 wv[NT];
    for (int i = 0; i < NT; ++i) wv[i] = widen8(wr[i] + k);
    for (int j = 0; j < MT; ++j) {
      const __m256 xv = _mm256_loadu_ps(xr[j] + k);
      for (int i = 0; i < NT; ++i) acc[i][j] = _mm256_fmadd_ps(wv[i], xv, acc[i][j]);
    }
  }
  for (int i = 0; i < NT; ++i)
    for (int j = 0; j < MT; ++j) {
      float s = hsum(acc[i][j]);
      for (int64_t k = K8; k < K; ++k) s += static_cast<float>(wr[i][k]) * xr[j][k];
      a.y[(m + j) * a.N + n + i] = s;
    }
}

template <int NT, int MT, typename W, bool Prefetch = false>
TGS_AVX512F void tile_avx512(const Args& a, const W* w, int64_t n, int64_t m) {
  __m512 acc[NT][MT];
  for (int i = 0; i < NT; ++i)
    for (int j = 0; j < MT; ++j) acc[i][j] = _mm512_setzero_ps();
  const int64_t K = a.K, K16 = K & ~int64_t{15};
  const W* wr[NT];
  for (int i = 0; i < NT; ++i) wr[i] = w + (n + i) * K;
  const float* xr[MT];
  for (int j = 0; j < MT; ++j) xr[j] = a.x + (m + j) * a.ldx;
  for (int64_t k = 0; k < K16; k += 16) {
    __m512 wv[NT];
    for (int i = 0; i < NT; ++i) wv[i] = widen16(wr[i] + k);
    if constexpr (Prefetch) {  // the next tile's rows, a line per row every other step
      if ((k & 31) == 0)
        for (int i = 0; i < NT; ++i) _mm_prefetch(reinterpret_cast<const char*>(wr[i] + NT * K + k), _MM_HINT_T0);
    }
    for (int j = 0; j < MT; ++j) {
      const __m512 xv = _mm512_loadu_ps(xr[j] + k);
      for (int i = 0; i < NT; ++i) acc[i][j] = _mm512_fmadd_ps(wv[i], xv, acc[i][j]);
    }
  }
  for (int i = 0; i < NT; ++i)
    for (int j = 0; j < MT; ++j) {
      float s = _mm512_reduce_add_ps(acc[i][j]);
      for (int64_t k = K16; k < K; ++k) s += static_cast<float>(wr[i][k]) * xr[j][k];
      a.y[(m + j) * a.N + n + i] = s;
    }
}

// Every row of x against weight rows n..n+NT-1 (NT = 4, or 1 for the last N % 4 rows).
template <int NT, typename W>
void tiles_avx2(const Args& a, const W* w, int64_t n) {
  int64_t m = 0;
  for (; m + 2 <= a.M; m += 2) tile_avx2<NT, 2>(a, w, n, m);
  for (; m < a.M; ++m) tile_avx2<NT, 1>(a, w, n, m);
}

template <int NT, typename W>
TGS_AVX512F void tiles_avx512(const Args& a, const W* w, int64_t n) {
  // The first tile of x rows prefetches the next weight rows (streamed from memory).
  int64_t m = 0;
  if (a.M >= 4) {
    tile_avx512<NT, 4, W, true>(a, w, n, 0);
    m = 4;
  }
  for (; m + 4 <= a.M; m += 4) tile_avx512<NT, 4>(a, w, n, m);
  switch (a.M - m) {
    case 3: tile_avx512<NT, 3>(a, w, n, m); break;
    case 2: tile_avx512<NT, 2>(a, w, n, m); break;
    case 1: tile_avx512<NT, 1>(a, w, n, m); break;
    default: break;
  }
}


// Every row of x (at most kRowAtATimeRows) against weight rows [begin, end): independent
// accumulators per row of x, four chains in all (one row of x: four per vector position).
template <typename W>
void rows_avx2(const Args& a, const W* w, int64_t begin, int64_t end) {
  for (int64_t n = begin; n < end; ++n) {
    switch (a.M) {
      case 1: row_avx2<1, 4>(a, w, n, 0); break;
      case 2: row_avx2<2, 2>(a, w, n, 0); break;
      case 3: row_avx2<3, 1>(a, w, n, 0); break;
      default: row_avx2<4, 1>(a, w, n, 0); break;
    }
  }
}

template <typename W>
TGS_AVX512F void rows_avx512(const Args& a, const W* w, int64_t begin, int64_t end) {
  for (int64_t n = begin; n < end; ++n) {
    switch (a.M) {
      case 1: row_avx512<1, 4>(a, w, n, 0); break;
      case 2: row_avx512<2, 2>(a, w, n, 0); break;
      case 3: row_avx512<3, 1>(a, w, n, 0); break;
      default: row_avx512<4, 1>(a, w, n, 0); break;
    }
  }
}

#define TGS_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// Many rows of x against bfloat16 weights with the CPU's bf16 dot products (AVX-512 BF16): x
// rounded to bfloat16 once per call, each instruction 32 products summed pairwise into float32.
struct DotArgs {
  const uint16_t* x;  // [M, K] bfloat16
  const uint16_t* w;  // [N, K] bfloat16
  int64_t M, K, N;
  float* y;
};

template <int NT, int MT, bool Prefetch>
TGS_AVX512BF16 void dot_tile(const DotArgs& a, int64_t n, int64_t m) {
  __m512 acc[NT][MT];
#pragma GCC unroll 8
  for (int i = 0; i < NT; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < MT; ++j) acc[i][j] = _mm512_setzero_ps();
  const int64_t K = a.K;
  const uint16_t* wr[NT];
  const uint16_t* xr[MT];
  for (int i = 0; i < NT; ++i) wr[i] = a.w + (n + i) * K;
  for (int j = 0; j < MT; ++j) xr[j] = a.x + (m + j) * K;
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512i wv[NT];
#pragma GCC unroll 8
    for (int i = 0; i < NT; ++i) wv[i] = _mm512_loadu_si512(wr[i] + k);
    if constexpr (Prefetch) {  // the next tile's rows, a line per row per step
#pragma GCC unroll 8
      for (int i = 0; i < NT; ++i) _mm_prefetch(reinterpret_cast<const char*>(wr[i] + NT * K + k), _MM_HINT_T0);
    }
#pragma GCC unroll 8
    for (int j = 0; j < MT; ++j) {
      const __m512i xv = _mm512_loadu_si512(xr[j] + k);
#pragma GCC unroll 8
      for (int i = 0; i < NT; ++i) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)wv[i], (__m512bh)xv);
    }
  }
  if (k < K) {  // the last features: masked loads, zeros past K on both sides
    const __mmask32 mask = (__mmask32)((1ull << (K - k)) - 1);
    __m512i wv[NT];
    for (int i = 0; i < NT; ++i) wv[i] = _mm512_maskz_loadu_epi16(mask, wr[i] + k);
    for (int j = 0; j < MT; ++j) {
      const __m512i xv = _mm512_maskz_loadu_epi16(mask, xr[j] + k);
      for (int i = 0; i < NT; ++i) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)wv[i], (__m512bh)xv);
    }
  }
  for (int i = 0; i < NT; ++i)
    for (int j = 0; j < MT; ++j) a.y[(m + j) * a.N + n + i] = _mm512_reduce_add_ps(acc[i][j]);
}

// x's rows as bfloat16 (round to nearest even, as the conversion instruction does), packed.
TGS_AVX512BF16 void round_to_bf16(const float* x, int64_t ldx, int64_t M, int64_t K, uint16_t* out) {
  for (int64_t m = 0; m < M; ++m) {
    const float* src = x + m * ldx;
    uint16_t* dst = out + m * K;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + k)));
    if (k < K) {
      const __mmask16 mask = (__mmask16)((1u << (K - k)) - 1);
      const __m256i h = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, src + k));
      _mm256_mask_storeu_epi16(dst + k, mask, h);
    }
  }
}

template <int NT>
void dot_tiles(const DotArgs& a, int64_t n) {
  // The first tile of x rows prefetches the next weight rows (streamed from memory, they would
  // otherwise arrive a line at a time as the loads ask).
  int64_t m = 0;
  if (a.M >= 4) {
    dot_tile<NT, 4, true>(a, n, 0);
    m = 4;
  }
  for (; m + 4 <= a.M; m += 4) dot_tile<NT, 4, false>(a, n, m);
  switch (a.M - m) {
    case 3: dot_tile<NT, 3, false>(a, n, m); break;
    case 2: dot_tile<NT, 2, false>(a, n, m); break;
    case 1: dot_tile<NT, 1, false>(a, n, m); break;
    default: break;
  }
}

int g_dense16_isa = -1;  // 0: AVX2; 1: AVX-512 (set_dense16_isa)

bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
}

template <typename W>
void run(const Args& a, const W* w) {
  const bool wide = dense16_wide();
  if (a.M <= kRowAtATimeRows) {
    // Memory-bound: contiguous row ranges per thread, each read front to back.
    at::parallel_for(0, a.N, 16, [&](int64_t begin, int64_t end) {
      if (wide)
        rows_avx512(a, w, begin, end);
      else
        rows_avx2(a, w, begin, end);
    });
    return;
  }
  // Compute-bound: four weight rows per tile, each widened vector feeding four rows of x; blocks
  // of kBlockRows rows of x (kept in L2 while every weight tile passes over them).
  const int64_t tiles = a.N / 4;
  for (int64_t m0 = 0; m0 < a.M; m0 += kBlockRows) {
    Args b = a;
    b.x = a.x + m0 * a.ldx;
    b.y = a.y + m0 * a.N;
    b.M = std::min(kBlockRows, a.M - m0);
    at::parallel_for(0, tiles, 8, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        if (wide)
          tiles_avx512<4>(b, w, t * 4);
        else
          tiles_avx2<4>(b, w, t * 4);
      }
    });
    for (int64_t n = tiles * 4; n < a.N; ++n) {
      if (wide)
        tiles_avx512<1>(b, w, n);
      else
        tiles_avx2<1>(b, w, n);
    }
  }
}

}  // namespace

bool cpu_has_bf16_dot() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16");  // every CPU with AMX has it too
  }();
  return has;
}

bool dense16_wide() {
  if (g_dense16_isa < 0) g_dense16_isa = cpu_has_avx512() ? 1 : 0;
  return g_dense16_isa == 1;
}

std::string set_dense16_isa(const std::string& name) {
  TORCH_CHECK(name == "auto" || name == "avx2" || name == "avx512", "dense16 ISA must be auto, avx2 or avx512, got ",
              name);
  const bool can = cpu_has_avx512();
  TORCH_CHECK(name != "avx512" || can, "this CPU has no AVX-512 (needs avx512f, bw and vl)");
  g_dense16_isa = (name == "avx2" || !can) ? 0 : 1;
  return g_dense16_isa == 1 ? "avx512" : "avx2";
}

void check_dense16(const at::Tensor& w, const char* what) {
  TORCH_CHECK(w.device().is_cpu(), what, " must be on the CPU");
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kHalf, what,
              " must be bfloat16 or float16, got ", w.scalar_type());
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), what, " must be contiguous [out, in]");
}

at::Tensor dense16_linear(const at::Tensor& x, const at::Tensor& weight) {
  check_cpu_float(x, "x");
  check_dense16(weight, "weight");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [M, K] with unit feature stride");
  TORCH_CHECK(x.size(1) == weight.size(1), "x has ", x.size(1), " features, the weight ", weight.size(1));
  const int64_t M = x.size(0), N = weight.size(0), K = weight.size(1);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const Args a{x.data_ptr<float>(), x.stride(0), M, K, N, y.data_ptr<float>()};
  if (weight.scalar_type() == at::kBFloat16)
    run(a, weight.data_ptr<c10::BFloat16>());
  else
    run(a, weight.data_ptr<c10::Half>());
  return y;
}

at::Tensor dense_bf16_dot(const at::Tensor& x, const at::Tensor& weight) {
  check_cpu_float(x, "x");
  check_dense16(weight, "weight");
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16, "bf16 dot products take bfloat16 weights, got ",
              weight.scalar_type());
  TORCH_CHECK(cpu_has_bf16_dot(), "this CPU has no bf16 dot products (AVX-512 BF16)");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [M, K] with unit feature stride");
  TORCH_CHECK(x.size(1) == weight.size(1), "x has ", x.size(1), " features, the weight ", weight.size(1));
  const int64_t M = x.size(0), N = weight.size(0), K = weight.size(1);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  std::vector<uint16_t> xb(static_cast<size_t>(M * K));
  round_to_bf16(x.data_ptr<float>(), x.stride(0), M, K, xb.data());
  const DotArgs a{xb.data(), reinterpret_cast<const uint16_t*>(weight.data_ptr<c10::BFloat16>()), M, K, N,
                  y.data_ptr<float>()};
  // Blocks of kBlockRows rows of x (their bf16 copy stays in L2 while every weight tile
  // passes over it), each spread over the threads by tiles of four weight rows.
  const int64_t tiles = N / 4;
  for (int64_t m0 = 0; m0 < M; m0 += kBlockRows) {
    DotArgs b = a;
    b.x = a.x + m0 * K;
    b.y = a.y + m0 * N;
    b.M = std::min(kBlockRows, M - m0);
    at::parallel_for(0, tiles, 4, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) dot_tiles<4>(b, t * 4);
    });
    for (int64_t n = tiles * 4; n < N; ++n) dot_tiles<1>(b, n);
  }
  return y;
}

int64_t dense16_dot_rows() { return cpu_has_bf16_dot() ? kDense16DotRows : 0; }

at::Tensor dense16_product(const at::Tensor& x, const at::Tensor& weight) {
  if (weight.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.size(0) >= kDense16DotRows && cpu_has_bf16_dot())
    return dense_bf16_dot(x, weight);
  return dense16_linear(x, weight);
}

}  // namespace tgs
