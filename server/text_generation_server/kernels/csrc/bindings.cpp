// Registers the operators (torch.ops.tgs_cpu.*) and the decoder classes
// (torch.classes.tgs_cpu.*). Nothing else lives here.
#include <torch/custom_class.h>
#include <torch/library.h>

#include "decoder.h"
#include "ops.h"

using c10::intrusive_ptr;
using tgs::DecoderLayer;
using tgs::DecoderStack;
using tgs::Linear;

TORCH_LIBRARY(tgs_cpu, m) {
  m.def("int4_linear(Tensor x, Tensor qweight, Tensor meta, int group_size) -> Tensor", &tgs::int4_linear);
  m.def("set_int4_isa(str name) -> str", &tgs::set_int4_isa);
  m.def("int4_dequantize(Tensor qweight, Tensor meta, int group_size) -> Tensor", &tgs::int4_dequantize);
  m.def("int4_dequantize_bf16(Tensor qweight, Tensor meta, int group_size) -> Tensor", &tgs::int4_dequantize_bf16);
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scales, int group_size) -> Tensor", &tgs::int8_linear);
  m.def("dense16_linear(Tensor x, Tensor weight) -> Tensor", &tgs::dense16_linear);
  m.def("dense_bf16_dot(Tensor x, Tensor weight) -> Tensor", &tgs::dense_bf16_dot);
  m.def("dense16_product(Tensor x, Tensor weight) -> Tensor", &tgs::dense16_product);
  m.def("dense16_dot_rows() -> int", &tgs::dense16_dot_rows);
  m.def("set_dense16_isa(str name) -> str", &tgs::set_dense16_isa);
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &tgs::rms_norm);
  m.def("add_rms_norm_(Tensor x, Tensor(a!) residual, Tensor weight, float eps) -> Tensor", &tgs::add_rms_norm_);
  m.def("rotary_(Tensor(a!) x, Tensor cos, Tensor sin) -> ()", &tgs::rotary_);
  m.def("silu_mul(Tensor x) -> Tensor", &tgs::silu_mul);
  m.def("gelu_tanh_mul(Tensor x) -> Tensor", &tgs::gelu_tanh_mul);
  m.def("write_kv_(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots) -> ()", &tgs::write_kv_);
  m.def(
      "paged_attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, "
      "float scale, int window=0, float softcap=0.0) -> Tensor",
      &tgs::paged_attention_decode);

  m.class_<Linear>("Linear")
      .def(torch::init<>())
      .def("set_dense", [](const intrusive_ptr<Linear>& self, const at::Tensor& weight) { self->set_dense(weight); })
      .def("set_int4",
           [](const intrusive_ptr<Linear>& self, const at::Tensor& qweight, const at::Tensor& meta, int64_t group_size,
              int64_t in_features, int64_t dense_from_rows, bool prefill_bf16) {
             self->set_int4(qweight, meta, group_size, in_features, dense_from_rows, prefill_bf16);
           })
      .def("set_bias", [](const intrusive_ptr<Linear>& self, const at::Tensor& bias) { self->set_bias(bias); })
      .def("add_part", [](const intrusive_ptr<Linear>& self, const intrusive_ptr<Linear>& part) { self->add_part(part); })
      .def("set_input_layout",
           [](const intrusive_ptr<Linear>& self, const c10::optional<at::Tensor>& source, int64_t in_features) {
             self->set_input_layout(source, in_features);
           })
      .def("apply", [](const intrusive_ptr<Linear>& self, const at::Tensor& x) { return self->apply(x); })
      .def("describe", [](const intrusive_ptr<Linear>& self) { return self->describe(); });

  m.class_<DecoderLayer>("DecoderLayer")
      .def(torch::init<>())
      .def("set_norm",
           [](const intrusive_ptr<DecoderLayer>& self, const std::string& slot, const at::Tensor& weight, double eps) {
             self->set_norm(slot, weight, eps);
           })
      .def("set_layer_norm",
           [](const intrusive_ptr<DecoderLayer>& self, const std::string& slot, const at::Tensor& weight,
              const at::Tensor& bias, double eps) { self->set_layer_norm(slot, weight, bias, eps); })
      .def("set_router", [](const intrusive_ptr<DecoderLayer>& self, const at::Tensor& weight,
                            int64_t top_k) { self->set_router(weight, top_k); })
      .def("add_expert", [](const intrusive_ptr<DecoderLayer>& self, const intrusive_ptr<Linear>& gate_up,
                            const intrusive_ptr<Linear>& down) { self->add_expert(gate_up, down); })
      .def("set_parallel", [](const intrusive_ptr<DecoderLayer>& self, bool parallel) { self->set_parallel(parallel); })
      .def("set_attention",
           [](const intrusive_ptr<DecoderLayer>& self, const intrusive_ptr<Linear>& qkv, const intrusive_ptr<Linear>& o,
              int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double scale) {
             self->set_attention(qkv, o, num_heads, num_kv_heads, head_dim, scale);
           })
      .def("set_mlp",
           [](const intrusive_ptr<DecoderLayer>& self, const intrusive_ptr<Linear>& gate_up,
              const intrusive_ptr<Linear>& down, const std::string& activation) {
             self->set_mlp(gate_up, down, activation);
           })
      .def("set_output_bias",
           [](const intrusive_ptr<DecoderLayer>& self, const std::string& block, const at::Tensor& bias) {
             self->set_output_bias(block, bias);
           })
      .def("set_sliding_window",
           [](const intrusive_ptr<DecoderLayer>& self, int64_t window) { self->set_sliding_window(window); })
      .def("set_attention_softcap",
           [](const intrusive_ptr<DecoderLayer>& self, double softcap) { self->set_attention_softcap(softcap); })
      .def("set_rotary_table",
           [](const intrusive_ptr<DecoderLayer>& self, int64_t table) { self->set_rotary_table(table); })
      .def("set_output_scale",
           [](const intrusive_ptr<DecoderLayer>& self, double scale) { self->set_output_scale(scale); })
      .def("check", [](const intrusive_ptr<DecoderLayer>& self) { self->check(); })
      .def("attention",
           [](const intrusive_ptr<DecoderLayer>& self, const at::Tensor& hidden, at::Tensor residual,
              const at::Tensor& cos, const at::Tensor& sin, at::Tensor k_cache, at::Tensor v_cache,
              const at::Tensor& slots, const at::Tensor& block_tables, const at::Tensor& context_lens) {
             return self->attention(hidden, residual, cos, sin, k_cache, v_cache, slots, block_tables, context_lens);
           })
      .def("finish_attention",
           [](const intrusive_ptr<DecoderLayer>& self, const at::Tensor& x) { return self->finish_attention(x); })
      .def("mlp", [](const intrusive_ptr<DecoderLayer>& self, const at::Tensor& attention,
                     at::Tensor residual) { return self->mlp(attention, residual); })
      .def("finish_mlp", [](const intrusive_ptr<DecoderLayer>& self, const at::Tensor& x) { return self->finish_mlp(x); })
      .def("parallel_blocks",
           [](const intrusive_ptr<DecoderLayer>& self, const at::Tensor& hidden, at::Tensor residual,
              const at::Tensor& cos, const at::Tensor& sin, at::Tensor k_cache, at::Tensor v_cache,
              const at::Tensor& slots, const at::Tensor& block_tables, const at::Tensor& context_lens) {
             return self->parallel_blocks(hidden, residual, cos, sin, k_cache, v_cache, slots, block_tables,
                                          context_lens);
           })
      .def("finish_parallel",
           [](const intrusive_ptr<DecoderLayer>& self, const at::Tensor& x) { return self->finish_parallel(x); });

  m.class_<DecoderStack>("DecoderStack")
      .def(torch::init<>())
      .def("append", [](const intrusive_ptr<DecoderStack>& self,
                        const intrusive_ptr<DecoderLayer>& layer) { self->append(layer); })
      .def("size", [](const intrusive_ptr<DecoderStack>& self) { return static_cast<int64_t>(self->layers.size()); })
      .def("decode",
           [](const intrusive_ptr<DecoderStack>& self, const at::Tensor& hidden, at::Tensor residual,
              const at::Tensor& cos, const at::Tensor& sin, std::vector<at::Tensor> k_caches,
              std::vector<at::Tensor> v_caches, const at::Tensor& slots, const at::Tensor& block_tables,
              const at::Tensor& context_lens) {
             return self->decode(hidden, residual, cos, sin, k_caches, v_caches, slots, block_tables, context_lens);
           });
}
