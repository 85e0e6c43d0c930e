// Decoder layers' decode step over the typed descriptions of decoder.h.
#include "decoder.h"

#include "ops.h"

namespace tgs {

void Linear::set_dense(const at::Tensor& w) {
  TORCH_CHECK(w.device().is_cpu(), "a dense weight must be on the CPU");
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kHalf,
              "a dense weight must be float32, bfloat16 or float16, got ", w.scalar_type());
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "a dense weight must be contiguous [out, in]");
  kind = Kind::kDense;
  weight = w;
  out_features = w.size(0);
  in_features = w.size(1);
}

void Linear::set_int4(const at::Tensor& q, const at::Tensor& m, int64_t group, int64_t in, int64_t from_rows,
                      bool bf16) {
  TORCH_CHECK(q.scalar_type() == at::kShort && q.dim() == 2 && q.is_contiguous(), "qweight must be int16 [N, K / 4]");
  TORCH_CHECK(m.scalar_type() == at::kShort && m.dim() == 3, "meta must be int16 [N / 4, G, 6]");
  TORCH_CHECK(q.size(1) * 4 == in, "qweight holds ", q.size(1) * 4, " input features, not ", in);
  TORCH_CHECK(group > 0 && in % group == 0, "group size ", group, " does not divide ", in, " input features");
  TORCH_CHECK(from_rows > 0, "dense_from_rows must be positive");
  kind = Kind::kInt4;
  qweight = q;
  meta = m;
  group_size = group;
  dense_from_rows = from_rows;
  prefill_bf16 = bf16;
  out_features = q.size(0);
  in_features = in;
}

void Linear::set_input_layout(const c10::optional<at::Tensor>& src, int64_t in) {
  TORCH_CHECK(kind == Kind::kInt4, "an input layout belongs to 4-bit weights; set them first");
  const int64_t kernel_in = qweight.size(1) * 4;
  TORCH_CHECK(in > 0 && in <= kernel_in, "the layer's ", in, " input features do not fit the kernel's ", kernel_in);
  if (src.has_value()) {
    TORCH_CHECK((src->scalar_type() == at::kLong || src->scalar_type() == at::kInt) && src->dim() == 1 &&
                    src->size(0) == kernel_in,
                "source must be int32 or int64 [", kernel_in, "]");
    TORCH_CHECK(src->min().item().toLong() >= 0 && src->max().item().toLong() <= in,
                "source indexes features 0..", in, " (", in, ": a zero column)");
    source = src->contiguous();
    pad = 0;
  } else {
    source.reset();
    pad = kernel_in - in;
  }
  in_features = in;
}

void Linear::add_part(const c10::intrusive_ptr<Linear>& part) {
  TORCH_CHECK(kind == Kind::kUnset || kind == Kind::kConcat, "parts make a layer of their own; this one has weights");
  TORCH_CHECK(part->kind == Kind::kDense || part->kind == Kind::kInt4, "a part must have its weights set");
  TORCH_CHECK(!part->bias.has_value(), "a part takes no bias; set it on the whole layer");
  TORCH_CHECK(parts.empty() || part->in_features == in_features, "parts take different input features: ",
              part->in_features, " and ", in_features);
  kind = Kind::kConcat;
  parts.push_back(part);
  in_features = part->in_features;
  out_features += part->out_features;
}

void Linear::set_bias(const at::Tensor& b) {
  TORCH_CHECK(kind != Kind::kUnset, "set the weights before the bias");
  check_cpu_float(b, "bias");
  TORCH_CHECK(b.dim() == 1 && b.size(0) == out_features, "bias must be [", out_features, "]");
  bias = b;
}

at::Tensor Linear::apply(const at::Tensor& x) const {
  at::Tensor y;
  switch (kind) {
    case Kind::kDense:
      y = weight.scalar_type() == at::kFloat ? at::mm(x, weight.t()) : dense16_product(x, weight);
      break;
    case Kind::kInt4: {
      at::Tensor xk = x;
      if (source.has_value()) {
        xk = at::constant_pad_nd(x, {0, 1}).index_select(1, *source);
      } else if (pad) {
        xk = at::constant_pad_nd(x, {0, pad});
      }
      if (x.size(0) < dense_from_rows) {
        y = int4_linear(xk.contiguous(), qweight, meta, group_size);
      } else if (prefill_bf16) {
        y = at::mm(xk.to(at::kBFloat16), int4_dequantize_bf16(qweight, meta, group_size).t()).to(at::kFloat);
      } else {
        y = at::mm(xk, int4_dequantize(qweight, meta, group_size).t());
      }
      break;
    }
    case Kind::kConcat: {
      std::vector<at::Tensor> outs;
      outs.reserve(parts.size());
      for (const auto& part : parts) outs.push_back(part->apply(x));
      y = at::cat(outs, 1);
      break;
    }
    default:
      TORCH_CHECK(false, "a Linear was used before its weights were set");
  }
  if (bias.has_value()) y.add_(*bias);
  return y;
}

