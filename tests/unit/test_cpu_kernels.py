"""The native CPU kernels (``tgs_cpu``) against plain torch formulations of the same math.

Skipped where the kernels cannot run (not x86-64 with AVX2, or no compiler).
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from text_generation_server import kernels
from text_generation_server.layers import fused
from text_generation_server.layers.lm_head_kernels import int8_kernel_layout, quantize_int8_rows

pytestmark = pytest.mark.skipif(
    not kernels.cpu_ops_status().available,
    reason=f"native CPU kernels unavailable: {kernels.cpu_ops_status().reason}",
)


def ops():
    return torch.ops.tgs_cpu


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("rows,hidden", [(1, 576), (5, 64), (3, 100)])
def test_rms_norm_and_fused_residual_add_match_torch(rows, hidden):
    g = gen(1)
    x, w = torch.randn(rows, hidden, generator=g) * 4, torch.randn(hidden, generator=g)
    ref = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    torch.testing.assert_close(ops().rms_norm(x, w, 1e-5), ref, rtol=1e-6, atol=1e-6)
    residual, add = x.clone(), torch.randn(rows, hidden, generator=g)
    out = ops().add_rms_norm_(add, residual, w, 1e-5)
    torch.testing.assert_close(residual, x + add, rtol=0, atol=0)
    s = x + add
    torch.testing.assert_close(out, w * (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5)), rtol=1e-6, atol=1e-6)


def test_rotary_rotates_a_strided_view_in_place_like_rotate_half():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    g = gen(2)
    tokens, heads, kv_heads, d = 5, 3, 1, 64
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d, generator=g)
    before = qkv.clone()
    pos = torch.tensor([0, 3, 7, 100, 2048]).float()
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    emb = torch.cat([pos[:, None] * inv] * 2, -1)
    cos, sin = emb.cos().unsqueeze(1), emb.sin().unsqueeze(1)
    qk = qkv[:, : (heads + kv_heads) * d].view(tokens, heads + kv_heads, d)
    ops().rotary_(qk, cos.reshape(tokens, d), sin.reshape(tokens, d))
    ref_q, ref_k = apply_rotary_pos_emb(
        before[:, : heads * d].view(tokens, heads, d).transpose(0, 1).unsqueeze(0),
        before[:, heads * d : (heads + 1) * d].view(tokens, 1, d).transpose(0, 1).unsqueeze(0),
        cos.squeeze(1).unsqueeze(0),
        sin.squeeze(1).unsqueeze(0),
    )
    torch.testing.assert_close(qk[:, :heads], ref_q[0].transpose(0, 1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(qk[:, heads:], ref_k[0].transpose(0, 1), rtol=1e-6, atol=1e-6)
    # v, past the rotated heads, is untouched.
    torch.testing.assert_close(qkv[:, (heads + kv_heads) * d :], before[:, (heads + kv_heads) * d :], rtol=0, atol=0)


@pytest.mark.parametrize("inter", [1536, 20])
def test_silu_mul_matches_torch(inter):
    x = torch.randn(4, 2 * inter, generator=gen(3)) * 6
    x[0, :3] = torch.tensor([-100.0, 100.0, 0.0])
    gate, up = x.split([inter, inter], -1)
    torch.testing.assert_close(ops().silu_mul(x), F.silu(gate) * up, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("inter", [1536, 20])
def test_gelu_tanh_mul_matches_torch(inter):
    """Gemma's gated MLP: gelu with the tanh approximation (gelu_pytorch_tanh) of the gate times up."""
    x = torch.randn(4, 2 * inter, generator=gen(3)) * 6
    x[0, :3] = torch.tensor([-100.0, 100.0, 0.0])
    gate, up = x.split([inter, inter], -1)
    ref = F.gelu(gate, approximate="tanh") * up
    torch.testing.assert_close(ops().gelu_tanh_mul(x), ref, rtol=1e-5, atol=1e-5)


