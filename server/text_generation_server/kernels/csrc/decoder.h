// A decoder layer's decode step, described once at load as typed objects
// (torch custom classes, torch.classes.tgs_cpu.*) and then run in one call per
// half layer, or for the whole stack of one rank in one call.
//
// The Python side (text_generation_server/execution/native.py) builds these from
// the model's declarative spec: each Linear from its weights, each DecoderLayer
// from its norms, linears, heads and activation. Every setter checks what it is
// given; nothing is passed by position in a flat list.
#pragma once

#include <torch/custom_class.h>

#include "common.h"

namespace tgs {

// One linear layer's weights as the native kernels multiply them (x @ W.T + bias).
struct Linear : torch::CustomClassHolder {
  // kConcat: parts side by side (a fused layer whose parts carry different act-order orders).
  enum class Kind { kUnset, kDense, kInt4, kConcat };
  Kind kind = Kind::kUnset;
  // dense: [N, K] float32, or bfloat16 / float16 (dense16_product: widened in registers; from
  // kDense16DotRows rows on, bfloat16 weights go through the CPU's bf16 dot products where it has
  // them, the activations rounded to bfloat16)
  at::Tensor weight;
  at::Tensor qweight, meta;  // 4-bit: see int4.cpp
  int64_t group_size = 0;
  int64_t dense_from_rows = 0;  // 4-bit: calls of this many rows unpack the weights for a float product
  bool prefill_bf16 = false;    // ... in bfloat16 (else float32)
  c10::optional<at::Tensor> bias;
  int64_t out_features = 0, in_features = 0;
  // 4-bit: the kernel's input is the layer's input reordered (act-order) and padded to whole
  // 64-feature chunks: column j of the kernel input is input feature source[j] (in_features: a
  // zero column), or, without source, the input followed by pad zero columns.
  c10::optional<at::Tensor> source;
  int64_t pad = 0;
  std::vector<c10::intrusive_ptr<Linear>> parts;

  void set_dense(const at::Tensor& weight);
  void set_int4(const at::Tensor& qweight, const at::Tensor& meta, int64_t group_size, int64_t in_features,
                int64_t dense_from_rows, bool prefill_bf16);
  void set_bias(const at::Tensor& bias);
  void add_part(const c10::intrusive_ptr<Linear>& part);  // kConcat: the next output slice
  // The layer's input features (fewer than the kernel's columns) and, where the columns are
  // reordered, which feature feeds each; call after set_int4.
  void set_input_layout(const c10::optional<at::Tensor>& source, int64_t in_features);
  at::Tensor apply(const at::Tensor& x) const;
  std::string describe() const;
};

// A norm slot of a layer; absent when its weight is undefined. RMSNorm, or LayerNorm
// (mean-centred, with a bias) where layer is set.
struct Norm {
  at::Tensor weight, bias;
  double eps = 0;
  bool layer = false;
  bool present() const { return weight.defined(); }
};

// Where each norm sits in a pre-norm residual layer:
//   attention_norm: on the residual stream before attention (Llama's input_layernorm);
//   attention_out_norm: on attention's output before it joins the stream;
//   mlp_norm / mlp_out_norm: the same around the MLP.
// A layer's input is the previous block's output, which it adds to the residual
// stream first (fused with attention_norm); without a pre-norm the block reads the
// stream itself.
//   q_heads_norm / k_heads_norm: over each query / key head (weights of head_dim) before
//   rotary (Qwen3's q_norm and k_norm).
// A parallel layer (Falcon) runs both blocks on the same stream: the MLP reads it through
// mlp_norm (or attention_norm's output where mlp_norm is absent), and the layer's output is
// the sum of the two blocks, all-reduced once.
struct DecoderLayer : torch::CustomClassHolder {
  Norm attention_norm, attention_out_norm, mlp_norm, mlp_out_norm, q_heads_norm, k_heads_norm;
  c10::intrusive_ptr<Linear> qkv, o, gate_up, down;
  // Biases of the row-parallel o and down, added once after the all-reduce (in finish_*).
  c10::optional<at::Tensor> o_bias, down_bias;
  double output_scale = 1.0;  // each block's finished output times this (Granite's residual_multiplier)
  int64_t num_heads = 0, num_kv_heads = 0, head_dim = 0;
  double scale = 0;
  int64_t sliding_window = 0;  // attend to the last this many positions only; 0: all
  double attention_softcap = 0;  // scores capped to softcap * tanh(score / softcap); 0: none
  int64_t rotary_table = 0;  // which table of the stack's [tables, T, D] cos/sin (Gemma 3's local layers: 1)
  // silu / gelu_tanh: gated, act(gate) * up over [gate | up]; gelu: not gated, gelu(up) (erf form).
  enum class Activation { kSilu, kGeluTanh, kGelu };
  Activation activation = Activation::kSilu;
  bool parallel = false;
  // A sparse mixture of experts in place of the MLP (Mixtral): router [experts, hidden]; per token
  // the top_k experts by softmax probability, renormalized, weight their gated MLPs' outputs.
  at::Tensor router;
  int64_t top_k = 0;
  std::vector<c10::intrusive_ptr<Linear>> expert_gate_up, expert_down;