std::string Linear::describe() const {
  const std::string shape = std::to_string(out_features) + "x" + std::to_string(in_features);
  if (kind == Kind::kDense)
    return std::string(weight.scalar_type() == at::kFloat      ? "dense "
                       : weight.scalar_type() == at::kBFloat16 ? "dense bf16 "
                                                               : "dense fp16 ") +
           shape;
  if (kind == Kind::kConcat) {
    std::string out = "concat(";
    for (size_t i = 0; i < parts.size(); ++i) out += (i ? ", " : "") + parts[i]->describe();
    return out + ")";
  }
  if (kind == Kind::kInt4)
    return "int4 g" + std::to_string(group_size) + " " + shape + (source.has_value() ? " act-order" : "") +
           (pad ? " padded" : "");
  return "unset";
}

Norm* DecoderLayer::slot(const std::string& name) {
  Norm* n = name == "attention"       ? &attention_norm
            : name == "attention_out" ? &attention_out_norm
            : name == "mlp"           ? &mlp_norm
            : name == "mlp_out"       ? &mlp_out_norm
            : name == "q_heads"       ? &q_heads_norm
            : name == "k_heads"       ? &k_heads_norm
                                      : nullptr;
  TORCH_CHECK(n != nullptr, "unknown norm slot '", name,
              "'; expected attention, attention_out, mlp, mlp_out, q_heads or k_heads");
  return n;
}

void DecoderLayer::set_norm(const std::string& name, const at::Tensor& weight, double eps) {
  check_cpu_float(weight, "norm weight");
  TORCH_CHECK(weight.dim() == 1 && weight.is_contiguous(), "a norm weight must be contiguous [hidden]");
  TORCH_CHECK(eps > 0, "norm eps must be positive");
  Norm* n = slot(name);
  *n = Norm{weight, at::Tensor(), eps, false};
}

void DecoderLayer::set_layer_norm(const std::string& name, const at::Tensor& weight, const at::Tensor& bias,
                                  double eps) {
  check_cpu_float(weight, "norm weight");
  check_cpu_float(bias, "norm bias");
  TORCH_CHECK(weight.dim() == 1 && weight.is_contiguous() && bias.dim() == 1 && bias.is_contiguous() &&
                  bias.size(0) == weight.size(0),
              "a LayerNorm's weight and bias must be contiguous [hidden]");
  TORCH_CHECK(eps > 0, "norm eps must be positive");
  TORCH_CHECK(name != "q_heads" && name != "k_heads", "the head norms are RMSNorms");
  Norm* n = slot(name);
  *n = Norm{weight, bias, eps, true};
}

void DecoderLayer::set_parallel(bool p) { parallel = p; }

void DecoderLayer::set_router(const at::Tensor& weight, int64_t k) {
  check_cpu_float(weight, "router weight");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "the router weight must be contiguous [experts, hidden]");
  TORCH_CHECK(k > 0 && k <= weight.size(0), "top_k must be 1 to ", weight.size(0), " experts, not ", k);
  TORCH_CHECK(!gate_up && !down, "a layer has an MLP or experts, not both");
  router = weight;
  top_k = k;
}

void DecoderLayer::add_expert(const c10::intrusive_ptr<Linear>& gate_up_, const c10::intrusive_ptr<Linear>& down_) {
  TORCH_CHECK(router.defined(), "set the router before the experts");
  TORCH_CHECK(gate_up_->out_features == 2 * down_->in_features, "expert ", expert_down.size(), ": gate_up gives ",
              gate_up_->out_features, " outputs, down takes twice ", down_->in_features);
  TORCH_CHECK(!down_->bias.has_value(), "an expert's down takes no bias");
  TORCH_CHECK(static_cast<int64_t>(expert_down.size()) < router.size(0), "the router scores ", router.size(0),
              " experts; no more can be added");
  expert_gate_up.push_back(gate_up_);
  expert_down.push_back(down_);
}

int64_t DecoderLayer::hidden_size() const { return down ? down->out_features : expert_down.at(0)->out_features; }