def test_write_kv_stores_rows_at_their_slots_like_index_copy():
    g = gen(4)
    cache_k, cache_v = torch.zeros(4, 16, 2, 8), torch.zeros(4, 16, 2, 8)
    qkv = torch.randn(3, 5 * 16, generator=g)
    k = qkv[:, 16:32].view(3, 2, 8)
    v = qkv[:, 32:48].view(3, 2, 8)
    slots = torch.tensor([5, 17, 63])
    ops().write_kv_(k, v, cache_k, cache_v, slots)
    ref_k, ref_v = torch.zeros(64, 2, 8), torch.zeros(64, 2, 8)
    ref_k.index_copy_(0, slots, k)
    ref_v.index_copy_(0, slots, v)
    torch.testing.assert_close(cache_k.view(64, 2, 8), ref_k, rtol=0, atol=0)
    torch.testing.assert_close(cache_v.view(64, 2, 8), ref_v, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="outside the cache"):
        ops().write_kv_(k, v, cache_k, cache_v, torch.tensor([1, 2, 64]))


def test_write_kv_into_a_bfloat16_cache_rounds_to_nearest_even():
    g = gen(6)
    cache_k, cache_v = torch.zeros(4, 16, 2, 8, dtype=torch.bfloat16), torch.zeros(4, 16, 2, 8, dtype=torch.bfloat16)
    k, v = torch.randn(3, 2, 8, generator=g) * 100, torch.randn(3, 2, 8, generator=g)
    slots = torch.tensor([0, 31, 63])
    ops().write_kv_(k, v, cache_k, cache_v, slots)
    assert torch.equal(cache_k.view(64, 2, 8)[slots], k.to(torch.bfloat16))
    assert torch.equal(cache_v.view(64, 2, 8)[slots], v.to(torch.bfloat16))
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        ops().write_kv_(k, v, cache_k.double(), cache_v.double(), slots)


def test_write_kv_into_a_float16_cache_rounds_like_torch():
    g = gen(7)
    cache_k, cache_v = torch.zeros(4, 16, 2, 8, dtype=torch.float16), torch.zeros(4, 16, 2, 8, dtype=torch.float16)
    k, v = torch.randn(3, 2, 8, generator=g) * 100, torch.randn(3, 2, 8, generator=g) * 1e-3
    slots = torch.tensor([0, 31, 63])
    ops().write_kv_(k, v, cache_k, cache_v, slots)
    assert torch.equal(cache_k.view(64, 2, 8)[slots], k.half())
    assert torch.equal(cache_v.view(64, 2, 8)[slots], v.half())


@pytest.fixture(params=["avx2", "avx512"])
def dense16_isa(request):
    """The instruction set of the dense kernels and decode attention, pinned for one test."""
    try:
        ops().set_dense16_isa(request.param)
    except RuntimeError as err:
        pytest.skip(str(err).splitlines()[0])
    yield request.param
    ops().set_dense16_isa("auto")


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("softcap", [0.0, 2.0], ids=["", "softcap2"])
@pytest.mark.parametrize("window", [0, 1, 7, 16, 40], ids=lambda w: f"window{w}")
@pytest.mark.parametrize("kv_heads,group,d", [(3, 3, 64), (1, 4, 32), (2, 1, 128), (1, 9, 64), (1, 5, 128),
                                              (2, 2, 80)])
def test_paged_decode_attention_equals_sdpa_over_the_gathered_context(kv_heads, group, d, window, softcap,
                                                                      cache_dtype, dense16_isa):
    """With a sliding window (> 0) each query sees the last ``window`` positions of its context;
    with a soft cap (> 0, Gemma 2) the scores are ``cap * tanh(score / cap)`` before the softmax.
    A 16-bit cache gives what float32 arithmetic on its values gives. On AVX-512, head sizes 32,
    64 and 128 take register-resident kernels over as many query heads per pass as fit (9 heads of
    64: passes of 6 and 3; 5 heads of 128: 2, 2 and 1); other sizes the eight-lane kernel."""
    g = gen(5)
    block, blocks = 16, 12
    k_cache = torch.randn(blocks, block, kv_heads, d, generator=g).to(cache_dtype)
    v_cache = torch.randn(blocks, block, kv_heads, d, generator=g).to(cache_dtype)
    lens = [1, 17, 40, 5]  # within one block, across two, three, ...
    tables = torch.zeros(len(lens), 4, dtype=torch.int64)
    perm = torch.randperm(blocks - 1, generator=g) + 1  # scattered blocks, 0 is padding
    used = 0
    for i, n in enumerate(lens):
        need = math.ceil(n / block)
        tables[i, :need] = perm[used : used + need]
        used += need
    heads = kv_heads * group
    q_rows = torch.randn(len(lens), (heads + 2 * kv_heads) * d, generator=g)
    q = q_rows[:, : heads * d].view(len(lens), heads, d)  # a strided view, as in the model
    out = ops().paged_attention_decode(
        q, k_cache, v_cache, tables, torch.tensor(lens), d**-0.5, window, softcap
    )
    for i, n in enumerate(lens):
        slots = torch.cat([torch.arange(block) + int(b) * block for b in tables[i]])[:n]
        if window:
            slots = slots[-window:]
        keys = k_cache.float().view(-1, kv_heads, d)[slots].transpose(0, 1)  # [kvh, n, d]
        values = v_cache.float().view(-1, kv_heads, d)[slots].transpose(0, 1)
        keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
        scores = (q[i].unsqueeze(1) @ keys.transpose(1, 2)) * d**-0.5  # [heads, 1, n]
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        ref = (scores.softmax(-1) @ values).squeeze(1)
        torch.testing.assert_close(out[i], ref, rtol=1e-5, atol=1e-5)