  void set_norm(const std::string& slot, const at::Tensor& weight, double eps);
  void set_layer_norm(const std::string& slot, const at::Tensor& weight, const at::Tensor& bias, double eps);
  void set_parallel(bool parallel);
  void set_router(const at::Tensor& weight, int64_t top_k);
  void add_expert(const c10::intrusive_ptr<Linear>& gate_up, const c10::intrusive_ptr<Linear>& down);
  void set_attention(const c10::intrusive_ptr<Linear>& qkv, const c10::intrusive_ptr<Linear>& o, int64_t num_heads,
                     int64_t num_kv_heads, int64_t head_dim, double scale);
  void set_mlp(const c10::intrusive_ptr<Linear>& gate_up, const c10::intrusive_ptr<Linear>& down,
               const std::string& activation);
  void set_output_bias(const std::string& block, const at::Tensor& bias);  // block: attention or mlp
  void set_output_scale(double scale);
  void set_sliding_window(int64_t window);
  void set_attention_softcap(double softcap);
  void set_rotary_table(int64_t table);
  void check() const;

  // residual += hidden; x = attention_norm; qkv; head norms and rotary on q and k; k, v into the cache;
  // attention over each sequence's blocks; returns o(attention) (this rank's partial sum
  // when o is row-parallel: all-reduce it, then finish_attention).
  at::Tensor attention(const at::Tensor& hidden, at::Tensor residual, const at::Tensor& cos, const at::Tensor& sin,
                       at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& slots,
                       const at::Tensor& block_tables, const at::Tensor& context_lens) const;
  // + o's bias, then attention_out_norm, where present, times output_scale.
  at::Tensor finish_attention(const at::Tensor& x) const;
  // residual += attention; x = mlp_norm; returns down(act(gate) * up) (a partial sum when
  // down is row-parallel: all-reduce it, then finish_mlp).
  at::Tensor mlp(const at::Tensor& attention, at::Tensor residual) const;
  at::Tensor finish_mlp(const at::Tensor& x) const;  // + down's bias, mlp_out_norm, times output_scale
  // A parallel layer: residual += hidden; returns o(attention(attention_norm)) + mlp(mlp_norm), a
  // partial sum to all-reduce when split, then finish_parallel (+ both biases, times output_scale).
  at::Tensor parallel_blocks(const at::Tensor& hidden, at::Tensor residual, const at::Tensor& cos,
                             const at::Tensor& sin, at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& slots,
                             const at::Tensor& block_tables, const at::Tensor& context_lens) const;
  at::Tensor finish_parallel(const at::Tensor& x) const;
  int64_t hidden_size() const;  // of the block outputs

 private:
  Norm* slot(const std::string& name);
  // q, k, v of the normed x; k and v into the cache; attention; o of it.
  at::Tensor attend(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor k_cache,
                    at::Tensor v_cache, const at::Tensor& slots, const at::Tensor& block_tables,
                    const at::Tensor& context_lens) const;
  at::Tensor mlp_of(const at::Tensor& x) const;  // down(act(...)) of the normed x
  at::Tensor experts_of(const at::Tensor& x) const;  // the routed experts' weighted sum

};

// The decode step of every decoder layer of one unsplit model, one call.
struct DecoderStack : torch::CustomClassHolder {
  std::vector<c10::intrusive_ptr<DecoderLayer>> layers;

  void append(const c10::intrusive_ptr<DecoderLayer>& layer);
  // Returns the last layer's block output; residual holds the stream before it. cos/sin are
  // [T, D], or [tables, T, D] where layers rotate by different tables.
  at::Tensor decode(const at::Tensor& hidden, at::Tensor residual, const at::Tensor& cos, const at::Tensor& sin,
                    const std::vector<at::Tensor>& k_caches, const std::vector<at::Tensor>& v_caches,
                    const at::Tensor& slots, const at::Tensor& block_tables, const at::Tensor& context_lens) const;
};

}  // namespace tgs
