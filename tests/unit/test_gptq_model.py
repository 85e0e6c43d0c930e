"""A GPTQ checkpoint served on one shard equals transformers on the dequantized weights.

Most checkpoints are written by round-to-nearest (tests/gptq_checkpoint.py)
together with a float twin holding exactly the weights the packed tensors
encode; those our own quantizer writes (2 and 3 bits, static groups, ragged
groups) get their twin by reading the packed tensors back with numpy
(tests/gptq_twin.py). transformers' forward over the twin is the reference.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from gptq_checkpoint import write_gptq_checkpoint
from gptq_random import default_cpu_int4_kernel
from gptq_twin import calibration_text, dense_twin, run_quantizer
from paged_runner import PagedRunner
from text_generation_server.distributed import init_distributed
from text_generation_server.layers.quant.gptq import GPTQConfig, GPTQLinearMethod
from text_generation_server.layers.quant.registry import get_quant_method
from text_generation_server.models import load_model

CPU = torch.device("cpu")
IDS = torch.randint(0, 384, (11,), generator=torch.Generator().manual_seed(5)).tolist()

LAYOUTS = {
    "g32-sym-v1": dict(group_size=32),
    "g32-asym-v2": dict(group_size=32, sym=False, fmt="gptq_v2"),
    "g64-act-order-asym": dict(group_size=64, desc_act=True, sym=False),
    "per-row-legacy-config": dict(group_size=-1, legacy_config=True),
    "g48-ragged": dict(group_size=48),
    "8-bit-g32": dict(bits=8, group_size=32, sym=False),
}


# Checkpoints written by `text-generation-server quantize` (tiny_llama: 64 and 128 input features).
QUANTIZER_RUNS = {
    "ours-3-bit-g32": ["--bits", "3", "--groupsize", "32"],
    "ours-3-bit-g48-ragged-act-order-asym": ["--bits", "3", "--groupsize", "48", "--act-order", "--no-sym"],
    "ours-2-bit-g32": ["--bits", "2", "--groupsize", "32"],
    "ours-static-groups-act-order": ["--groupsize", "32", "--act-order", "--static-groups"],
    "ours-static-groups-act-order-g48-ragged": ["--groupsize", "48", "--act-order", "--static-groups"],
}


@pytest.fixture(scope="module")
def ours(tmp_path_factory, tiny_llama) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("gptq-ours")
    corpus = calibration_text(root / "calib.txt")
    runs = {}
    for name, flags in QUANTIZER_RUNS.items():
        quantized = run_quantizer(tiny_llama, root / name, corpus, *flags)
        runs[name] = (quantized, dense_twin(quantized, root / f"{name}-dense"))
    return runs


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_llama) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("gptq")
    return {
        name: write_gptq_checkpoint(tiny_llama, root / name, **layout)
        for name, layout in LAYOUTS.items()
    }


@functools.cache
def transformers_logits(path: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0]


def served(path: Path, quantize: str | None = "gptq"):
    model = load_model(path, dtype=torch.float32, device=CPU, dist=init_distributed(0, 1),
                       quantize=quantize)
    return model, PagedRunner(model).step([("a", IDS)])[0]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_reference_kernel_serves_exactly_the_dequantized_model(monkeypatch, checkpoints, layout):
    monkeypatch.setenv("GPTQ_KERNEL", "gptq-reference")
    quantized, dense = checkpoints[layout]
    model, logits = served(quantized)
    assert model.kernel == "gptq-reference"
    torch.testing.assert_close(logits, transformers_logits(dense), atol=1e-4, rtol=0)


@pytest.fixture(params=["cpu-int4pack-bf16", "cpu-int4-avx2"])
def cpu_kernel(request, monkeypatch) -> str:
    if request.param == "cpu-int4-avx2":
        from text_generation_server.kernels import cpu_ops_status

        if not cpu_ops_status().available:
            pytest.skip(f"native CPU kernels unavailable: {cpu_ops_status().reason}")
    monkeypatch.setenv("GPTQ_KERNEL", request.param)
    return request.param


@pytest.mark.parametrize("layout", ["g32-sym-v1", "g64-act-order-asym", "g48-ragged"])
def test_cpu_int4_kernels_serve_the_dequantized_model_within_their_rounding(checkpoints, layout, cpu_kernel):
    quantized, dense = checkpoints[layout]
    model, logits = served(quantized)
    assert model.kernel == cpu_kernel
    want = transformers_logits(dense)
    # bf16 activations (int4pack) or 8-bit LM head codes (where the CPU lacks bf16 products).
    assert float((logits - want).norm() / want.norm()) < 2e-2
    assert torch.equal(logits.argmax(-1), want.argmax(-1))


def test_a_gptq_checkpoint_is_served_as_gptq_without_the_flag(checkpoints):
    model, _ = served(checkpoints["g32-sym-v1"][0], quantize=None)
    assert model.kernel == default_cpu_int4_kernel()


def test_other_widths_are_served_through_the_reference_kernel(checkpoints):
    model, _ = served(checkpoints["8-bit-g32"][0])
    assert model.kernel == "gptq-reference"


@pytest.mark.parametrize("run", [r for r in QUANTIZER_RUNS if "-bit-" in r])
def test_2_and_3_bit_checkpoints_of_our_quantizer_serve_exactly_their_dequantized_model(monkeypatch, ours, run):
    """No GPTQ kernel preference: the CPU kernels decline 2/3 bits and the reference takes them
    (the LM head is pinned to fp32 so the comparison can be exact)."""
    monkeypatch.setenv("LM_HEAD_KERNEL", "dense")
    quantized, dense = ours[run]
    bits = json.loads((quantized / "config.json").read_text())["quantization_config"]["bits"]
    assert bits == int(run.split("-")[1])
    model, logits = served(quantized)
    assert model.kernel == "gptq-reference"
    torch.testing.assert_close(logits, transformers_logits(dense), atol=1e-4, rtol=0)


@pytest.mark.parametrize("run", [r for r in QUANTIZER_RUNS if r.startswith("ours-static-groups")])
def test_static_groups_act_order_checkpoints_of_our_quantizer_serve_their_dequantized_model(
    monkeypatch, ours, run
):
    quantized, dense = ours[run]
    qc = json.loads((quantized / "quantize_config.json").read_text())
    assert qc["desc_act"] is True and qc["static_groups"] is True
    monkeypatch.setenv("GPTQ_KERNEL", "gptq-reference")
    model, logits = served(quantized)
    assert model.kernel == "gptq-reference"
    want = transformers_logits(dense)
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=0)
    # The default 4-bit CPU kernel, within its rounding.
    monkeypatch.delenv("GPTQ_KERNEL")
    model, logits = served(quantized)
    assert model.kernel == default_cpu_int4_kernel()
    assert float((logits - want).norm() / want.norm()) < 2e-2
    assert torch.equal(logits.argmax(-1), want.argmax(-1))


def test_4_bit_weights_take_about_a_quarter_of_fp16(checkpoints, cpu_kernel):
    model, _ = served(checkpoints["g32-sym-v1"][0])
    methods = [m.quant_method for m in model.modules() if isinstance(getattr(m, "quant_method", None), GPTQLinearMethod)]
    held = sum(m.weight_bytes() for m in methods)
    fp16 = sum(m.fp16_bytes for m in methods)
    # 4 bits per weight plus, per 32 weights, a bf16 scale and offset (int4pack) or an
    # fp16 scale and an 8-bit zero point (native).
    per_group = {"cpu-int4pack-bf16": 4, "cpu-int4-avx2": 3}[cpu_kernel]
    assert held / fp16 == pytest.approx(0.25 + per_group / 32 / 2, rel=0.01)
    # The kernels' tensors are the model's buffers, so memory reports count them.
    buffers = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "gptq_" in n)
    assert buffers == held


def test_quantize_gptq_refuses_a_checkpoint_without_gptq_config(tiny_llama):
    with pytest.raises(ValueError, match="needs a GPTQ checkpoint"):
        load_model(tiny_llama, dtype=torch.float32, device=CPU, dist=init_distributed(0, 1),
                   quantize="gptq")


def test_other_quantize_flags_refuse_a_gptq_checkpoint():
    with pytest.raises(ValueError, match="quant_method 'gptq'"):
        get_quant_method("bitsandbytes-nf4", {"quant_method": "gptq", "bits": 4, "group_size": 128})


@pytest.mark.parametrize(
    "config,message",
    [
        ({"bits": 5, "group_size": 128}, "bits=5.*supported: 2, 3, 4, 8"),
        ({"bits": 4, "group_size": 128, "checkpoint_format": "marlin"}, "supported: gptq, gptq_v2"),
        ({"bits": 4, "group_size": -2}, "group_size=-2"),
        ({"bits": 4}, "lacks 'bits' or 'group_size'"),
        ({"bits": 4, "group_size": 128, "lm_head": True}, "lm_head"),
        ({"bits": 4, "group_size": 128, "desc_act": "yes"}, "'desc_act' must be true or false"),
    ],
)
def test_unservable_gptq_configs_are_refused_with_what_is_allowed(config, message):
    with pytest.raises(ValueError, match=message):
        GPTQConfig.from_checkpoint({"quant_method": "gptq", **config})


def test_config_reads_every_setting():
    c = GPTQConfig.from_checkpoint({
        "quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": True, "sym": False,
        "checkpoint_format": "gptq_v2", "static_groups": True,
    })
    assert (c.bits, c.group_size, c.desc_act, c.sym, c.checkpoint_format, c.static_groups) == (
        4, 64, True, False, "gptq_v2", True
    )
    assert c.input_alignment() == 64


@pytest.mark.parametrize(
    "bits,group_size,alignment",
    [(4, 64, 64), (4, -1, 8), (2, -1, 16), (8, 2, 4), (3, 128, 128), (3, 48, 96), (3, -1, 32)],
)
def test_row_parallel_splits_align_to_groups_and_whole_packed_words(bits, group_size, alignment):
    """3-bit codes cross word boundaries: only 32 features (3 words) make a whole unit."""
    c = GPTQConfig.from_checkpoint({"quant_method": "gptq", "bits": bits, "group_size": group_size})
    assert c.input_alignment() == alignment


def test_legacy_config_file_is_read(checkpoints):
    quantized, _ = checkpoints["per-row-legacy-config"]
    assert "quantization_config" not in json.loads((quantized / "config.json").read_text())
    model, _ = served(quantized, quantize=None)
    assert model.kernel == default_cpu_int4_kernel()


def _without_g_idx(src: Path, dst: Path) -> Path:
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    for file in dst.glob("*.safetensors"):
        tensors = {k: v for k, v in load_file(file).items() if not k.endswith(".g_idx")}
        save_file(tensors, file, metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("layout", ["g32-sym-v1", "g48-ragged", "per-row-legacy-config"])
def test_a_checkpoint_without_g_idx_and_act_order_serves_the_plain_layout(monkeypatch, checkpoints, layout, tmp_path):
    monkeypatch.setenv("GPTQ_KERNEL", "gptq-reference")
    quantized, dense = checkpoints[layout]
    _, logits = served(_without_g_idx(quantized, tmp_path / "no-g_idx"))
    torch.testing.assert_close(logits, transformers_logits(dense), atol=1e-4, rtol=0)


def test_an_act_order_checkpoint_without_g_idx_is_refused_naming_it(checkpoints, tmp_path):
    from text_generation_server.models import CheckpointError

    quantized, _ = checkpoints["g64-act-order-asym"]
    with pytest.raises(CheckpointError, match=r"g_idx"):
        served(_without_g_idx(quantized, tmp_path / "no-g_idx"))


@pytest.mark.parametrize("layout", ["g64-act-order-asym", "g32-asym-v2", "g48-ragged"])
def test_decode_steps_follow_the_dequantized_model_on_either_path(checkpoints, layout, cpu_kernels):
    """Decode through the native decoder stack or the modules stays with transformers on the
    dequantized weights: in checkpoint order, act-order (each part of a fused layer reordered its
    own way: a concatenation of native parts) and ragged groups (padded kernel inputs) alike."""
    from transformers import AutoModelForCausalLM

    quantized, dense = checkpoints[layout]
    model = load_model(quantized, dtype=torch.float32, device=CPU, dist=init_distributed(0, 1), quantize="gptq")
    assert model.plan.name == ("native-cpu-stack" if cpu_kernels == "native" else "modules"), model.plan.describe()
    ref = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    ids = IDS + [7, 200, 31, 5]
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    runner = PagedRunner(model, block_size=4)
    runner.step([("a", ids[: len(IDS)])])
    # The torch path multiplies 4-bit weights by bf16 activations (int4pack), the native one
    # by 16-bit integers, with an 8-bit LM head where the CPU has no bf16 products.
    tolerance = 1e-2 if cpu_kernels == "native" else 3e-2
    for pos in range(len(IDS), len(ids)):
        got = runner.step([("a", [ids[pos]])])[0][0]
        assert float((got - want[pos]).norm() / want[pos].norm()) < tolerance
        assert int(got.argmax()) == int(want[pos].argmax())


@pytest.mark.parametrize("layout", ["g32-sym-v1", "g64-act-order-asym"])
def test_mixtral_with_each_expert_quantized_serves_its_dequantized_model(tmp_path, layout):
    """A GPTQ Mixtral as GPTQModel writes it (every expert's w1/w2/w3 quantized on its own, the
    router float): the reference kernel is transformers on the dequantized weights; the native
    4-bit kernel decodes through the native stack within its rounding. (2 shards: in
    tests/distributed.)"""
    import transformers as tf
    from tiny_model import build_random

    config = tf.MixtralConfig(vocab_size=384, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                              num_experts_per_tok=2, max_position_embeddings=256, rms_norm_eps=1e-5)
    dense_src = build_random(tmp_path / "mixtral", tf.MixtralForCausalLM, config)
    quantized, dense = write_gptq_checkpoint(dense_src, tmp_path / layout, **LAYOUTS[layout])
    want = transformers_logits(dense)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPTQ_KERNEL", "gptq-reference")
        model, logits = served(quantized)
    assert model.kernel == "gptq-reference"
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=0)
    model, logits = served(quantized)
    assert model.kernel == default_cpu_int4_kernel()
    if default_cpu_int4_kernel() == "cpu-int4-avx2":
        assert model.plan.name == "native-cpu-stack", model.plan.describe()
    assert float((logits - want).norm() / want.norm()) < 2e-2