void DecoderLayer::set_attention(const c10::intrusive_ptr<Linear>& qkv_, const c10::intrusive_ptr<Linear>& o_,
                                 int64_t heads, int64_t kv_heads, int64_t dim, double scale_) {
  TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0, heads, " query heads do not group over ", kv_heads,
              " kv heads");
  TORCH_CHECK(dim % 8 == 0 && dim <= 512, "head_dim must be a multiple of 8 up to 512, not ", dim);
  TORCH_CHECK(qkv_->out_features == (heads + 2 * kv_heads) * dim, "qkv has ", qkv_->out_features,
              " outputs, the heads need ", (heads + 2 * kv_heads) * dim);
  TORCH_CHECK(o_->in_features == heads * dim, "o takes ", o_->in_features, " inputs, the heads give ", heads * dim);
  TORCH_CHECK(!o_->bias.has_value(), "o's bias belongs after the all-reduce; the native layer takes none");
  qkv = qkv_;
  o = o_;
  num_heads = heads;
  num_kv_heads = kv_heads;
  head_dim = dim;
  scale = scale_;
}

void DecoderLayer::set_mlp(const c10::intrusive_ptr<Linear>& gate_up_, const c10::intrusive_ptr<Linear>& down_,
                           const std::string& activation_name) {
  TORCH_CHECK(activation_name == "silu" || activation_name == "gelu_tanh" || activation_name == "gelu",
              "the native MLP computes silu(gate) * up, gelu_tanh(gate) * up or gelu(up), not ", activation_name);
  const bool gated = activation_name != "gelu";
  TORCH_CHECK(gate_up_->out_features == (gated ? 2 : 1) * down_->in_features, gated ? "gate_up" : "up", " gives ",
              gate_up_->out_features, " outputs, down takes ", gated ? "twice " : "", down_->in_features);
  TORCH_CHECK(!down_->bias.has_value(), "down's bias belongs after the all-reduce; the native layer takes none");
  TORCH_CHECK(!router.defined(), "a layer has an MLP or experts, not both");
  gate_up = gate_up_;
  down = down_;
  activation = activation_name == "silu"        ? Activation::kSilu
               : activation_name == "gelu_tanh" ? Activation::kGeluTanh
                                                : Activation::kGelu;
}

void DecoderLayer::set_output_bias(const std::string& block, const at::Tensor& b) {
  check_cpu_float(b, "output bias");
  TORCH_CHECK(block == "attention" || block == "mlp", "unknown block '", block, "'; expected attention or mlp");
  TORCH_CHECK(b.dim() == 1 && b.is_contiguous(), "an output bias must be contiguous [hidden]");
  (block == "attention" ? o_bias : down_bias) = b;
}

void DecoderLayer::set_attention_softcap(double softcap) {
  TORCH_CHECK(softcap >= 0, "the score cap must be positive (or 0 for none), not ", softcap);
  attention_softcap = softcap;
}

void DecoderLayer::set_rotary_table(int64_t table) {
  TORCH_CHECK(table >= 0, "the rotary table index must be non-negative, not ", table);
  rotary_table = table;
}

void DecoderLayer::set_sliding_window(int64_t window) {
  TORCH_CHECK(window >= 0, "the sliding window must be positive (or 0 for none), not ", window);
  sliding_window = window;
}

void DecoderLayer::set_output_scale(double scale) {
  TORCH_CHECK(std::isfinite(scale) && scale != 0, "the output scale must be finite and non-zero, not ", scale);
  output_scale = scale;
}

void DecoderLayer::check() const {
  TORCH_CHECK(qkv && o, "the layer's attention is not set");
  const bool experts = router.defined() && static_cast<int64_t>(expert_down.size()) == router.size(0);
  TORCH_CHECK((gate_up && down) || experts, "the layer's MLP is not set",
              router.defined() ? " (fewer experts than the router scores)" : "");
  TORCH_CHECK(o->out_features == hidden_size(), "o and the MLP give different hidden sizes");
  for (const auto& d : expert_down)
    TORCH_CHECK(d->out_features == hidden_size(), "the experts give different hidden sizes");
  for (const auto* b : {&o_bias, &down_bias})
    TORCH_CHECK(!b->has_value() || (*b)->size(0) == o->out_features, "an output bias must be [hidden = ",
                o->out_features, "]");
  TORCH_CHECK(q_heads_norm.present() == k_heads_norm.present(), "set both head norms (q_heads, k_heads) or neither");
  TORCH_CHECK(!parallel || (!attention_out_norm.present() && !mlp_out_norm.present()),
              "a parallel layer has no block out-norms");
  for (const Norm* n : {&q_heads_norm, &k_heads_norm})
    TORCH_CHECK(!n->present() || n->weight.size(0) == head_dim, "a head norm's weight must be [head_dim = ", head_dim,
                "]");
}