def test_paged_decode_attention_refuses_lengths_beyond_the_block_table():
    cache = torch.zeros(2, 4, 1, 8)
    with pytest.raises(RuntimeError, match="does not fit the block table"):
        ops().paged_attention_decode(
            torch.zeros(1, 1, 8), cache, cache, torch.zeros(1, 1, dtype=torch.int64), torch.tensor([5]), 1.0
        )


@pytest.mark.parametrize("n", [1, 5, 49152 // 64 + 3])
@pytest.mark.parametrize("m", [1, 3, 4, 7])
@pytest.mark.parametrize("group", [32, 64])
def test_int8_linear_equals_the_dequantized_product(m, n, group):
    g = gen(6)
    w = torch.randn(n, 576, generator=g)
    codes, scales = quantize_int8_rows(w, group)
    dense = codes.float() * scales.repeat_interleave(group, 1)
    assert (dense - w).abs().max() <= scales.max() / 2 + 1e-6
    x = torch.randn(m, 576, generator=g)
    got = ops().int8_linear(x, *int8_kernel_layout(codes, scales), group)[:, :n]
    ref = x @ dense.t()
    # Activations are quantized per 64 features to 16 bits: only the weights' rounding is left.
    assert float((got - ref).norm() / ref.norm()) < 1e-4


def test_int4_linear_names_what_is_wrong_with_a_layout():
    def call(group: int, groups: int, rows: int = 4, k: int = 128, meta_rows: int | None = None):
        ops().int4_linear(
            torch.zeros(1, k), torch.zeros(rows, k // 4, dtype=torch.int16),
            torch.zeros((meta_rows or rows) // 4, groups, 6, dtype=torch.int16), group,
        )

    with pytest.raises(RuntimeError, match="32 or a positive multiple of 64"):
        call(48, 2)
    with pytest.raises(RuntimeError, match="multiple of 4"):
        call(64, 2, rows=6)
    with pytest.raises(RuntimeError, match="multiple of 64"):
        call(32, 3, k=96)
    with pytest.raises(RuntimeError, match=r"meta must be contiguous int16 \[N / 4, K / group_size, 6\]"):
        call(64, 2, rows=8, meta_rows=4)


def test_pack_meta_lays_four_rows_scales_and_zeros_side_by_side():
    from text_generation_server.layers.quant.gptq_kernels.cpu_native import pack_meta

    scales = torch.arange(2 * 8, dtype=torch.float16).view(2, 8)  # [G, N]
    zeros = torch.arange(2 * 8, dtype=torch.int32).view(2, 8) + 100
    meta = pack_meta(scales, zeros)
    assert meta.shape == (2, 2, 6)
    tile, group = 1, 0
    assert meta[tile, group, :4].view(torch.float16).tolist() == scales[group, 4:8].tolist()
    assert meta[tile, group, 4:].contiguous().view(torch.uint8).tolist() == zeros[group, 4:8].tolist()


def test_fused_helpers_take_the_torch_path_for_other_dtypes():
    x = torch.randn(2, 64).to(torch.bfloat16)
    w = torch.ones(64, dtype=torch.bfloat16)
    assert fused.native_ops(x, w) is None
    torch.testing.assert_close(fused.rms_norm(x, w, 1e-6), fused._torch_rms_norm(x, w, 1e-6), rtol=0, atol=0)


def test_a_fresh_build_directory_is_compiled_once_then_reused(tmp_path):
    # In child processes: a process can load only one library registering tgs_cpu.
    script = (
        "import sys; from pathlib import Path; from text_generation_server import kernels; "
        "p = kernels.build(Path(sys.argv[1])); print(p, p.stat().st_mtime_ns)"
    )
    runs = [
        subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=600)
        for _ in range(2)
    ]
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr[-2000:] + runs[1].stderr[-2000:]
    assert "Compiling the CPU kernels" in runs[0].stderr and "Compiling" not in runs[1].stderr
    first, second = (r.stdout.split() for r in runs)
    assert first == second  # same library, not rebuilt
    assert (Path(first[0]).parent / "complete").read_text().strip() == kernels.build_key()


def test_cpu_kernels_off_is_reported(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "off")
    kernels.reset_for_tests()
    try:
        status = kernels.cpu_ops_status()
        assert not status.available and status.reason == "CPU_KERNELS=off"
        assert kernels.cpu_ops() is None
    finally:
        kernels.reset_for_tests()


def test_an_unknown_cpu_kernels_value_is_refused(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "fast")
    kernels.reset_for_tests()
    try:
        with pytest.raises(ValueError, match="expected one of auto, on, off"):
            kernels.cpu_ops_status()
    finally:
        kernels.reset_for_tests()


def test_int4_dequantize_rebuilds_the_checkpoint_weights_exactly():
    from gptq_random import random_gptq
    from text_generation_server.layers.quant.gptq_kernels.cpu_native import CpuInt4NativeKernel

    weights, dense = random_gptq(320, 48, group_size=64, sym=False)
    kernel = CpuInt4NativeKernel(weights)
    got = ops().int4_dequantize(kernel.qweight, kernel.meta, kernel.group_size)
    torch.testing.assert_close(got, dense, rtol=0, atol=0)


def test_int4_dequantize_bf16_rounds_the_checkpoint_weights_to_nearest_even():
    from gptq_random import random_gptq
    from text_generation_server.layers.quant.gptq_kernels.cpu_native import CpuInt4NativeKernel

    weights, dense = random_gptq(320, 48, group_size=64, sym=False, seed=3)
    kernel = CpuInt4NativeKernel(weights)
    got = ops().int4_dequantize_bf16(kernel.qweight, kernel.meta, kernel.group_size)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, dense.to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "gptq"])
def test_decode_through_the_native_stack_equals_native_layers_and_modules(quantized, tmp_path):
    """One native call for the whole stack, two per layer, or the torch modules: the same decode."""
    from gptq_checkpoint import write_gptq_checkpoint
    from paged_runner import PagedRunner
    from text_generation_server.distributed import init_distributed
    from text_generation_server.execution import ModulePlan
    from text_generation_server.execution.native import NativeCpuLayersPlan
    from text_generation_server.kernels.config import KernelConfig
    from text_generation_server.models import load_model
    from tiny_model import build_tiny_llama

    # Widths the native 4-bit kernel takes (multiples of 64); 3 layers, 4/2 heads, tied head.
    path = build_tiny_llama(tmp_path / "tiny", hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    if quantized:
        path, _ = write_gptq_checkpoint(path, tmp_path / "gptq", group_size=32)
    model = load_model(path, dtype=torch.float32, device=torch.device("cpu"), dist=init_distributed(0, 1),
                       quantize="gptq" if quantized else None)
    assert model.plan.name == "native-cpu-stack", model.plan.describe()
    assert "in one native call" in model.plan.describe()
    plans = {
        "stack": model.plan,
        "layers": NativeCpuLayersPlan.build(model, KernelConfig()),
        "modules": ModulePlan(model),
    }

    def decode(mode: str) -> list[torch.Tensor]:
        runner = PagedRunner(model, seed=3, plan=plans[mode])
        prompts = {"a": [5, 9, 14, 3, 27], "b": [8, 1]}
        last = {k: int(v[-1].argmax()) for k, v in zip(prompts, runner.step(list(prompts.items())), strict=True)}
        out = []
        for _ in range(6):
            logits = runner.step([(k, [t]) for k, t in last.items()])
            out.append(torch.cat(logits))
            last = {k: int(v[-1].argmax()) for k, v in zip(last, logits, strict=True)}
        return out

    via_stack, via_layers, via_modules = decode("stack"), decode("layers"), decode("modules")
    # The short prompts run natively too (each token a decode row); the module plan prefills them with
    # its prefill kernel, which for 4-bit weights takes bfloat16 activations on CPUs with bf16
    # instructions: their keys differ by that rounding.
    tol = 3e-3 if quantized else 1e-4
    for a, b, c in zip(via_stack, via_layers, via_modules, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 96, 576), (2, 7, 64), (3, 64, 1536), (5, 13, 100), (16, 33, 40),
                                           (37, 8, 8), (4, 3, 7), (70, 9, 96), (130, 5, 33)])
