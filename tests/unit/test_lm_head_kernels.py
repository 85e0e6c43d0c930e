"""The LM head's kernels: ``dense`` is exact, ``half`` and ``int8`` stay within their rounding of it.

The ``half`` head multiplies a few rows through an fp16 copy of the weight
and many rows through a bf16 copy; ``int8`` through 8-bit codes with one
scale per 64 features. Each must give the dense head's logits to the
precision of its format, pick the same clear winner, and be chosen (or
refused) as the model's quantization, the CPU and ``LM_HEAD_KERNEL`` say.
"""

from __future__ import annotations

import pytest
import torch
from gptq_checkpoint import write_gptq_checkpoint
from text_generation_server.distributed import init_distributed
from text_generation_server.layers.embedding import (
    HALF_GEMV_MAX_ROWS,
    ParallelLMHead,
    half_head_unsupported,
    int8_head_unsupported,
)
from text_generation_server.models import load_model

CPU = torch.device("cpu")
VOCAB, HIDDEN = 1000, 96


def head(kernel: str) -> ParallelLMHead:
    g = torch.Generator().manual_seed(0)
    h = ParallelLMHead(VOCAB, HIDDEN, dist=init_distributed(0, 1), dtype=torch.float32, device=CPU, kernel=kernel)
    # fp16-representable weights, as a GPTQ checkpoint stores them.
    h.weight.data.copy_((torch.randn(VOCAB, HIDDEN, generator=g) * 0.1).half().float())
    h.finish_loading()
    return h


needs_bf16 = pytest.mark.skipif(
    half_head_unsupported(CPU) is not None, reason=f"half LM head: {half_head_unsupported(CPU)}"
)


@needs_bf16
@pytest.mark.parametrize("rows", [1, HALF_GEMV_MAX_ROWS, HALF_GEMV_MAX_ROWS + 1, 16])
def test_half_head_matches_the_dense_head_within_16_bit_rounding(rows):
    hidden = torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(rows)) * 2
    dense, half = head("dense"), head("half")
    assert (dense.kernel, half.kernel) == ("dense", "half")
    want, got = dense(hidden), half(hidden)
    assert got.dtype == torch.float32 and got.shape == (rows, VOCAB)
    # fp16 keeps 11 significant bits, bf16 8; the inputs are rounded too.
    rel = 2e-3 if rows <= HALF_GEMV_MAX_ROWS else 2e-2
    scale = want.abs().amax(-1, keepdim=True)
    assert float(((got - want).abs() / scale).max()) < rel
    clear = (want.topk(2).values[:, 0] - want.topk(2).values[:, 1]) > 2 * rel * scale[:, 0]
    assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


def test_dense_head_is_exact():
    hidden = torch.randn(3, HIDDEN)
    h = head("dense")
    torch.testing.assert_close(h(hidden), hidden @ h.weight.T, atol=0, rtol=0)


def test_the_environment_forces_a_kernel_and_an_unknown_one_is_refused(monkeypatch):
    monkeypatch.setenv("LM_HEAD_KERNEL", "dense")
    assert head("half").kernel == "dense"
    monkeypatch.setenv("LM_HEAD_KERNEL", "int3")
    with pytest.raises(ValueError, match=r"LM_HEAD_KERNEL='int3'.*known: dense, half, int8"):
        head("dense")


def test_an_unknown_requested_kernel_is_refused():
    with pytest.raises(ValueError, match="unknown LM head kernel 'fp8'"):
        ParallelLMHead(VOCAB, HIDDEN, dist=init_distributed(0, 1), dtype=torch.float32, device=CPU, kernel="fp8")


def test_the_half_head_names_why_it_cannot_run_off_the_cpu():
    assert "CPU only" in half_head_unsupported(torch.device("cuda"))


@needs_bf16
def test_a_gptq_model_gets_the_half_head_and_an_unquantized_one_the_dense_head(tmp_path, tiny_llama):
    quantized, _ = write_gptq_checkpoint(tiny_llama, tmp_path / "gptq", group_size=32)
    dist = init_distributed(0, 1)
    gptq = load_model(quantized, dtype=torch.float32, device=CPU, dist=dist, quantize="gptq")
    plain = load_model(tiny_llama, dtype=torch.float32, device=CPU, dist=dist)
    assert gptq.lm_head.kernel == "half"
    assert plain.lm_head.kernel == "dense"


needs_int8 = pytest.mark.skipif(
    int8_head_unsupported(CPU, HIDDEN) is not None, reason=f"int8 LM head: {int8_head_unsupported(CPU, HIDDEN)}"
)


@needs_int8
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_int8_head_matches_the_dense_head_within_8_bit_rounding(rows):
    hidden = torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(rows)) * 2
    dense, int8 = head("dense"), head("int8")
    assert (dense.kernel, int8.kernel) == ("dense", "int8")
    want, got = dense(hidden), int8(hidden)
    assert got.dtype == torch.float32 and got.shape == (rows, VOCAB)
    scale = want.abs().amax(-1, keepdim=True)
    rel = 1e-2  # 8-bit weights: half a step of max|w| / 127 per weight
    assert float(((got - want).abs() / scale).max()) < rel
    clear = (want.topk(2).values[:, 0] - want.topk(2).values[:, 1]) > 2 * rel * scale[:, 0]
    assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


def test_the_int8_head_names_why_it_cannot_run():
    assert "CPU only" in int8_head_unsupported(torch.device("cuda"), 64)
    assert "multiple of 32" in int8_head_unsupported(CPU, 100)


@needs_int8
def test_a_gptq_model_gets_the_int8_head_where_the_half_one_cannot_run(tmp_path, tiny_llama):
    quantized, _ = write_gptq_checkpoint(tiny_llama, tmp_path / "gptq", group_size=32)
    gptq = load_model(quantized, dtype=torch.float32, device=CPU, dist=init_distributed(0, 1), quantize="gptq")
    assert gptq.lm_head.kernel == ("half" if half_head_unsupported(CPU) is None else "int8")
