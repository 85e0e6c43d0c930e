"""The LM head's kernels: ``dense`` is exact, the others stay within their rounding of it.

The ``half`` head multiplies a few rows through an fp16 copy of the weight
and many rows through a bf16 copy; ``int8`` through 8-bit codes with one
scale per 64 features, then rescores exactly every token that could be the
largest logit and each row's best scores; ``int8-bf16`` is ``int8`` for a
few rows and bf16 above. Each must give the dense head's logits to the
precision of its format (``int8``: within its computed bound, and exactly
where it rescored), pick the dense head's winner where it promises to, and
be chosen (or refused) as the model's quantization, the CPU and
``LM_HEAD_KERNEL`` say.
"""

from __future__ import annotations

import pytest
import torch
from gptq_checkpoint import write_gptq_checkpoint
from text_generation_server.distributed import init_distributed
from text_generation_server.kernels.config import KernelConfig
from text_generation_server.layers.embedding import ParallelLMHead
from text_generation_server.layers.lm_head_kernels import (
    HALF_GEMV_MAX_ROWS,
    INT8_MAX_ROWS,
    RESCORED_TOP,
    half_head_unsupported,
    int8_error_bound,
    int8_head_unsupported,
    int8_kernel_layout,
    quantize_int8_rows,
)
from text_generation_server.models import load_model

CPU = torch.device("cpu")
VOCAB, HIDDEN = 1000, 96


def head(kernel: str) -> ParallelLMHead:
    g = torch.Generator().manual_seed(0)
    h = ParallelLMHead(VOCAB, HIDDEN, dist=init_distributed(0, 1), dtype=torch.float32, device=CPU, kernel=kernel)
    # fp16-representable weights, as a GPTQ checkpoint stores them.
    h.weight.data.copy_((torch.randn(VOCAB, HIDDEN, generator=g) * 0.1).half().float())
    h.choose_kernel(KernelConfig.from_env())
    return h


needs_bf16 = pytest.mark.skipif(
    half_head_unsupported(CPU) is not None, reason=f"half LM head: {half_head_unsupported(CPU)}"
)


@needs_bf16
@pytest.mark.parametrize("rows", [1, HALF_GEMV_MAX_ROWS, HALF_GEMV_MAX_ROWS + 1, 16])
def test_half_head_matches_the_dense_head_within_16_bit_rounding(rows, monkeypatch):
    hidden = torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(rows)) * 2
    dense = head("dense")
    monkeypatch.setenv("LM_HEAD_KERNEL", "half")
    half = head("half")
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
    with pytest.raises(ValueError, match=r"LM_HEAD_KERNEL='int3'.*one of dense, half, int8, int8-bf16"):
        head("dense")


def test_an_unknown_requested_kernel_is_refused():
    with pytest.raises(ValueError, match="unknown LM head kernel 'fp8'"):
        ParallelLMHead(VOCAB, HIDDEN, dist=init_distributed(0, 1), dtype=torch.float32, device=CPU, kernel="fp8")


def test_the_half_head_names_why_it_cannot_run_off_the_cpu():
    assert "CPU only" in half_head_unsupported(torch.device("cuda"))


def test_a_gptq_model_gets_a_fast_head_and_an_unquantized_one_the_dense_head(tmp_path, tiny_llama):
    quantized, _ = write_gptq_checkpoint(tiny_llama, tmp_path / "gptq", group_size=32)
    dist = init_distributed(0, 1)
    gptq = load_model(quantized, dtype=torch.float32, device=CPU, dist=dist, quantize="gptq")
    plain = load_model(tiny_llama, dtype=torch.float32, device=CPU, dist=dist)
    hidden = gptq.config.hidden_size
    half, int8 = half_head_unsupported(CPU), int8_head_unsupported(CPU, hidden)
    want = ("int8-bf16" if half is None and int8 is None else "half" if half is None
            else "int8" if int8 is None else "dense")
    assert gptq.lm_head.kernel == want
    assert plain.lm_head.kernel == "dense"


needs_int8 = pytest.mark.skipif(
    int8_head_unsupported(CPU, HIDDEN) is not None, reason=f"int8 LM head: {int8_head_unsupported(CPU, HIDDEN)}"
)


