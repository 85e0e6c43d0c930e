"""A checkpoint written by GPTQModel 7.6.0 (act-order, g32, committed in
tests/fixtures/gptqmodel_tiny by benchmarks/make_gptqmodel_fixture.py) serves correctly.

Two independent references: transformers in float32 on the weights
dequantized from the checkpoint's own tensors, and GPTQModel's own greedy
tokens and top-5 logits, recorded when the fixture was made. GPTQModel runs
4-bit layers on the CPU through torch's int4 packed matmul with bf16
activations, as our CPU kernel does, so that kernel must reproduce its
numbers; the float32 reference kernel must reproduce transformers.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from gptq_random import cpu_int4_kernels
from paged_runner import PagedRunner
from safetensors.torch import load_file, save_file
from text_generation_server.distributed import init_distributed
from text_generation_server.models import load_model
from text_generation_server.quantize.packing import dequantize_gptq
from transformers import AutoTokenizer

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "gptqmodel_tiny"
EXPECTED = json.loads((FIXTURE / "gptqmodel_expected.json").read_text())["tokens"]
PROMPTS = [p for p in EXPECTED if not p.endswith("[top5]")]
CPU = torch.device("cpu")


def prompt_ids(prompt: str) -> list[int]:
    return AutoTokenizer.from_pretrained(FIXTURE)(prompt).input_ids


@pytest.fixture(scope="module")
def dequantized(tmp_path_factory) -> Path:
    """The fixture with every GPTQ layer replaced by its dequantized float32 weight."""
    out = tmp_path_factory.mktemp("gptqmodel-dense")
    config = json.loads((FIXTURE / "config.json").read_text())
    quant = config.pop("quantization_config")
    (out / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(FIXTURE / name, out / name)
    tensors = load_file(str(FIXTURE / "model.safetensors"))
    dense = {}
    for name, t in tensors.items():
        prefix, _, kind = name.rpartition(".")
        if kind == "qweight":
            dense[f"{prefix}.weight"] = dequantize_gptq(
                t, tensors[f"{prefix}.qzeros"], tensors[f"{prefix}.scales"],
                tensors[f"{prefix}.g_idx"], quant["bits"], quant["checkpoint_format"],
            ).contiguous()
        elif kind not in ("qzeros", "scales", "g_idx"):
            dense[name] = t.float()
    save_file(dense, str(out / "model.safetensors"))
    return out


@functools.cache
def served(kernel: str):
    # The linear kernel is under test: the LM head stays in fp32, as GPTQModel's is.
    os.environ.update(GPTQ_KERNEL=kernel, LM_HEAD_KERNEL="dense")
    try:
        return load_model(FIXTURE, dtype=torch.float32, device=CPU, dist=init_distributed(0, 1))
    finally:
        del os.environ["GPTQ_KERNEL"], os.environ["LM_HEAD_KERNEL"]


def greedy(model, ids: list[int], steps: int) -> tuple[torch.Tensor, list[int]]:
    runner = PagedRunner(model)
    logits = runner.step([("a", ids)])[0]
    tokens = [int(logits[-1].argmax())]
    for _ in range(steps - 1):
        tokens.append(int(runner.step([("a", [tokens[-1]])])[0][-1].argmax()))
    return logits, tokens


def test_the_fixture_is_an_act_order_gptqmodel_checkpoint():
    quant = json.loads((FIXTURE / "config.json").read_text())["quantization_config"]
    assert quant["meta"]["quantizer"] == ["gptqmodel:7.6.0"]
    assert (quant["bits"], quant["group_size"], quant["desc_act"]) == (4, 32, True)
    assert sum(f.stat().st_size for f in FIXTURE.iterdir()) < 200_000


@pytest.mark.parametrize("prompt", PROMPTS)
def test_reference_kernel_equals_transformers_on_the_dequantized_weights(dequantized, prompt):
    from transformers import AutoModelForCausalLM

    ids = prompt_ids(prompt)
    model = AutoModelForCausalLM.from_pretrained(dequantized, dtype=torch.float32).eval()
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0]
    got, _ = greedy(served("gptq-reference"), ids, 1)
    assert served("gptq-reference").kernel == "gptq-reference"
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_cpu_int4_kernel_reproduces_gptqmodels_own_tokens_and_logits(prompt):
    # The same bf16 arithmetic as GPTQModel's CPU kernel, so the same values.
    model = served("cpu-int4pack-bf16")
    assert model.kernel == "cpu-int4pack-bf16"
    logits, tokens = greedy(model, prompt_ids(prompt), len(EXPECTED[prompt]))
    assert tokens == EXPECTED[prompt]
    top = torch.topk(logits[-1], 5)
    expected_ids = [i for i, _ in EXPECTED[prompt + " [top5]"]]
    expected_values = torch.tensor([v for _, v in EXPECTED[prompt + " [top5]"]])
    assert top.indices.tolist() == expected_ids
    torch.testing.assert_close(top.values, expected_values, atol=2e-3, rtol=0)


@pytest.mark.parametrize("kernel", ["gptq-reference", *cpu_int4_kernels()[1:]])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_float_accurate_kernels_agree_with_gptqmodel_on_the_first_token(prompt, kernel):
    logits, tokens = greedy(served(kernel), prompt_ids(prompt), 1)
    assert tokens[0] == EXPECTED[prompt][0]
    expected_values = torch.tensor([v for _, v in EXPECTED[prompt + " [top5]"]])
    # fp32 activations vs GPTQModel's bf16: close, not equal.
    assert abs(float(logits[-1].max()) - float(expected_values[0])) < 0.1
