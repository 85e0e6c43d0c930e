// The paged KV cache: writing new keys and values, and decode attention that
// reads every sequence's context in place.
#include "common.h"
#include "ops.h"

namespace tgs {

// A cache is float32, bfloat16 (--kv-cache-dtype bfloat16, or a bfloat16 model's) or float16 (a
// float16 model's); keys and values are computed in float32 either way, rounded to nearest even
// when stored in 16 bits.
inline void check_cache(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), what, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf,
              what, " must be float32, bfloat16 or float16, got ", t.scalar_type());
}

inline void store_row(float* dst, const float* src, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
inline void store_row(c10::BFloat16* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::BFloat16(src[i]);
}
inline void store_row(c10::Half* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::Half(src[i]);
}

// Eight cache values as float32.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// k, v [T, kv_heads, D] (rows any stride) stored at cache rows `slots`.
void write_kv_(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
               const at::Tensor& slots) {
  check_cpu_float(k, "k");
  check_cpu_float(v, "v");
  check_cache(k_cache, "k_cache");
  check_cache(v_cache, "v_cache");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "k and v caches differ in dtype");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous(), "slots must be contiguous int64");
  const int64_t T = k.size(0), row = k.size(1) * k.size(2);
  TORCH_CHECK(k.stride(2) == 1 && k.stride(1) == k.size(2) && v.stride(2) == 1 && v.stride(1) == v.size(2),
              "k and v must have packed heads");
  TORCH_CHECK(k_cache.numel() % row == 0 && slots.numel() == T, "cache rows do not match k");
  const int64_t rows = k_cache.numel() / row;
  const int64_t* sp = slots.data_ptr<int64_t>();
  const float *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  auto store = [&](auto* kc, auto* vc) {
    for (int64_t t = 0; t < T; ++t) {
      const int64_t s = sp[t];
      TORCH_CHECK(s >= 0 && s < rows, "slot ", s, " outside the cache of ", rows, " rows");
      store_row(kc + s * row, kp + t * k.stride(0), row);
      store_row(vc + s * row, vp + t * v.stride(0), row);
    }
  };
  if (k_cache.scalar_type() == at::kFloat)
    store(k_cache.data_ptr<float>(), v_cache.data_ptr<float>());
  else if (k_cache.scalar_type() == at::kBFloat16)
    store(k_cache.data_ptr<c10::BFloat16>(), v_cache.data_ptr<c10::BFloat16>());
  else
    store(k_cache.data_ptr<c10::Half>(), v_cache.data_ptr<c10::Half>());
}

// One query per sequence: q [B, H, D] (packed heads, any row stride) attends
// to the first context_lens[b] tokens of its blocks in k/v cache
// [num_blocks, block_size, KVH, D] (with window > 0, to the last `window` of
// them only: a sliding window); query heads h*G..h*G+G-1 share KV head h.
// With softcap > 0 the scores are capped first: softcap * tanh(score / softcap).
template <typename C>
static void paged_attention_impl(const at::Tensor& q, const C* kc, const C* vc, at::Tensor& out,
                                 const int64_t* lens, const int64_t* tables, int64_t MAXB, int64_t BS, int64_t KVH,
                                 double scale, int64_t window, float cap);

at::Tensor paged_attention_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                  int64_t window, double softcap) {
  check_cpu_float(q, "q");
  check_cache(k_cache, "k_cache");
  check_cache(v_cache, "v_cache");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "k and v caches differ in dtype");
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
  TORCH_CHECK(window >= 0, "the sliding window must be positive (or 0 for none), not ", window);
  TORCH_CHECK(softcap >= 0, "the score cap must be positive (or 0 for none), not ", softcap);
  const float cap = static_cast<float>(softcap);
  const int64_t GQ = H / KVH, MAXB = block_tables.size(1);
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lens[b] >= 1 && lens[b] <= MAXB * BS, "context length ", lens[b], " does not fit the block table");
    for (int64_t j = 0; j < (lens[b] + BS - 1) / BS; ++j)
      TORCH_CHECK(tables[b * MAXB + j] >= 0 && tables[b * MAXB + j] < NB, "block id outside the cache");
  }
  at::Tensor out = at::empty({B, H, D}, q.options());
  if (k_cache.scalar_type() == at::kFloat)
    paged_attention_impl(q, k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), out, lens, tables, MAXB, BS, KVH,
                         scale, window, cap);
  else if (k_cache.scalar_type() == at::kBFloat16)
    paged_attention_impl(q, k_cache.data_ptr<c10::BFloat16>(), v_cache.data_ptr<c10::BFloat16>(), out, lens, tables,
                         MAXB, BS, KVH, scale, window, cap);
  else
    paged_attention_impl(q, k_cache.data_ptr<c10::Half>(), v_cache.data_ptr<c10::Half>(), out, lens, tables, MAXB,
                         BS, KVH, scale, window, cap);
  return out;
}