def test_dense16_linear_is_the_float32_product_of_the_16_bit_weights(m, n, k, dtype, dense16_isa):
    """Every tile shape (rows of x in fours, threes, twos and ones; weight rows in fours and a
    remainder; features in whole vectors and a tail; blocks of 64 rows of x): the product of
    float32 activations with the weights' own values, summed in float32, on either instruction set."""
    g = gen(m * 1000 + n + k)
    w = (torch.randn(n, k, generator=g) * 0.1).to(dtype)
    rows = torch.randn(m, k + 5, generator=g)
    x = rows[:, 2 : k + 2]  # rows with a stride, as a slice of a fused output is
    got = ops().dense16_linear(x, w)
    ref = x.double() @ w.double().t()
    assert got.dtype == torch.float32 and got.shape == (m, n)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5 * math.sqrt(k))


def test_dense16_linear_names_what_is_wrong():
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="weight must be bfloat16 or float16, got Float"):
        ops().dense16_linear(x, torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="x has 8 features, the weight 16"):
        ops().dense16_linear(x, torch.randn(4, 16).half())
    with pytest.raises(RuntimeError, match="dense16 ISA must be auto, avx2 or avx512"):
        ops().set_dense16_isa("sse2")


def _has_bf16_dot() -> bool:
    return ops().dense16_dot_rows() > 0


