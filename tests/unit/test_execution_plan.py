"""The execution plan: chosen once at load from the model's spec, the device and the kernels.

A new architecture is its module file and its spec. The variant below exists
only in this test (norms after each block instead of before it, as OLMo-2
places them); it is registered, loaded from a checkpoint like any model, and
must get the native decode path with the arithmetic of its own modules and of
an independent plain-torch forward written here.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from paged_runner import PagedRunner
from safetensors.torch import load_file, save_file
from text_generation_server import kernels as kernels_module
from text_generation_server.distributed import init_distributed
from text_generation_server.execution import ModulePlan, choose_plan
from text_generation_server.execution.native import NativeCpuLayersPlan
from text_generation_server.kernels.config import DENSE_FROM_ROWS, KernelConfig, KernelConfigError
from text_generation_server.layers.norm import RMSNorm
from text_generation_server.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from text_generation_server.models.spec import AttentionSpec, DecoderLayerSpec, MLPSpec
from tiny_model import build_tiny_llama

CPU = torch.device("cpu")
ARCH = "PostNormLlamaForCausalLM"


class PostNormDecoderLayer(LlamaDecoderLayer):
    """Attention and MLP read the residual stream as it is and their outputs are normed
    before they join it: ``x += norm(attn(x)); x += norm(mlp(x))``."""

    def __init__(self, b, prefix: str) -> None:
        super().__init__(b, prefix)
        hidden, eps = b.config.hidden_size, b.config.rms_norm_eps
        del self.input_layernorm
        # post_attention_layernorm (inherited) now norms the attention output.
        self.post_feedforward_layernorm = RMSNorm(hidden, eps, dtype=b.dtype, device=b.device)

    def forward(self, hidden, residual, cos, sin, kv_cache, attn):
        residual.add_(hidden)
        out = self.post_attention_layernorm(self.self_attn(residual, cos, sin, kv_cache, attn))
        residual.add_(out)
        return self.post_feedforward_layernorm(self.mlp(residual))

    def spec(self) -> DecoderLayerSpec:
        a, m = self.self_attn, self.mlp
        return DecoderLayerSpec(
            attention=AttentionSpec(qkv=a.qkv_proj, o=a.o_proj, num_heads=a.num_heads,
                                    num_kv_heads=a.num_kv_heads, head_dim=a.head_dim, scale=a.attn.scale),
            mlp=MLPSpec(gate_up=m.gate_up_proj, down=m.down_proj),
            attention_norm=None,
            mlp_norm=None,
            attention_out_norm=self.post_attention_layernorm,
            mlp_out_norm=self.post_feedforward_layernorm,
        )


class PostNormLlamaForCausalLM(LlamaForCausalLM):
    decoder_layer_cls = PostNormDecoderLayer


@pytest.fixture
def post_norm_checkpoint(tmp_path: Path, monkeypatch) -> Path:
    """A tiny checkpoint of the variant (random norm weights, so every norm matters), registered."""
    from text_generation_server import models

    path = build_tiny_llama(tmp_path / "post-norm", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2)
    file = path / "model.safetensors"
    tensors = load_file(file)
    g = torch.Generator().manual_seed(11)
    for i in range(3):
        del tensors[f"model.layers.{i}.input_layernorm.weight"]
        for name in ("post_attention_layernorm", "post_feedforward_layernorm"):
            tensors[f"model.layers.{i}.{name}.weight"] = 1 + 0.2 * torch.randn(64, generator=g)
    save_file(tensors, file, metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = [ARCH]
    (path / "config.json").write_text(json.dumps(config))
    monkeypatch.setitem(models._ARCHITECTURES, ARCH, PostNormLlamaForCausalLM)
    return path


def reference_logits(path: Path, ids: list[int]) -> torch.Tensor:
    """The variant's forward in plain torch, float64, from the checkpoint's tensors."""
    w = {k: v.double() for k, v in load_file(path / "model.safetensors").items()}
    c = json.loads((path / "config.json").read_text())
    heads, kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
    dim, eps = c["hidden_size"] // heads, c["rms_norm_eps"]
    t = len(ids)
    theta = c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta")
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    freqs = torch.outer(torch.arange(t, dtype=torch.float64), inv)
    cos, sin = torch.cat([freqs, freqs], -1).cos()[:, None], torch.cat([freqs, freqs], -1).sin()[:, None]

    def rms(x, weight):
        return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    def rope(x):
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    x = w["model.embed_tokens.weight"][ids]
    mask = torch.full((t, t), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        q = rope((x @ w[p + "self_attn.q_proj.weight"].T).view(t, heads, dim))
        k = rope((x @ w[p + "self_attn.k_proj.weight"].T).view(t, kv_heads, dim))
        v = (x @ w[p + "self_attn.v_proj.weight"].T).view(t, kv_heads, dim)
        k, v = (z.repeat_interleave(heads // kv_heads, dim=1) for z in (k, v))
        scores = torch.einsum("thd,shd->hts", q, k) / dim**0.5 + mask
        a = torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(t, heads * dim)
        x = x + rms(a @ w[p + "self_attn.o_proj.weight"].T, w[p + "post_attention_layernorm.weight"])
        gate = torch.nn.functional.silu(x @ w[p + "mlp.gate_proj.weight"].T)
        m = (gate * (x @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
        x = x + rms(m, w[p + "post_feedforward_layernorm.weight"])
    return (rms(x, w["model.norm.weight"]) @ w["lm_head.weight"].T).float()


def load(path: Path, **kwargs):
    from text_generation_server.models import load_model

    return load_model(path, dtype=torch.float32, device=CPU, dist=init_distributed(0, 1), **kwargs)


def native_or_skip() -> None:
    status = kernels_module.cpu_ops_status()
    if not status.available:
        pytest.skip(f"native CPU kernels unavailable: {status.reason}")


def test_a_variant_defined_in_the_test_alone_gets_the_native_path(post_norm_checkpoint):
    native_or_skip()
    model = load(post_norm_checkpoint)
    assert type(model) is PostNormLlamaForCausalLM
    assert model.plan.name == "native-cpu-stack", model.plan.describe()
    plans = {"stack": model.plan, "layers": NativeCpuLayersPlan.build(model, KernelConfig()),
             "modules": ModulePlan(model)}
    assert isinstance(plans["layers"], NativeCpuLayersPlan), plans["layers"]
    prompt, follow = [5, 9, 14, 3, 27, 100, 8], [40, 2, 311, 77, 19]
    want = reference_logits(post_norm_checkpoint, prompt + follow)
    got: dict[str, list[torch.Tensor]] = {}
    for name, plan in plans.items():
        runner = PagedRunner(model, plan=plan, seed=5)
        steps = [runner.step([("a", prompt)])[0]]  # prefill: the modules, in every plan
        steps += [runner.step([("a", [tok])])[0] for tok in follow]  # decode: the plan's own path
        got[name] = steps
        torch.testing.assert_close(torch.cat(steps), want, atol=1e-4, rtol=1e-4)
    for a, b, c in zip(got["stack"], got["layers"], got["modules"], strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        torch.testing.assert_close(a, c, atol=1e-4, rtol=1e-4)


def test_a_layer_the_native_path_cannot_run_keeps_the_modules_and_says_why(post_norm_checkpoint, monkeypatch):
    native_or_skip()
    model = load(post_norm_checkpoint)
    spec = model.spec()
    relu = dataclasses.replace(spec.layers[1], mlp=dataclasses.replace(spec.layers[1].mlp, activation="relu"))
    changed = dataclasses.replace(spec, layers=[spec.layers[0], relu, *spec.layers[2:]])
    monkeypatch.setattr(model, "spec", lambda: changed)
    plan = choose_plan(model, KernelConfig())
    assert plan.name == "modules"
    assert "layer 1: activation 'relu' is not built natively (silu, gelu_tanh, gelu)" in plan.describe()


def test_without_the_native_kernels_every_model_runs_on_its_modules(post_norm_checkpoint, monkeypatch):
    monkeypatch.setenv("CPU_KERNELS", "off")
    kernels_module.reset_for_tests()
    try:
        model = load(post_norm_checkpoint)
    finally:
        monkeypatch.delenv("CPU_KERNELS")
        kernels_module.reset_for_tests()
    assert model.plan.name == "modules" and "CPU_KERNELS=off" in model.plan.describe()
    ids = [5, 9, 14, 3, 27, 100, 8]
    logits = PagedRunner(model).step([("a", ids)])[0]
    torch.testing.assert_close(logits, reference_logits(post_norm_checkpoint, ids), atol=1e-4, rtol=1e-4)


def test_a_plan_can_be_named_and_an_unknown_one_is_refused(post_norm_checkpoint):
    native_or_skip()
    assert load(post_norm_checkpoint, plan="native-cpu-layers").plan.name == "native-cpu-layers"
    with pytest.raises(ValueError, match="unknown execution plan 'cuda-graphs'; known: native-cpu-stack"):
        load(post_norm_checkpoint, plan="cuda-graphs")


def test_the_kernel_switches_are_parsed_once_and_refused_naming_the_variable():
    assert KernelConfig.from_env({}).describe() == "all automatic"
    pinned = KernelConfig.from_env({"GPTQ_KERNEL": "gptq-reference", "LM_HEAD_KERNEL": " Dense ", "CPU_KERNELS": ""})
    assert pinned.describe() == "GPTQ_KERNEL=gptq-reference, LM_HEAD_KERNEL=dense"
    cases = {
        "CPU_KERNELS": ("fast", "expected one of auto, on, off"),
        "CPU_KERNELS_ISA": ("sse2", "expected one of auto, avx2, avx512-vnni"),
        "LM_HEAD_KERNEL": ("fp8", "expected one of dense, half, int8, int8-bf16"),
        "GPTQ_PREFILL_DTYPE": ("float16", "expected one of auto, float32, bfloat16"),
        "GPTQ_KERNEL": ("marlin", "is not a GPTQ kernel; choose one of: gptq-triton"),
    }
    for variable, (value, allowed) in cases.items():
        with pytest.raises(KernelConfigError, match=f"{variable}=.?{value}.?.*{allowed}"):
            KernelConfig.from_env({variable: value})


@pytest.mark.parametrize("prefill", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_native_layers_4_bit_linear_is_the_python_kernel_on_both_sides_of_the_prefill_threshold(prefill):
    """One threshold and one prefill dtype: the C++ linear of the native layers gives the Python
    kernel's result bit for bit below and from DENSE_FROM_ROWS rows."""
    from gptq_random import random_gptq
    from text_generation_server.execution.native import build_linear
    from text_generation_server.layers.quant.gptq_kernels.cpu_native import CpuInt4NativeKernel

    native_or_skip()
    weights, _ = random_gptq(256, 64, group_size=64, sym=False, seed=4)
    pinned = "bfloat16" if prefill == torch.bfloat16 else "float32"
    kernel = CpuInt4NativeKernel.from_config(weights, KernelConfig(gptq_prefill_dtype=pinned))
    linear = build_linear(kernel.native_linear(), None)
    for rows in (1, DENSE_FROM_ROWS - 1, DENSE_FROM_ROWS, 130):
        x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows))
        torch.testing.assert_close(linear.apply(x), kernel(x), atol=0, rtol=0)


def test_the_native_layer_description_is_checked_where_it_is_built():
    native_or_skip()
    dense = torch.classes.tgs_cpu.Linear
    qkv, o = dense(), dense()
    qkv.set_dense(torch.zeros(4 * 16 + 2 * 2 * 16, 64))  # 4 q heads, 2 kv heads, head_dim 16
    o.set_dense(torch.zeros(64, 4 * 16))
    layer = torch.classes.tgs_cpu.DecoderLayer()
    with pytest.raises(RuntimeError, match="qkv has 128 outputs, the heads need 192"):
        layer.set_attention(qkv, o, 4, 4, 16, 0.25)
    with pytest.raises(RuntimeError, match="unknown norm slot 'pre'"):
        layer.set_norm("pre", torch.ones(64), 1e-5)
    with pytest.raises(RuntimeError, match="the layer's attention is not set"):
        torch.classes.tgs_cpu.DecoderStack().append(layer)
    layer.set_attention(qkv, o, 4, 2, 16, 0.25)
    with pytest.raises(RuntimeError, match=r"computes silu\(gate\) \* up, gelu_tanh\(gate\) \* up or gelu\(up\), not relu"):
        layer.set_mlp(dense(), dense(), "relu")