namespace {

#define TGS_AVX512F __attribute__((target("avx512f,avx512bw,avx512vl")))

TGS_AVX512F inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
TGS_AVX512F inline __m512 load16(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
TGS_AVX512F inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// One (sequence, KV head) task: its queries, its L attended positions from t0, and where they live.
template <typename C>
struct Task {
  const float* q;  // the group's first query head; heads D apart
  const C* kc;
  const C* vc;
  const int64_t* table;
  int64_t t0, L, BS, tok, hD;  // hD: the KV head's offset within a cache row
  float scale, cap;
  float* out;  // the group's first output head; heads D apart
  const C* row(const C* cache, int64_t t) const {
    const int64_t pos = t0 + t;
    return cache + (table[pos / BS] * BS + pos % BS) * tok + hD;
  }
};

// Scores to probabilities in place: capped first where the model caps them (Gemma 2), then
// exp(s - max) / sum.
void softmax_row(float* srow, int64_t L, float cap) {
  if (cap > 0)
    for (int64_t t = 0; t < L; ++t) srow[t] = cap * std::tanh(srow[t] / cap);
  float mx = -INFINITY;
  for (int64_t t = 0; t < L; ++t) mx = std::max(mx, srow[t]);
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

// G query heads of one KV head with D = 16 * NV, the queries and the outputs in registers: each
// key and value row is read and widened once for the G heads.
template <int NV, int G, typename C>
TGS_AVX512F void attend_avx512(const Task<C>& k, float* scores) {
  constexpr int64_t D = 16 * NV;
  const int64_t L = k.L;
  __m512 qv[G][NV];
#pragma GCC unroll 16
  for (int g = 0; g < G; ++g)
#pragma GCC unroll 16
    for (int i = 0; i < NV; ++i) qv[g][i] = _mm512_loadu_ps(k.q + g * D + 16 * i);
  for (int64_t t = 0; t < L; ++t) {
    const C* kt = k.row(k.kc, t);
    __m512 kv[NV];
#pragma GCC unroll 16
    for (int i = 0; i < NV; ++i) kv[i] = load16(kt + 16 * i);
#pragma GCC unroll 16
    for (int g = 0; g < G; ++g) {
      __m512 a = _mm512_mul_ps(qv[g][0], kv[0]);
#pragma GCC unroll 16
      for (int i = 1; i < NV; ++i) a = _mm512_fmadd_ps(qv[g][i], kv[i], a);
      scores[g * L + t] = _mm512_reduce_add_ps(a) * k.scale;
    }
  }
  for (int g = 0; g < G; ++g) softmax_row(scores + g * L, L, k.cap);
  __m512 acc[G][NV];
#pragma GCC unroll 16
  for (int g = 0; g < G; ++g)
#pragma GCC unroll 16
    for (int i = 0; i < NV; ++i) acc[g][i] = _mm512_setzero_ps();
  for (int64_t t = 0; t < L; ++t) {
    const C* vt = k.row(k.vc, t);
    __m512 vv[NV];
#pragma GCC unroll 16
    for (int i = 0; i < NV; ++i) vv[i] = load16(vt + 16 * i);
#pragma GCC unroll 16
    for (int g = 0; g < G; ++g) {
      const __m512 p = _mm512_set1_ps(scores[g * L + t]);
#pragma GCC unroll 16
      for (int i = 0; i < NV; ++i) acc[g][i] = _mm512_fmadd_ps(p, vv[i], acc[g][i]);
    }
  }
#pragma GCC unroll 16
  for (int g = 0; g < G; ++g)
#pragma GCC unroll 16
    for (int i = 0; i < NV; ++i) _mm512_storeu_ps(k.out + g * D + 16 * i, acc[g][i]);
}

// Query heads per pass for D = 16 * NV: queries (or outputs), a row and a broadcast in 32 registers.
template <int NV>
constexpr int kGroupHeads = std::min(8, (28 - NV) / NV);

// The task's GQ heads in passes of at most kGroupHeads<NV>.
template <int NV, typename C>
TGS_AVX512F void attend_heads_avx512(Task<C> k, int64_t GQ, float* scores) {
  constexpr int64_t D = 16 * NV;
  constexpr int GC = kGroupHeads<NV>;
  for (int64_t g0 = 0; g0 < GQ; g0 += GC) {
    Task<C> part = k;
    part.q = k.q + g0 * D;
    part.out = k.out + g0 * D;
    switch (std::min<int64_t>(GC, GQ - g0)) {
#define TGS_HEADS(n)                                 \
  case n:                                            \
    if constexpr (n <= GC) attend_avx512<NV, n, C>(part, scores); \
    break;
      TGS_HEADS(1) TGS_HEADS(2) TGS_HEADS(3) TGS_HEADS(4) TGS_HEADS(5) TGS_HEADS(6) TGS_HEADS(7) TGS_HEADS(8)
#undef TGS_HEADS
      default: break;
    }
  }
}

// Any D that is a multiple of 8, eight lanes at a time.
template <typename C>
void attend_avx2(const Task<C>& k, int64_t GQ, int64_t D, float* scores) {
  const int64_t L = k.L, nv = D / 8;
  for (int64_t g = 0; g < GQ; ++g) {
    const float* qh = k.q + g * D;
    float* srow = scores + g * L;
    for (int64_t t = 0; t < L; ++t) {
      const C* kt = k.row(k.kc, t);
      __m256 acc = _mm256_setzero_ps();
      for (int64_t i = 0; i < nv; ++i) acc = _mm256_fmadd_ps(_mm256_loadu_ps(qh + 8 * i), load8(kt + 8 * i), acc);
      srow[t] = hsum(acc) * k.scale;
    }
    softmax_row(srow, L, k.cap);
  }
  // out[g] = sum_t p[g, t] v_t, value rows read once for the whole group.
  __m256 acc[64];  // the group's outputs while GQ * D <= 512 floats
  const bool local = GQ * nv <= 64;
  std::vector<float> wide;
  if (!local) wide.assign(static_cast<size_t>(GQ * D), 0.f);
  if (local)
    for (int64_t i = 0; i < GQ * nv; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t t = 0; t < L; ++t) {
    const C* vt = k.row(k.vc, t);
    for (int64_t g = 0; g < GQ; ++g) {
      const __m256 p = _mm256_set1_ps(scores[g * L + t]);
      if (local) {
        for (int64_t i = 0; i < nv; ++i) acc[g * nv + i] = _mm256_fmadd_ps(p, load8(vt + 8 * i), acc[g * nv + i]);
      } else {
        float* w = wide.data() + g * D;
        for (int64_t i = 0; i < nv; ++i)
          _mm256_storeu_ps(w + 8 * i, _mm256_fmadd_ps(p, load8(vt + 8 * i), _mm256_loadu_ps(w + 8 * i)));
      }
    }
  }
  for (int64_t g = 0; g < GQ; ++g)
    for (int64_t i = 0; i < nv; ++i)
      _mm256_storeu_ps(k.out + g * D + 8 * i, local ? acc[g * nv + i] : _mm256_loadu_ps(wide.data() + g * D + 8 * i));
}

}  // namespace

template <typename C>
static void paged_attention_impl(const at::Tensor& q, const C* kc, const C* vc, at::Tensor& out,
                                 const int64_t* lens, const int64_t* tables, int64_t MAXB, int64_t BS, int64_t KVH,
                                 double scale, int64_t window, float cap) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), GQ = H / KVH;
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t ldq = q.stride(0), tok = KVH * D;
  // AVX-512 (as the dense kernels: CPU_KERNELS_ISA=avx2 pins AVX2) for head sizes 32, 64, 128.
  const int64_t nv16 = dense16_wide() && D % 16 == 0 ? D / 16 : 0;
  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / KVH, h = task % KVH;
      // Positions t0 .. lens[b] - 1 are attended; L of them.
      const int64_t t0 = (window > 0 && lens[b] > window) ? lens[b] - window : 0, L = lens[b] - t0;
      scores.resize(static_cast<size_t>(GQ * L));
      const Task<C> k{qp + b * ldq + h * GQ * D, kc, vc, tables + b * MAXB, t0, L, BS, tok, h * D,
                      static_cast<float>(scale), cap, op + (b * H + h * GQ) * D};
      switch (nv16) {
        case 2: attend_heads_avx512<2>(k, GQ, scores.data()); break;
        case 4: attend_heads_avx512<4>(k, GQ, scores.data()); break;
        case 8: attend_heads_avx512<8>(k, GQ, scores.data()); break;
        default: attend_avx2(k, GQ, D, scores.data()); break;
      }
    }
  });
}

}  // namespace tgs