@pytest.mark.parametrize(("m", "n", "k"), [(1, 8, 576), (3, 7, 64), (4, 64, 1536), (5, 13, 100), (16, 33, 40),
                                           (17, 4, 31), (70, 9, 96), (130, 5, 33)])
def test_dense_bf16_dot_is_the_float32_sum_of_the_bf16_rounded_products(m, n, k):
    """Tiles of four weight rows and a remainder, rows of x in fours and a tail, blocks of 64 rows
    of x, features in 32s and a masked tail: x rounded to bfloat16 (nearest even), every product
    of two bf16 values exact in float32, summed in float32."""
    if not _has_bf16_dot():
        pytest.skip("this CPU has no bf16 dot products (AVX-512 BF16)")
    g = gen(m * 1000 + n + k)
    w = (torch.randn(n, k, generator=g) * 0.1).bfloat16()
    rows = torch.randn(m, k + 5, generator=g)
    x = rows[:, 2 : k + 2]  # rows with a stride
    got = ops().dense_bf16_dot(x, w)
    ref = x.bfloat16().double() @ w.double().t()
    assert got.dtype == torch.float32 and got.shape == (m, n)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5 * math.sqrt(k))


def test_dense_bf16_dot_names_what_is_wrong():
    if not _has_bf16_dot():
        with pytest.raises(RuntimeError, match="no bf16 dot products"):
            ops().dense_bf16_dot(torch.randn(2, 8), torch.randn(4, 8).bfloat16())
        return
    with pytest.raises(RuntimeError, match="bf16 dot products take bfloat16 weights, got Half"):
        ops().dense_bf16_dot(torch.randn(2, 8), torch.randn(4, 8).half())
    with pytest.raises(RuntimeError, match="x has 8 features, the weight 16"):
        ops().dense_bf16_dot(torch.randn(2, 8), torch.randn(4, 16).bfloat16())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("m", [1, 15, 16, 40])