def outlier_weights(rows: int, hidden: int, seed: int) -> torch.Tensor:
    """fp16-representable weights with a few large entries per row, as real heads have."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, hidden, generator=g) * 0.05
    w.view(-1)[torch.randint(0, rows * hidden, (rows * hidden // 200,), generator=g)] *= 8
    return w.half().float()


@needs_int8
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_int8_logits_stay_within_their_computed_bound(rows):
    w = outlier_weights(VOCAB, HIDDEN, rows)
    x = torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(100 + rows)) * 3
    x[:, 5] *= 30  # an outlier feature
    codes, scales = quantize_int8_rows(w, 32)
    tiled = int8_kernel_layout(codes, scales)
    approx = torch.ops.tgs_cpu.int8_linear(x, *tiled, 32)[:, :VOCAB]
    exact = x.double() @ w.double().t()
    bound = int8_error_bound(scales, x, 32)
    err = (approx.double() - exact).abs()
    assert bool((err <= bound.double()).all()), float((err - bound.double()).max())
    # The bound is a bound, not a fiction: the 8-bit error comes within an order of it.
    assert float((err / bound.double()).max()) > 0.05


@needs_int8
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_int8_head_picks_the_dense_heads_token_and_rescores_the_top_exactly(rows):
    g = torch.Generator().manual_seed(rows)
    h_dense, h_int8 = head("dense"), head("int8")
    assert (h_dense.kernel, h_int8.kernel) == ("dense", "int8")
    w = outlier_weights(VOCAB, HIDDEN, 7)
    for h in (h_dense, h_int8):
        h.weight.data.copy_(w)
        h.choose_kernel(KernelConfig.from_env())
    # Near-ties on purpose: rows whose best two tokens differ by far less than 8-bit rounding.
    hidden = torch.randn(rows, HIDDEN, generator=g) * 2
    want = h_dense(hidden)
    got = h_int8(hidden)
    assert got.dtype == torch.float32 and got.shape == (rows, VOCAB)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    top = want.topk(RESCORED_TOP, dim=-1).indices
    torch.testing.assert_close(got.gather(1, top), want.gather(1, top), rtol=1e-5, atol=1e-5)
    # Elsewhere the 8-bit logits, within their bound.
    bound = int8_error_bound(h_int8.impl.scales, hidden, h_int8.impl.group)
    assert bool(((got - want).abs() <= bound).all())
    # Two tokens a hair apart: the 8-bit scores cannot tell them apart, the rescoring does.
    close = torch.randn(1, HIDDEN, generator=g)
    a, b = want[0].topk(2).indices.tolist()
    for h in (h_dense, h_int8):
        h.weight.data[b] = h.weight.data[a] + 1e-4 * torch.sign(close[0])
        h.choose_kernel(KernelConfig.from_env())
    assert torch.equal(h_int8(hidden[:1]).argmax(-1), h_dense(hidden[:1]).argmax(-1))


@needs_int8
@needs_bf16
@pytest.mark.parametrize("rows", [1, INT8_MAX_ROWS, INT8_MAX_ROWS + 1, 16])
def test_int8_bf16_head_is_int8_for_few_rows_and_bf16_above(rows, monkeypatch):
    hidden = torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(rows)) * 2
    mixed, int8, dense = head("int8-bf16"), head("int8"), head("dense")
    assert mixed.kernel == "int8-bf16"
    want = dense(hidden)
    got = mixed(hidden)
    if rows <= INT8_MAX_ROWS:
        torch.testing.assert_close(got, int8(hidden), rtol=0, atol=0)
    else:
        bf16 = (hidden.bfloat16() @ mixed.weight.bfloat16().t()).float()
        torch.testing.assert_close(got, bf16, rtol=0, atol=0)
    scale = want.abs().amax(-1, keepdim=True)
    assert float(((got - want).abs() / scale).max()) < 2e-2


def test_the_int8_head_names_why_it_cannot_run():
    assert "CPU only" in int8_head_unsupported(torch.device("cuda"), 64)
    assert "multiple of 32" in int8_head_unsupported(CPU, 100)


@needs_int8
def test_a_gptq_model_gets_the_int8_head_where_the_half_one_cannot_run(tmp_path, tiny_llama, monkeypatch):
    import text_generation_server.layers.lm_head_kernels as lm_head_kernels

    monkeypatch.setattr(lm_head_kernels, "half_head_unsupported", lambda device: "no native bf16 matrix products")
    quantized, _ = write_gptq_checkpoint(tiny_llama, tmp_path / "gptq", group_size=32)
    gptq = load_model(quantized, dtype=torch.float32, device=CPU, dist=init_distributed(0, 1), quantize="gptq")
    assert gptq.lm_head.kernel == "int8"
