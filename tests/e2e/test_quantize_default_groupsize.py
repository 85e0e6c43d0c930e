"""`text-generation-server quantize default OUT` with TGI's default --groupsize 128.

The default model is 576 wide (4.5 groups of 128): every layer reading the
hidden state ends in a 64-column group, as AutoGPTQ lays it out. The
checkpoint is read back with numpy (tests/gptq_twin.py) into a float twin;
the server's model code must compute transformers' forward over that twin,
and the twin must model held-out text better than round-to-nearest with the
same groups.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import REPO

sys.path.insert(0, str(REPO / "tests"))

from gptq_random import default_cpu_int4_kernel  # noqa: E402
from gptq_twin import dense_twin, read_tensors  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(3600)]

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("gptq-default-g128") / "smollm2-gptq-g128"
    # No --groupsize: the default (128) is the point. Few windows keep it to a minute or two.
    cmd = [str(Path(sys.executable).parent / "text-generation-server"), "quantize", "default", str(out),
           "--nsamples", "8", "--seqlen", "128"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stderr


@pytest.fixture(scope="module")
def twin(quantized, tmp_path_factory) -> Path:
    return dense_twin(quantized[0], tmp_path_factory.mktemp("gptq-default-g128-dense") / "twin")


def test_the_default_group_size_writes_a_short_last_group_on_the_576_wide_layers(quantized):
    out, log = quantized
    assert "Group size 128 leaves a shorter last group in self_attn.q_proj (576 = 4x128 + 64)" in log
    qc = json.loads((out / "quantize_config.json").read_text())
    assert qc["bits"] == 4 and qc["group_size"] == 128 and qc["desc_act"] is False
    t = read_tensors(out)
    widths = {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576), "self_attn.o_proj": (576, 576),
              "mlp.gate_proj": (1536, 576), "mlp.down_proj": (576, 1536)}
    for layer in (0, 29):
        for lin, (out_f, in_f) in widths.items():
            stem = f"model.layers.{layer}.{lin}"
            groups = math.ceil(in_f / 128)
            assert tuple(t[f"{stem}.qweight"].shape) == (in_f // 8, out_f)
            assert tuple(t[f"{stem}.qzeros"].shape) == (groups, out_f // 8)
            assert tuple(t[f"{stem}.scales"].shape) == (groups, out_f)
            assert torch.equal(t[f"{stem}.g_idx"], torch.arange(in_f, dtype=torch.int32) // 128)


def test_the_served_model_computes_transformers_forward_over_the_checkpoint_weights(quantized, twin):
    from paged_runner import PagedRunner
    from text_generation_server.distributed import init_distributed
    from text_generation_server.models import load_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = quantized
    ids = AutoTokenizer.from_pretrained(out)(PROMPT).input_ids
    model = load_model(out, dtype=torch.float32, device=torch.device("cpu"), dist=init_distributed(0, 1))
    assert model.kernel == default_cpu_int4_kernel()
    got = PagedRunner(model, num_blocks=16, block_size=16).step([("a", ids)])[0]
    reference = AutoModelForCausalLM.from_pretrained(twin, dtype=torch.float32).eval()
    with torch.no_grad():
        want = reference(torch.tensor([ids])).logits[0]
    assert float((got - want).norm() / want.norm()) < 2e-2
    assert got[-1].argmax() == want[-1].argmax()


def test_gptq_g128_models_held_out_text_better_than_round_to_nearest_g128(twin):
    from text_generation_server.model_source import resolve_model
    from text_generation_server.quantize.data import python_docs
    from text_generation_server.quantize.gptq import QuantSpec, quantize_rtn
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(twin)
    held_out = python_docs("eval").text[:200_000]  # never used for calibration
    ids = torch.tensor(tokenizer(held_out, add_special_tokens=False).input_ids[: 4 * 256]).view(4, 256)

    def loss(model) -> float:
        with torch.no_grad():
            return float(model(input_ids=ids, labels=ids).loss)

    gptq = loss(AutoModelForCausalLM.from_pretrained(twin, dtype=torch.float32).eval())
    rtn = AutoModelForCausalLM.from_pretrained(resolve_model(None), dtype=torch.float32).eval()
    spec = QuantSpec(bits=4, group_size=128)
    for name, module in rtn.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            module.weight.data = quantize_rtn(module.weight.data, spec).dequant
    rtn_loss = loss(rtn)
    print(f"held-out perplexity: GPTQ g128 {math.exp(gptq):.2f}, RTN g128 {math.exp(rtn_loss):.2f}")
    assert gptq < rtn_loss