def test_dense16_product_takes_bf16_dot_products_from_16_rows_where_the_cpu_has_them(dtype, m):
    """The one policy the native layers and the dense head share: the exact widening kernel,
    except bfloat16 weights times 16 rows or more on a CPU with bf16 dot products."""
    g = gen(m + 7)
    w = (torch.randn(24, 48, generator=g) * 0.1).to(dtype)
    x = torch.randn(m, 48, generator=g)
    dot = dtype == torch.bfloat16 and _has_bf16_dot() and m >= 16
    assert ops().dense16_dot_rows() in (0, 16)
    want = ops().dense_bf16_dot(x, w) if dot else ops().dense16_linear(x, w)
    torch.testing.assert_close(ops().dense16_product(x, w), want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("m", [1, 15, 16, 40])
def test_a_16_bit_dense_linear_of_the_native_layers_is_close_to_its_float32_product(dtype, m):
    """Below 16 rows the widening kernel (exact products); from 16 rows on, bfloat16 weights take
    the CPU's bf16 dot products where it has them (activations rounded to bf16)."""
    g = gen(m)
    w = (torch.randn(48, 64, generator=g) * 0.1).to(dtype)
    bias = torch.randn(48, generator=g)
    lin = torch.classes.tgs_cpu.Linear()
    lin.set_dense(w)
    lin.set_bias(bias)
    assert lin.describe() == f"dense {'bf16' if dtype == torch.bfloat16 else 'fp16'} 48x64"
    x = torch.randn(m, 64, generator=g)
    ref = x @ w.float().t() + bias
    rounded = dtype == torch.bfloat16 and m >= 16 and _has_bf16_dot()
    tol = 2e-2 if rounded else 1e-5
    torch.testing.assert_close(lin.apply(x), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize(("k", "n", "group"), [(576, 96, 64), (1536, 64, 64), (512, 32, 128), (1024, 16, 256)])
@pytest.mark.parametrize("rows", [1, 2, 5])
def test_the_avx512_vnni_4_bit_kernel_gives_the_avx2_kernels_result_bit_for_bit(k, n, group, rows):
    from gptq_random import random_gptq
    from text_generation_server.layers.quant.gptq_kernels.cpu_native import CpuInt4NativeKernel

    try:
        ops().set_int4_isa("avx512-vnni")
    except RuntimeError as err:
        pytest.skip(str(err).splitlines()[0])
    try:
        weights, dense = random_gptq(k, n, group_size=group, sym=False, seed=k + n)
        kernel = CpuInt4NativeKernel(weights)
        x = torch.randn(rows, k, generator=gen(rows)) * 3
        x32 = kernel.layout.kernel_input(x).contiguous()
        wide = ops().int4_linear(x32, kernel.qweight, kernel.meta, kernel.group_size)
        assert ops().set_int4_isa("avx2") == "avx2"
        narrow = ops().int4_linear(x32, kernel.qweight, kernel.meta, kernel.group_size)
    finally:
        ops().set_int4_isa("auto")
    torch.testing.assert_close(wide, narrow, rtol=0, atol=0)
    assert float((wide - x @ dense.t()).norm() / (x @ dense.t()).norm()) < 2e-4


def test_an_unknown_int4_isa_is_refused(monkeypatch):
    monkeypatch.setenv(kernels.ISA_ENV, "sse2")
    kernels.reset_for_tests()
    try:
        with pytest.raises(ValueError, match="expected one of auto, avx2, avx512-vnni"):
            kernels.cpu_ops_status()
    finally:
        monkeypatch.delenv(kernels.ISA_ENV)
        kernels.reset_for_tests()
    with pytest.raises(RuntimeError, match="int4 ISA must be auto, avx2 or avx512-vnni"):
        ops().set_int4_isa("sse2")


def test_a_built_library_another_user_could_have_written_is_not_loaded(tmp_path):
    """As the shard socket directory: whoever can replace the library runs code in every shard."""
    import os
    import shutil

    if not kernels.cpu_ops_status().available:
        pytest.skip(f"native CPU kernels unavailable: {kernels.cpu_ops_status().reason}")
    built = kernels.build()  # the library this process loaded
    root = tmp_path / "cache"
    target = root / kernels.build_key()
    target.mkdir(parents=True)
    os.chmod(root, 0o755)
    library = target / built.name
    shutil.copy(built, library)
    (target / "complete").write_text(kernels.build_key() + "\n")
    os.chmod(target, 0o755)
    os.chmod(library, 0o755)
    kernels.check_trusted(library)  # this user's, closed to others: fine

    os.chmod(target, 0o777)
    with pytest.raises(kernels.UntrustedLibraryError, match=rf"{target} \(owner \S+, mode 0777\).*chmod go-w"):
        kernels.build(root)
    os.chmod(target, 0o755)
    if os.geteuid() == 0:
        os.chown(library, 65534, 65534)
        with pytest.raises(kernels.UntrustedLibraryError, match=rf"{library} \(owner \S+, mode 0755\)"):
            kernels.build(root)