namespace {

at::Tensor apply_norm(const Norm& norm, const at::Tensor& x) {
  if (norm.layer) return at::layer_norm(x, {norm.weight.size(0)}, norm.weight, norm.bias, norm.eps);
  return rms_norm(x, norm.weight, norm.eps);
}

// residual += x, then the norm of the stream where the slot has one (else the stream itself).
at::Tensor enter_block(const Norm& norm, const at::Tensor& x, at::Tensor& residual) {
  if (norm.present() && !norm.layer) return add_rms_norm_(x, residual, norm.weight, norm.eps);
  residual.add_(x);
  return norm.present() ? apply_norm(norm, residual) : residual;
}

at::Tensor leave_block(const Norm& norm, const c10::optional<at::Tensor>& bias, double scale, const at::Tensor& x) {
  at::Tensor y = bias.has_value() ? at::add(x, *bias) : x;
  if (norm.present()) y = apply_norm(norm, y);
  return scale == 1.0 ? y : at::mul(y, scale);
}

// heads [B, n, D] (a view into the fused qkv output) replaced by their RMSNorm over D.
void norm_heads_(const Norm& norm, at::Tensor heads) {
  const int64_t B = heads.size(0), n = heads.size(1), D = heads.size(2);
  heads.copy_(rms_norm(heads.reshape({B * n, D}).contiguous(), norm.weight, norm.eps).view({B, n, D}));
}

}  // namespace

at::Tensor DecoderLayer::attention(const at::Tensor& hidden, at::Tensor residual, const at::Tensor& cos,
                                   const at::Tensor& sin, at::Tensor k_cache, at::Tensor v_cache,
                                   const at::Tensor& slots, const at::Tensor& block_tables,
                                   const at::Tensor& context_lens) const {
  at::Tensor x = enter_block(attention_norm, hidden, residual);
  return attend(x, cos, sin, k_cache, v_cache, slots, block_tables, context_lens);
}

at::Tensor DecoderLayer::attend(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                                at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& slots,
                                const at::Tensor& block_tables, const at::Tensor& context_lens) const {
  const int64_t B = x.size(0), H = num_heads, KVH = num_kv_heads, D = head_dim;
  TORCH_CHECK(k_cache.size(3) == D, "the cache's head_dim is ", k_cache.size(3), ", the layer's ", D);
  at::Tensor qkv_out = qkv->apply(x);
  at::Tensor qk = qkv_out.narrow(1, 0, (H + KVH) * D).view({B, H + KVH, D});
  if (q_heads_norm.present()) {
    norm_heads_(q_heads_norm, qk.narrow(1, 0, H));
    norm_heads_(k_heads_norm, qk.narrow(1, H, KVH));
  }
  rotary_(qk, cos, sin);
  at::Tensor k = qkv_out.narrow(1, H * D, KVH * D).view({B, KVH, D});
  at::Tensor v = qkv_out.narrow(1, (H + KVH) * D, KVH * D).view({B, KVH, D});
  write_kv_(k, v, k_cache, v_cache, slots);
  at::Tensor q = qkv_out.narrow(1, 0, H * D).view({B, H, D});
  at::Tensor attn = paged_attention_decode(q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window,
                                           attention_softcap);
  return o->apply(attn.view({B, H * D}));
}

at::Tensor DecoderLayer::finish_attention(const at::Tensor& x) const {
  return leave_block(attention_out_norm, o_bias, output_scale, x);
}

at::Tensor DecoderLayer::mlp(const at::Tensor& attention, at::Tensor residual) const {
  return mlp_of(enter_block(mlp_norm, attention, residual));
}

at::Tensor DecoderLayer::experts_of(const at::Tensor& x) const {
  const int64_t B = x.size(0), E = router.size(0);
  const at::Tensor probs = at::softmax(at::mm(x, router.t()), -1);
  const auto top = at::topk(probs, top_k, -1);
  const at::Tensor chosen = std::get<1>(top);
  const at::Tensor weights = at::div(std::get<0>(top), std::get<0>(top).sum(-1, true));
  // Each expert runs once over the tokens that chose it, in expert order.
  std::vector<std::vector<int64_t>> rows(E), picks(E);
  const auto c = chosen.accessor<int64_t, 2>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < top_k; ++j) {
      rows[c[b][j]].push_back(b);
      picks[c[b][j]].push_back(b * top_k + j);
    }
  at::Tensor out = at::zeros({B, hidden_size()}, x.options());
  const at::Tensor flat = weights.reshape({-1});
  const auto index = at::TensorOptions().dtype(at::kLong);
  for (int64_t e = 0; e < E; ++e) {
    if (rows[e].empty()) continue;
    const at::Tensor r = at::tensor(rows[e], index);
    const at::Tensor w = flat.index_select(0, at::tensor(picks[e], index)).unsqueeze(1);
    at::Tensor y = expert_down[e]->apply(silu_mul(expert_gate_up[e]->apply(x.index_select(0, r))));
    out.index_add_(0, r, y.mul_(w));
  }
  return out;
}

