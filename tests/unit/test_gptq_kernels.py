"""Every GPTQ kernel equals a dense matmul with the weights dequantized by hand.

The dense reference is built from the random integer codes, zero points and
scales themselves (``w = scale[g] * (q - zero[g])``), never by unpacking the
packed tensors the kernels read, so a packing or zero-offset mistake shows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gptq_random import activations, random_gptq, relative_error  # noqa: E402
from text_generation_server.layers.quant.gptq_kernels import GPTQWeights, build_kernel
from text_generation_server.layers.quant.gptq_kernels.cpu_int4 import (
    CpuInt4Kernel,
    choose_kernel_group,
)
from text_generation_server.layers.quant.gptq_kernels.cpu_native import CpuInt4NativeKernel
from text_generation_server.layers.quant.gptq_kernels.reference import ReferenceKernel
from text_generation_server.layers.quant.gptq_kernels.triton_kernel import TritonKernel

CPU = torch.device("cpu")


LAYOUTS = [
    pytest.param(dict(group_size=32), id="g32"),
    pytest.param(dict(group_size=64), id="g64"),
    pytest.param(dict(group_size=128), id="g128"),
    pytest.param(dict(group_size=-1), id="per-row"),
    pytest.param(dict(group_size=64, sym=False), id="g64-asym-v1"),
    pytest.param(dict(group_size=64, sym=False, fmt="gptq_v2"), id="g64-asym-v2"),
    pytest.param(dict(group_size=64, fmt="gptq_v2"), id="g64-sym-v2"),
    pytest.param(dict(group_size=64, desc_act=True), id="g64-act-order"),
    pytest.param(dict(group_size=128, desc_act=True, sym=False), id="g128-act-order-asym"),
    pytest.param(dict(group_size=-1, desc_act=True), id="per-row-act-order"),
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("k", [256, 576], ids=["k256", "k576"])
def test_reference_kernel_equals_dense_matmul(layout, k):
    weights, dense = random_gptq(k, 48, **layout)
    x = activations(5, k)
    got = ReferenceKernel(weights)(x)
    torch.testing.assert_close(got, x @ dense.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_reference_kernel_handles_every_packed_width(bits):
    weights, dense = random_gptq(128, 64, bits=bits, group_size=32, sym=False)
    x = activations(3, 128)
    torch.testing.assert_close(ReferenceKernel(weights)(x), x @ dense.t(), rtol=1e-5, atol=1e-5)


@pytest.fixture(params=["cpu-int4pack-bf16", "cpu-int4-avx2"])
def cpu_int4(request):
    """Each 4-bit CPU kernel (the native one only where it can run)."""
    if request.param == "cpu-int4-avx2":
        from text_generation_server.kernels import cpu_ops_status

        if not cpu_ops_status().available:
            pytest.skip(f"native CPU kernels unavailable: {cpu_ops_status().reason}")
        return CpuInt4NativeKernel
    return CpuInt4Kernel


# cpu-int4pack-bf16 rounds activations, scales and offsets to bf16 (8-bit mantissas),
# about 0.3% off the exact product; cpu-int4-avx2 quantizes activations per group to
# 16 bits (scales stay fp16), about 3e-5 off. The 4-bit weights themselves are 5-10%
# off the float layer they replace.
CPU_INT4_TOLERANCE = {"cpu-int4pack-bf16": 1e-2, "cpu-int4-avx2": 2e-4}


# The native kernel built directly multiplies calls of many rows in float32, whatever this CPU
# prefers (a shard passes GPTQ_PREFILL_DTYPE's choice); its bfloat16 prefill has tests below.


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("k", [256, 576], ids=["k256", "k576-ragged-at-g128"])
@pytest.mark.parametrize("n", [48, 40, 8], ids=["n48", "n40-padded", "n8"])
@pytest.mark.parametrize("m", [1, 2, 7], ids=["m1", "m2", "m7"])
def test_cpu_int4_kernels_equal_dense_matmul_within_their_rounding(cpu_int4, layout, k, n, m):
    weights, dense = random_gptq(k, n, **layout)
    assert cpu_int4.unsupported(weights, CPU) is None
    x = activations(m, k)
    got = cpu_int4(weights)(x)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert relative_error(got, x @ dense.t()) < CPU_INT4_TOLERANCE[cpu_int4.name]


@pytest.mark.parametrize("rows", [37, 200], ids=["integer-kernel", "unpacked-to-float"])
def test_cpu_int4_kernels_handle_wide_batches_and_bf16_inputs(cpu_int4, rows):
    weights, dense = random_gptq(576, 96, group_size=64, sym=False, desc_act=True)
    kernel = cpu_int4(weights)
    x = activations(rows, 576)
    assert relative_error(kernel(x), x @ dense.t()) < CPU_INT4_TOLERANCE[cpu_int4.name]
    y = kernel(x[:5].to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert relative_error(y.float(), x[:5] @ dense.t()) < 1e-2  # bf16 in and out


def native_kernel_or_skip():
    from text_generation_server.kernels import cpu_ops_status
    from text_generation_server.layers.quant.gptq_kernels.cpu_native import CpuInt4NativeKernel

    if not cpu_ops_status().available:
        pytest.skip(f"native CPU kernels unavailable: {cpu_ops_status().reason}")
    return CpuInt4NativeKernel


@pytest.mark.parametrize("rows", [96, 300])
def test_native_kernel_prefill_in_bfloat16_is_within_bf16_rounding_of_the_float_product(monkeypatch, rows):
    from text_generation_server.kernels.config import KernelConfig

    kernel_cls = native_kernel_or_skip()
    monkeypatch.setenv("GPTQ_PREFILL_DTYPE", "bfloat16")
    kernels = KernelConfig.from_env()
    assert kernels.prefill_dtype()[0] == torch.bfloat16
    weights, dense = random_gptq(576, 96, group_size=64, sym=False, desc_act=True)
    x = activations(rows, 576)
    got = kernel_cls.from_config(weights, kernels)(x)
    assert got.dtype == torch.float32
    want = x @ dense.t()
    err = relative_error(got, want)
    # Both operands rounded to bf16 (8 significant bits): ~2e-3 relative, never the float path's 1e-5.
    assert 1e-4 < err < 1e-2, err
    # The same product as torch's own bf16 matmul of the rounded operands.
    ref = (x.to(torch.bfloat16) @ dense.to(torch.bfloat16).t()).float()
    assert relative_error(got, ref) < 1e-2


def test_prefill_dtype_follows_the_cpu_unless_pinned(monkeypatch):
    from text_generation_server.kernels.config import KernelConfig
    from text_generation_server.utils import cpu

    for flags, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setenv("GPTQ_PREFILL_DTYPE", "auto")
        monkeypatch.setattr(cpu, "host_has_bf16_instructions", lambda flags=flags: flags)
        assert KernelConfig.from_env().prefill_dtype()[0] == want
    monkeypatch.setenv("GPTQ_PREFILL_DTYPE", "float16")
    with pytest.raises(ValueError, match="expected one of auto, float32, bfloat16"):
        KernelConfig.from_env()


def test_cpu_int4_kernels_keep_zero_activations_exactly_zero(cpu_int4):
    weights, _ = random_gptq(256, 32, group_size=64, sym=False)
    assert torch.count_nonzero(cpu_int4(weights)(torch.zeros(3, 256))) == 0


def test_cpu_int4_kernel_keeps_the_checkpoint_order_when_groups_are_whole(cpu_int4):
    weights, _ = random_gptq(256, 32, group_size=64)
    kernel = cpu_int4(weights)
    assert kernel.source is None and kernel.pad == 0 and kernel.group_size == 64


def test_cpu_int4_kernel_pads_a_ragged_last_group_instead_of_refusing(cpu_int4):
    # 576 = 4 * 128 + 64: the last group is half full.
    weights, dense = random_gptq(576, 32, group_size=128)
    kernel = cpu_int4(weights)
    assert (kernel.group_size, kernel.padded_in) in {(64, 576), (128, 640)}
    x = activations(2, 576)
    assert relative_error(kernel(x), x @ dense.t()) < CPU_INT4_TOLERANCE[cpu_int4.name]


def test_cpu_int4_kernel_takes_a_row_parallel_slice_of_act_order_groups(cpu_int4):
    # A rank holding the second half of an act-order layer sees every group partly.
    weights, dense = random_gptq(256, 32, group_size=64, desc_act=True, sym=False)
    half = GPTQWeights(
        qweight=weights.qweight[16:],
        qzeros=weights.qzeros,
        scales=weights.scales,
        g_idx=weights.g_idx[128:],
        bits=4,
        checkpoint_format="gptq",
    )
    x = activations(3, 128)
    assert relative_error(cpu_int4(half)(x), x @ dense[:, 128:].t()) < CPU_INT4_TOLERANCE[cpu_int4.name]


def test_kernel_group_choice_minimises_padding_and_prefers_larger_groups():
    assert choose_kernel_group(torch.tensor([128, 128])) == (128, 256)
    assert choose_kernel_group(torch.tensor([128, 64])) == (64, 192)
    assert choose_kernel_group(torch.tensor([40, 33])) == (64, 128)
    assert choose_kernel_group(torch.tensor([40, 20])) == (32, 96)


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_other_widths_fall_back_to_the_reference_on_cpu(bits):
    weights, dense = random_gptq(128, 32, bits=bits, group_size=32)
    kernel, reasons = build_kernel(weights, CPU)
    assert kernel.name == "gptq-reference"
    assert any("cpu-int4pack-bf16" in r and f"{bits}-bit" in r for r in reasons)
    x = activations(2, 128)
    torch.testing.assert_close(kernel(x), x @ dense.t(), rtol=1e-5, atol=1e-5)


def test_the_native_kernel_is_the_default_cpu_kernel_for_4_bit_where_it_runs(cpu_kernels):
    weights, _ = random_gptq(128, 32)
    kernel, reasons = build_kernel(weights, CPU)
    if cpu_kernels == "native":
        assert kernel.name == "cpu-int4-avx2" and reasons == []
    else:
        assert kernel.name == "cpu-int4pack-bf16"
        assert reasons == ["cpu-int4-avx2: the native CPU kernels are unavailable (CPU_KERNELS=off)"]


def test_a_preferred_kernel_is_tried_first():
    weights, _ = random_gptq(128, 32)
    kernel, _ = build_kernel(weights, CPU, prefer="gptq-reference")
    assert kernel.name == "gptq-reference"


def test_unknown_kernel_preference_names_the_choices():
    weights, _ = random_gptq(128, 32)
    with pytest.raises(ValueError, match="gptq-reference"):
        build_kernel(weights, CPU, prefer="marlin")


def test_triton_kernel_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    weights, _ = random_gptq(64, 32)
    assert "CUDA" in TritonKernel.unsupported(weights, CPU)


TRITON_CASES = [
    ["g32", dict(group_size=32), 64, 32],
    ["g32-asym-v2", dict(group_size=32, sym=False, fmt="gptq_v2"), 64, 32],
    ["g32-asym-v1", dict(group_size=32, sym=False), 96, 32],
    ["g32-act-order-ragged-n", dict(group_size=32, desc_act=True), 64, 40],
    ["g64-ragged-last-group", dict(group_size=64), 96, 32],
    ["per-row", dict(group_size=-1), 48, 32],
    ["8-bit", dict(group_size=32, bits=8, sym=False), 64, 32],
    ["2-bit", dict(group_size=32, bits=2), 64, 32],
]


@pytest.fixture(scope="module")
def triton_interpreted_errors() -> dict:
    pytest.importorskip("triton")
    script = Path(__file__).with_name("gptq_triton_check.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), json.dumps(TRITON_CASES)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", [c[0] for c in TRITON_CASES])
def test_triton_kernel_math_equals_dense_matmul_in_the_interpreter(triton_interpreted_errors, case):
    error = triton_interpreted_errors[case]
    assert isinstance(error, float), error
    assert error < 1e-5


def test_a_kernel_that_fails_to_build_falls_back_to_the_reference(monkeypatch):
    def refuse(self, weights):
        raise RuntimeError("expect N to be dividable by 16")

    monkeypatch.setattr(CpuInt4Kernel, "__init__", refuse)
    monkeypatch.setattr(CpuInt4NativeKernel, "__init__", refuse)
    weights, dense = random_gptq(128, 32)
    kernel, reasons = build_kernel(weights, CPU)
    assert kernel.name == "gptq-reference"
    assert "dividable by 16" in reasons[0]
    x = activations(2, 128)
    torch.testing.assert_close(kernel(x), x @ dense.t(), rtol=1e-5, atol=1e-5)
