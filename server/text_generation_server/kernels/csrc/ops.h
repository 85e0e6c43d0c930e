// The operators every kernel file defines, registered in bindings.cpp as
// torch.ops.tgs_cpu.*. Every one takes float32 activations on the CPU.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace tgs {

// int4.cpp: GPTQ 4-bit weights repacked at load (per output row, 64-feature chunks
// of 16-bit words; four-row tiles of fp16 scales and uint8 zero points beside them).
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& meta, int64_t group_size);
at::Tensor int4_dequantize(const at::Tensor& qweight, const at::Tensor& meta, int64_t group_size);
at::Tensor int4_dequantize_bf16(const at::Tensor& qweight, const at::Tensor& meta, int64_t group_size);
// "auto", "avx2" or "avx512-vnni"; returns the form in use.
std::string set_int4_isa(const std::string& name);

// int8.cpp: symmetric 8-bit weights, per-group scales in four-row tiles.
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales, int64_t group_size);

// dense16.cpp: dense bfloat16 or float16 weights [N, K] times float32 x [M, K], in float32.
at::Tensor dense16_linear(const at::Tensor& x, const at::Tensor& weight);
// The same product with the CPU's bf16 dot products (AVX-512 BF16): x rounded to bfloat16,
// products summed in float32. Refused on a CPU without them.
at::Tensor dense_bf16_dot(const at::Tensor& x, const at::Tensor& weight);
// The product the native layers and the dense LM head take: dense16_linear, except that from
// kDense16DotRows rows of x on (compute-bound), bfloat16 weights go through dense_bf16_dot
// where the CPU has bf16 dot products. dense16_dot_rows() is that row count, or 0 without them.
constexpr int64_t kDense16DotRows = 16;
at::Tensor dense16_product(const at::Tensor& x, const at::Tensor& weight);
int64_t dense16_dot_rows();
bool cpu_has_bf16_dot();
// Whether the dense kernels (and decode attention) run AVX-512 (set_dense16_isa, the CPU).
bool dense16_wide();
// "auto", "avx2" or "avx512"; returns the form in use.
std::string set_dense16_isa(const std::string& name);

// norm_rotary.cpp
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor add_rms_norm_(const at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps);
void rotary_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor silu_mul(const at::Tensor& x);
at::Tensor gelu_tanh_mul(const at::Tensor& x);

// attention.cpp
void write_kv_(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
               const at::Tensor& slots);
at::Tensor paged_attention_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                  int64_t window, double softcap);  // window 0: the whole context; softcap 0: none

}  // namespace tgs