at::Tensor DecoderLayer::mlp_of(const at::Tensor& x) const {
  if (router.defined()) return experts_of(x);
  const at::Tensor gu = gate_up->apply(x);
  switch (activation) {
    case Activation::kSilu:
      return down->apply(silu_mul(gu));
    case Activation::kGeluTanh:
      return down->apply(gelu_tanh_mul(gu));
    default:
      return down->apply(at::gelu(gu));
  }
}

at::Tensor DecoderLayer::parallel_blocks(const at::Tensor& hidden, at::Tensor residual, const at::Tensor& cos,
                                         const at::Tensor& sin, at::Tensor k_cache, at::Tensor v_cache,
                                         const at::Tensor& slots, const at::Tensor& block_tables,
                                         const at::Tensor& context_lens) const {
  TORCH_CHECK(parallel, "parallel_blocks on a layer whose blocks run one after the other");
  at::Tensor x = enter_block(attention_norm, hidden, residual);
  at::Tensor m = mlp_norm.present() ? apply_norm(mlp_norm, residual) : x;
  at::Tensor a = attend(x, cos, sin, k_cache, v_cache, slots, block_tables, context_lens);
  return a.add_(mlp_of(m));
}

at::Tensor DecoderLayer::finish_parallel(const at::Tensor& x) const {
  at::Tensor y = x;
  if (o_bias.has_value()) y = at::add(y, *o_bias);
  if (down_bias.has_value()) y = at::add(y, *down_bias);
  return output_scale == 1.0 ? y : at::mul(y, output_scale);
}

at::Tensor DecoderLayer::finish_mlp(const at::Tensor& x) const {
  return leave_block(mlp_out_norm, down_bias, output_scale, x);
}

void DecoderStack::append(const c10::intrusive_ptr<DecoderLayer>& layer) {
  layer->check();
  if (!layers.empty())
    TORCH_CHECK(layer->hidden_size() == layers[0]->hidden_size(), "layers of different hidden sizes");
  layers.push_back(layer);
}

at::Tensor DecoderStack::decode(const at::Tensor& hidden, at::Tensor residual, const at::Tensor& cos,
                                const at::Tensor& sin, const std::vector<at::Tensor>& k_caches,
                                const std::vector<at::Tensor>& v_caches, const at::Tensor& slots,
                                const at::Tensor& block_tables, const at::Tensor& context_lens) const {
  TORCH_CHECK(k_caches.size() == layers.size() && v_caches.size() == layers.size(), "the stack has ", layers.size(),
              " layers but ", k_caches.size(), " k and ", v_caches.size(), " v caches");
  TORCH_CHECK(cos.dim() == sin.dim() && (cos.dim() == 2 || cos.dim() == 3), "cos/sin must be [T, D] or [tables, T, D]");
  at::Tensor out = hidden;
  for (size_t l = 0; l < layers.size(); ++l) {
    const DecoderLayer& layer = *layers[l];
    at::Tensor layer_cos = cos, layer_sin = sin;
    if (cos.dim() == 3) {
      TORCH_CHECK(layer.rotary_table < cos.size(0), "layer ", l, " rotates by table ", layer.rotary_table, " of ",
                  cos.size(0));
      layer_cos = cos.select(0, layer.rotary_table);
      layer_sin = sin.select(0, layer.rotary_table);
    } else {
      TORCH_CHECK(layer.rotary_table == 0, "layer ", l, " rotates by table ", layer.rotary_table, " of 1");
    }
    if (layer.parallel) {
      out = layer.finish_parallel(layer.parallel_blocks(out, residual, layer_cos, layer_sin, k_caches[l], v_caches[l], slots,
                                                        block_tables, context_lens));
      continue;
    }
    at::Tensor a = layer.finish_attention(
        layer.attention(out, residual, layer_cos, layer_sin, k_caches[l], v_caches[l], slots, block_tables, context_lens));
    out = layer.finish_mlp(layer.mlp(a, residual));
  }
  return out;
}

}  // namespace tgs
