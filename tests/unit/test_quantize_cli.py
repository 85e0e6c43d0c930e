"""`quantize` / `perplexity` end to end on a tiny random Llama, checked against
the AutoGPTQ layout and transformers' own forward."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from text_generation_server.quantize import cli, pipeline
from text_generation_server.quantize.data import (
    DatasetError,
    calibration_windows,
    eval_windows,
    load_text,
    python_docs,
)

LINEARS = {
    "self_attn.q_proj": (64, 64),  # (out, in) for hidden 64, 4 heads, 2 KV heads
    "self_attn.k_proj": (32, 64),
    "self_attn.v_proj": (32, 64),
    "self_attn.o_proj": (64, 64),
    "mlp.gate_proj": (128, 64),
    "mlp.up_proj": (128, 64),
    "mlp.down_proj": (64, 128),
}
EXPECTED_QCONFIG_KEYS = {
    "bits", "group_size", "damp_percent", "desc_act", "static_groups", "sym",
    "true_sequential", "quant_method", "checkpoint_format",
}


WORDS = ("the model reads tokens and writes text over a socket while the router batches "
         "requests from clients in order to keep every core busy with work on weights and caches").split()


def make_text(seed: int, lines: int = 400) -> str:
    """Deterministic text from a small vocabulary: the calibration and held-out distribution."""
    rng = np.random.default_rng(seed)
    return "\n".join(" ".join(rng.choice(WORDS, size=12)) + "." for _ in range(lines))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small calibration text (a few thousand tokens)."""
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text(make_text(0))
    return path


def run_cli(*argv: str) -> int:
    return cli.main([str(a) for a in argv])


def quantize(model: Path, out: Path, corpus: Path, *extra: str) -> int:
    return run_cli("quantize", model, out, "--dataset", corpus, "--nsamples", "8", "--seqlen", "64", *extra)


@pytest.fixture(scope="module")
def quantized(tiny_llama, corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("q") / "tiny-gptq"
    assert quantize(tiny_llama, out, corpus, "--groupsize", "32") == 0
    return out


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def reference_dequant(t: dict[str, torch.Tensor], stem: str, bits: int) -> torch.Tensor:
    """Independent v1 dequantization (numpy bit twiddling, 2/4/8 bits):
    w[o, i] = scales[g_idx[i], o] * (q[i, o] - (zero[g_idx[i], o] + 1))."""
    per = 32 // bits
    mask = (1 << bits) - 1
    qw = t[f"{stem}.qweight"].numpy().view(np.uint32)
    qz = t[f"{stem}.qzeros"].numpy().view(np.uint32)
    q = np.stack([(qw >> (bits * k)) & mask for k in range(per)], axis=1).reshape(-1, qw.shape[1])
    z = np.stack([(qz >> (bits * k)) & mask for k in range(per)], axis=2).reshape(qz.shape[0], -1) + 1
    s = t[f"{stem}.scales"].float().numpy()
    g = t[f"{stem}.g_idx"].numpy().astype(np.int64)
    w = s[g] * (q.astype(np.float32) - z[g].astype(np.float32))  # [in, out]
    return torch.from_numpy(np.ascontiguousarray(w.T))


def dequantized_llama(model_dir: Path, qdir: Path, bits: int = 4):
    """The original transformers model with every linear replaced by the checkpoint's weights."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    t = read_tensors(qdir)
    state = model.state_dict()
    for name in list(state):
        stem = name.removesuffix(".weight")
        if f"{stem}.qweight" in t:
            state[name] = reference_dequant(t, stem, bits)
        elif name in t:
            state[name] = t[name].float()
    model.load_state_dict(state)
    return model


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def prompt_ids(model_dir: Path, n: int = 64) -> torch.Tensor:
    """Held-out text from the calibration distribution (another seed): 2 windows of n tokens."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir)(make_text(1, 60), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[: 2 * n]).view(2, n)


def rtn_llama(model_dir: Path, spec):
    """The original model with every decoder linear rounded to nearest (same grid and groups)."""
    from text_generation_server.quantize.gptq import quantize_rtn
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            mod.weight.data = quantize_rtn(mod.weight.data, spec).dequant
    return model


def test_checkpoint_has_the_autogptq_tensor_layout(quantized):
    t = read_tensors(quantized)
    for layer in range(2):
        for lin, (out_f, in_f) in LINEARS.items():
            stem = f"model.layers.{layer}.{lin}"
            assert f"{stem}.weight" not in t
            assert t[f"{stem}.qweight"].dtype == torch.int32
            assert tuple(t[f"{stem}.qweight"].shape) == (in_f * 4 // 32, out_f)
            assert t[f"{stem}.qzeros"].dtype == torch.int32
            assert tuple(t[f"{stem}.qzeros"].shape) == (in_f // 32, out_f * 4 // 32)
            assert t[f"{stem}.scales"].dtype == torch.float16
            assert tuple(t[f"{stem}.scales"].shape) == (in_f // 32, out_f)
            assert t[f"{stem}.g_idx"].dtype == torch.int32
            assert torch.equal(t[f"{stem}.g_idx"], torch.arange(in_f, dtype=torch.int32) // 32)
            # symmetric 4-bit v1: every zero point 8 stored as 7
            assert set(t[f"{stem}.qzeros"].numpy().view(np.uint32).ravel().tolist()) == {0x77777777}
        for norm in ("input_layernorm", "post_attention_layernorm"):
            assert t[f"model.layers.{layer}.{norm}.weight"].dtype == torch.float16
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert t[name].dtype == torch.float16
    assert len(t) == 2 * (7 * 4 + 2) + 3


def test_both_config_files_describe_the_quantization(quantized, tiny_llama):
    config = json.loads((quantized / "config.json").read_text())
    qc = config["quantization_config"]
    assert EXPECTED_QCONFIG_KEYS <= set(qc)
    assert qc["bits"] == 4 and qc["group_size"] == 32 and qc["damp_percent"] == 0.01
    assert qc["desc_act"] is False and qc["static_groups"] is False and qc["sym"] is True
    assert qc["true_sequential"] is True and qc["act_group_aware"] is True
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq"
    assert json.loads((quantized / "quantize_config.json").read_text()) == qc
    source = json.loads((tiny_llama / "config.json").read_text())
    assert config["architectures"] == source["architectures"]
    assert config["hidden_size"] == source["hidden_size"]
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (quantized / f).read_bytes() == (tiny_llama / f).read_bytes()
    assert not list(quantized.parent.glob(".*tmp*"))


def test_dequantized_checkpoint_logits_are_close_to_the_original(quantized, tiny_llama):
    from transformers import LlamaForCausalLM

    ids = prompt_ids(tiny_llama)
    original = logits_of(LlamaForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval(), ids)
    deq = logits_of(dequantized_llama(tiny_llama, quantized), ids)
    rel = float((deq - original).norm() / original.norm())
    # the tiny model's weights are large (std 0.2), so 4-bit noise compounds: a loose bound
    assert rel < 0.45, rel
    # the perplexity tool's own loader builds the same model from the checkpoint
    from text_generation_server.quantize.perplexity import load_float_model

    torch.testing.assert_close(logits_of(load_float_model(quantized), ids), deq, rtol=1e-4, atol=1e-4)


def test_gptq_checkpoint_beats_round_to_nearest_on_the_same_model(quantized, tiny_llama):
    """On held-out text like the calibration text, our checkpoint's logits are closer
    to the original than plain rounding's."""
    from text_generation_server.quantize.gptq import QuantSpec
    from transformers import LlamaForCausalLM

    ids = prompt_ids(tiny_llama)
    original = logits_of(LlamaForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval(), ids)
    e_rtn = float((logits_of(rtn_llama(tiny_llama, QuantSpec(bits=4, group_size=32)), ids) - original).norm())
    e_gptq = float((logits_of(dequantized_llama(tiny_llama, quantized), ids) - original).norm())
    assert e_gptq < 0.9 * e_rtn, (e_gptq, e_rtn)


@pytest.mark.parametrize(
    "extra,bits,groups",
    [
        (["--act-order"], 4, 4),
        (["--groupsize", "-1"], 4, 1),
        (["--bits", "8", "--no-true-sequential"], 8, 4),
        (["--bits", "2", "--groupsize", "64"], 2, 2),
        (["--act-order", "--static-groups", "--no-sym"], 4, 4),
        (["--no-group-aware-order"], 4, 4),
    ],
    ids=["act-order", "g-1", "8bit-parallel", "2bit", "static-asym", "natural-order"],
)
def test_variants_write_consistent_checkpoints(tiny_llama, corpus, tmp_path, extra, bits, groups):
    out = tmp_path / "q"
    args = ["--groupsize", "32", *extra] if "--groupsize" not in extra else extra
    assert quantize(tiny_llama, out, corpus, *args) == 0
    t = read_tensors(out)
    qc = json.loads((out / "quantize_config.json").read_text())
    assert qc["bits"] == bits and qc["desc_act"] == ("--act-order" in extra)
    assert qc["act_group_aware"] == ("--act-order" not in extra and "--no-group-aware-order" not in extra)
    stem = "model.layers.1.mlp.down_proj"  # 128 input features
    assert tuple(t[f"{stem}.qweight"].shape) == (128 * bits // 32, 64)
    assert tuple(t[f"{stem}.scales"].shape) == (groups, 64)
    assert tuple(t[f"{stem}.qzeros"].shape) == (groups, 64 * bits // 32)
    g_idx = t[f"{stem}.g_idx"]
    monotonic = bool(torch.all(g_idx[1:] >= g_idx[:-1]))
    assert monotonic == ("--act-order" not in extra or "--static-groups" in extra)
    from text_generation_server.quantize.gptq import QuantSpec
    from transformers import LlamaForCausalLM

    ids = prompt_ids(tiny_llama)
    original = logits_of(LlamaForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval(), ids)
    err = float((logits_of(dequantized_llama(tiny_llama, out, bits), ids) - original).norm() / original.norm())
    spec = QuantSpec(bits=bits, group_size=qc["group_size"], sym=qc["sym"])
    err_rtn = float((logits_of(rtn_llama(tiny_llama, spec), ids) - original).norm() / original.norm())
    assert err < err_rtn, (err, err_rtn)
    if bits == 8:
        assert err < 0.05


def test_three_bit_checkpoint_packs_across_words_and_beats_rounding(tiny_llama, corpus, tmp_path):
    from text_generation_server.quantize.perplexity import load_float_model
    from transformers import LlamaForCausalLM

    out = tmp_path / "q3"
    assert quantize(tiny_llama, out, corpus, "--bits", "3", "--groupsize", "32") == 0
    t = read_tensors(out)
    assert tuple(t["model.layers.0.self_attn.k_proj.qweight"].shape) == (64 * 3 // 32, 32)
    assert tuple(t["model.layers.0.self_attn.k_proj.qzeros"].shape) == (2, 32 * 3 // 32)
    from text_generation_server.quantize.gptq import QuantSpec

    ids = prompt_ids(tiny_llama)
    original = logits_of(LlamaForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval(), ids)
    err = float((logits_of(load_float_model(out), ids) - original).norm())
    err_rtn = float((logits_of(rtn_llama(tiny_llama, QuantSpec(bits=3, group_size=32)), ids) - original).norm())
    assert err < err_rtn, (err, err_rtn)


def test_existing_output_dir_is_refused_before_any_work(tiny_llama, corpus, tmp_path, capfd):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert quantize(tiny_llama, out, corpus) == 1
    err = capfd.readouterr().err
    assert "exists and is not empty" in err and "--overwrite" in err
    assert "Calibration" not in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_overwrite_replaces_the_output_dir(tiny_llama, corpus, tmp_path):
    out = tmp_path / "again"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert quantize(tiny_llama, out, corpus, "--groupsize", "32", "--overwrite") == 0
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]


# ---- group sizes that do not divide a layer's width (AutoGPTQ's ragged last group) ------------------

RAGGED_LINEARS = {
    "self_attn.q_proj": (192, 192),  # (out, in) for hidden 192 = 128 + 64, 6 heads of 32, 2 KV heads
    "self_attn.k_proj": (64, 192),
    "self_attn.v_proj": (64, 192),
    "self_attn.o_proj": (192, 192),
    "mlp.gate_proj": (320, 192),
    "mlp.up_proj": (320, 192),
    "mlp.down_proj": (192, 320),  # 320 = 2 x 128 + 64
}
# The default --groupsize (128) in every run.
RAGGED_RUNS = {"g128": [], "g128-act-order": ["--act-order"], "g128-static-groups": ["--act-order", "--static-groups"]}


@pytest.fixture(scope="module")
def ragged_llama(tmp_path_factory) -> Path:
    from tiny_model import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("ragged-llama"), hidden_size=192, num_attention_heads=6,
                            num_key_value_heads=2, intermediate_size=320)


@pytest.fixture(scope="module")
def ragged(ragged_llama, corpus, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ragged")
    runs = {}
    for name, flags in RAGGED_RUNS.items():
        assert quantize(ragged_llama, root / name, corpus, *flags) == 0, name
        runs[name] = root / name
    return runs


@pytest.mark.parametrize("run", list(RAGGED_RUNS))
def test_ragged_group_size_writes_ceil_in_over_g_groups_with_a_short_last_one(ragged, run):
    out = ragged[run]
    qc = json.loads((out / "quantize_config.json").read_text())
    assert qc["group_size"] == 128 and qc["desc_act"] == ("act-order" in run or "static" in run)
    t = read_tensors(out)
    for layer in range(2):
        for lin, (out_f, in_f) in RAGGED_LINEARS.items():
            stem = f"model.layers.{layer}.{lin}"
            groups = math.ceil(in_f / 128)
            assert tuple(t[f"{stem}.qweight"].shape) == (in_f * 4 // 32, out_f)
            assert tuple(t[f"{stem}.qzeros"].shape) == (groups, out_f * 4 // 32)
            assert tuple(t[f"{stem}.scales"].shape) == (groups, out_f)
            g_idx = t[f"{stem}.g_idx"]
            sizes = [min(128, in_f - g * 128) for g in range(groups)]
            assert torch.bincount(g_idx.long(), minlength=groups).tolist() == sizes
            if run == "g128-act-order":
                # groups are formed in activation order: g_idx is a permutation of i // 128
                assert not torch.equal(g_idx, torch.arange(in_f, dtype=torch.int32) // 128)
            else:
                assert torch.equal(g_idx, torch.arange(in_f, dtype=torch.int32) // 128)


@pytest.mark.parametrize("run", list(RAGGED_RUNS))
def test_ragged_group_checkpoint_beats_round_to_nearest_with_the_same_groups(ragged, ragged_llama, run):
    from text_generation_server.quantize.gptq import QuantSpec
    from transformers import LlamaForCausalLM

    ids = prompt_ids(ragged_llama)
    original = logits_of(LlamaForCausalLM.from_pretrained(ragged_llama, dtype=torch.float32).eval(), ids)
    err = float((logits_of(dequantized_llama(ragged_llama, ragged[run]), ids) - original).norm())
    err_rtn = float((logits_of(rtn_llama(ragged_llama, QuantSpec(bits=4, group_size=128)), ids) - original).norm())
    assert err < 0.8 * err_rtn, (err, err_rtn)


@pytest.mark.parametrize("run", list(RAGGED_RUNS))
def test_ragged_group_checkpoint_serves_through_the_gptq_loader(ragged, run, tmp_path, monkeypatch):
    """The server's GPTQ layers (reference kernel, then the default 4-bit CPU kernel, which pads the
    short group) compute transformers' forward over the weights the checkpoint encodes."""
    from gptq_random import default_cpu_int4_kernel
    from gptq_twin import dense_twin
    from paged_runner import PagedRunner
    from text_generation_server.distributed import init_distributed
    from text_generation_server.models import load_model
    from transformers import LlamaForCausalLM

    ids = prompt_ids(ragged[run], 16)[0].tolist()
    want = logits_of(LlamaForCausalLM.from_pretrained(dense_twin(ragged[run], tmp_path / "dense"),
                                                      dtype=torch.float32).eval(), torch.tensor([ids]))[0]

    def serve():
        model = load_model(ragged[run], dtype=torch.float32, device=torch.device("cpu"),
                           dist=init_distributed(0, 1), quantize="gptq")
        return model.kernel, PagedRunner(model).step([("a", ids)])[0]

    monkeypatch.setenv("GPTQ_KERNEL", "gptq-reference")
    kernel, got = serve()
    assert kernel == "gptq-reference"
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    monkeypatch.delenv("GPTQ_KERNEL")
    kernel, got = serve()
    assert kernel == default_cpu_int4_kernel()
    assert float((got - want).norm() / want.norm()) < 2e-2


def test_a_group_size_that_does_not_divide_a_width_is_logged_not_refused(tiny_llama, corpus, tmp_path, capfd):
    assert quantize(tiny_llama, tmp_path / "q", corpus, "--groupsize", "48") == 0
    err = capfd.readouterr().err
    assert ("Group size 48 leaves a shorter last group in self_attn.q_proj (64 = 1x48 + 16), "
            "self_attn.k_proj (64 = 1x48 + 16)") in err
    assert "mlp.down_proj (128 = 2x48 + 32)" in err
    t = read_tensors(tmp_path / "q")
    assert tuple(t["model.layers.0.mlp.down_proj.scales"].shape) == (3, 64)


@pytest.mark.parametrize(
    "flag,value,message",
    [("--bits", "5", "choose one of 2, 3, 4, 8"), ("--groupsize", "0", "positive group size"),
     ("--groupsize", "-2", "-2 is not allowed: use a positive group size (input columns per group, e.g. 32, 64 "
                           "or 128) or -1 (one group per row)"),
     ("--groupsize", "x", "expected an integer, got 'x'"),
     ("--percdamp", "3", "must lie in [0, 1]"), ("--nsamples", "0", "expected an integer >= 1, got '0'")],
)
def test_bad_flag_values_are_rejected_by_the_parser(flag, value, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli("quantize", "m", tmp_path / "q", flag, value)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_model_and_dataset_are_clear_errors(tiny_llama, tmp_path, capfd):
    assert run_cli("quantize", tmp_path / "no-such-model", tmp_path / "q") == 1
    assert "no-such-model" in capfd.readouterr().err
    assert run_cli("quantize", tiny_llama, tmp_path / "q", "--groupsize", "32", "--dataset", tmp_path / "missing.txt") == 1
    assert "missing.txt" in capfd.readouterr().err
    assert not (tmp_path / "q").exists()


def test_architecture_without_recipe_is_named(tiny_llama, corpus, tmp_path, capfd):
    other = tmp_path / "other"
    shutil.copytree(tiny_llama, other)
    config = json.loads((other / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (other / "config.json").write_text(json.dumps(config))
    assert quantize(other, tmp_path / "q", corpus) == 1
    err = capfd.readouterr().err
    assert "GPT2LMHeadModel" in err and "LlamaForCausalLM" in err and "MistralForCausalLM" in err


def test_already_quantized_source_is_refused(quantized, corpus, tmp_path, capfd):
    assert quantize(quantized, tmp_path / "q", corpus) == 1
    assert "already quantized" in capfd.readouterr().err


def test_failure_midway_leaves_no_output_and_resume_writes_it(tiny_llama, corpus, tmp_path, monkeypatch, capfd):
    """A write that fails leaves no OUTPUT_DIR, only the run's progress; --resume then writes the
    checkpoint without quantizing a layer again."""
    real_write = pipeline.write_checkpoint

    def broken_write(out_dir, *args, **kwargs):
        (Path(out_dir) / "model.safetensors").write_bytes(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(pipeline, "write_checkpoint", broken_write)
    with pytest.raises(OSError, match="No space left"):
        quantize(tiny_llama, tmp_path / "q", corpus, "--groupsize", "32")
    assert [p.name for p in tmp_path.iterdir()] == [".q.progress"]
    monkeypatch.setattr(pipeline, "write_checkpoint", real_write)
    capfd.readouterr()
    assert quantize(tiny_llama, tmp_path / "q", corpus, "--groupsize", "32", "--resume") == 0
    err = capfd.readouterr().err
    assert "2 layer(s) finished by an earlier run" in err and "layer 1/2" not in err, err[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_seqlen_is_clamped_to_the_model_positions(tiny_llama, corpus, tmp_path, capfd):
    assert run_cli("quantize", tiny_llama, tmp_path / "q", "--dataset", corpus, "--nsamples", "2",
                   "--seqlen", "1000", "--groupsize", "32") == 0
    err = capfd.readouterr().err
    assert "--seqlen 1000 exceeds the model's 256 positions; using 256" in err
    qc = json.loads((tmp_path / "q" / "quantize_config.json").read_text())
    assert qc["meta"]["calibration"]["seqlen"] == 256


def test_upload_without_network_keeps_the_local_checkpoint(tiny_llama, corpus, tmp_path, monkeypatch, capfd):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "q"
    assert quantize(tiny_llama, out, corpus, "--groupsize", "32", "--upload-to-model-id", "someone/tiny-gptq") == 1
    err = capfd.readouterr().err
    assert "someone/tiny-gptq" in err and f"kept at {out}" in err
    assert (out / "model.safetensors").is_file()


def test_help_lists_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit):
        run_cli("quantize", "--help")
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in [("--revision", "None"), ("--trust-remote-code", "False"), ("--upload-to-model-id", "None"),
                          ("--percdamp", "0.01"), ("--act-order", "False"), ("--groupsize", "128"), ("--bits", "4"),
                          ("--no-sym", "True"), ("--dataset", "python-docs"), ("--nsamples", "128"),
                          ("--seqlen", "2048"), ("--seed", "0"), ("--true-sequential", "True"), ("--overwrite", "False"),
                          ("--static-groups", "False"), ("--group-aware-order", "True")]:
        assert flag in text
        after = text.split(flag, 1)[1]
        assert f"(default: {default})" in after, flag


def test_register_adds_both_subcommands_to_a_parent_parser():
    parser = argparse.ArgumentParser(prog="text-generation-server")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve")
    cli.register(sub)
    args = parser.parse_args(["quantize", "m", "out", "--groupsize", "-1"])
    assert args.func is cli.run_quantize and args.groupsize == -1 and args.bits == 4 and args.sym is True
    args = parser.parse_args(["perplexity", "m"])
    assert args.func is cli.run_perplexity and args.seqlen == 512 and args.nsamples == 128


def test_perplexity_equals_transformers_loss(tiny_llama, corpus, capsys):
    from transformers import AutoTokenizer, LlamaForCausalLM

    assert run_cli("perplexity", tiny_llama, "--dataset", corpus, "--seqlen", "32", "--nsamples", "6") == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["tokens"] == 6 * 31 and report["windows"] == 6 and report["seconds"] >= 0
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    ids = torch.tensor(tok(corpus.read_text(), add_special_tokens=False)["input_ids"][: 6 * 32]).view(6, 32)
    model = LlamaForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert report["perplexity"] == pytest.approx(math.exp(float(loss)), rel=1e-4)


def test_perplexity_of_the_gptq_checkpoint_is_near_the_original(quantized, tiny_llama, corpus, capsys):
    assert run_cli("perplexity", tiny_llama, "--dataset", corpus, "--seqlen", "64", "--nsamples", "4") == 0
    base = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"]
    assert run_cli("perplexity", quantized, "--dataset", corpus, "--seqlen", "64", "--nsamples", "4") == 0
    ours = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"]
    assert abs(math.log(ours) - math.log(base)) < 0.2


def test_module_runs_as_a_script_with_exit_code_1_on_user_error(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-m", "text_generation_server.quantize.cli", "quantize", str(tmp_path / "none"), str(tmp_path / "q")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 1
    assert "none" in proc.stderr and "Traceback" not in proc.stderr


_FREED_BUFFERS_SCRIPT = """
import sys
import torch
from text_generation_server.quantize import memory

def anon_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon")) / 1024

if sys.argv[1] == "mapped" and not memory.map_large_buffers():
    print("unsupported")
    raise SystemExit
base = anon_mib()
survivors = []
for step in range(8):
    buffer = torch.ones((24 - step) << 18)  # 24, 23, ... 17 MiB: a stage's activations
    survivors.append(torch.ones(1 << 16))  # 256 KiB kept after each, as a stage's outputs
    del buffer
print(anon_mib() - base)
"""


def _retained_mib(mode: str) -> str:
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/status")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _FREED_BUFFERS_SCRIPT, mode],
                          capture_output=True, text=True, env=env, timeout=120, check=True)
    return proc.stdout.strip().splitlines()[-1]


def test_freed_activation_buffers_leave_the_process_once_large_buffers_are_mapped():
    """glibc's default serves buffers like these from the heap after the first
    one is freed and keeps them resident; the quantizer's setting must not."""
    mapped = _retained_mib("mapped")
    if mapped == "unsupported":
        pytest.skip("the C library is not glibc")
    default = float(_retained_mib("default"))
    assert default > 16, f"the default allocator kept only {default:.1f} MiB: the test no longer tells the two apart"
    assert float(mapped) < 4  # the 2 MiB of survivors, nothing of the freed buffers


def test_builtin_corpus_splits_are_disjoint_and_windows_deterministic():
    train, held_out = python_docs("train"), python_docs("eval")
    assert len(train.text) > 200_000 and len(held_out.text) > 50_000
    assert train.text[:2000] not in held_out.text
    tokens = torch.arange(10_000)
    a = calibration_windows(tokens, 8, 100, seed=3)
    assert torch.equal(a, calibration_windows(tokens, 8, 100, seed=3))
    assert not torch.equal(a, calibration_windows(tokens, 8, 100, seed=4))
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(8, 99, dtype=a.dtype))  # contiguous windows
    w = eval_windows(tokens, 5, 100)
    assert torch.equal(w.reshape(-1), tokens[:500])


def test_jsonl_dataset_reads_the_text_field_and_names_bad_lines(tmp_path):
    good = tmp_path / "d.jsonl"
    good.write_text('{"text": "first record"}\n\n{"text": "second", "id": 2}\n')
    assert load_text(str(good)).text == "first record\n\nsecond"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DatasetError, match=r"bad.jsonl:2: .*\"text\" field \(found: body\)"):
        load_text(str(bad))
    with pytest.raises(DatasetError, match="fewer than one window"):
        calibration_windows(torch.arange(10), 4, 64, 0)


class FakeHubDataset:
    """What `datasets.load_dataset(..., split=...)` returns, as far as the quantizer reads it."""

    def __init__(self, columns: dict[str, list]) -> None:
        self._columns = columns

    @property
    def column_names(self) -> list[str]:
        return list(self._columns)

    def __getitem__(self, column: str) -> list:
        return list(self._columns[column])


def fake_datasets(monkeypatch, columns) -> list[tuple]:
    """Install a fake `datasets` module whose every split holds ``columns(split)``; returns its calls."""
    import types

    calls: list[tuple] = []

    def load_dataset(repo, config=None, *, split):
        calls.append((repo, config, split))
        return FakeHubDataset(columns(split))

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_hub_dataset_reads_the_text_column_of_the_train_split_for_calibration_and_test_for_eval(monkeypatch):
    from text_generation_server.quantize.data import _hub_dataset

    calls = fake_datasets(monkeypatch, lambda split: {"id": [1, 2], "text": [f"{split} one", f"{split} two"]})
    calib = _hub_dataset("someone/corpus", "train")
    assert calib.text == "train one\n\ntrain two"
    assert calib.source == "hub dataset someone/corpus [train]"
    held_out = _hub_dataset("someone/corpus:small", "eval")
    assert held_out.text == "test one\n\ntest two"
    assert held_out.source == "hub dataset someone/corpus/small [test]"
    # the quantizer's --dataset resolves a name that is no local file to the hub, wikitext2 to its config
    assert load_text("wikitext2", "train").text == "train one\n\ntrain two"
    assert calls == [("someone/corpus", None, "train"), ("someone/corpus", "small", "test"),
                     ("wikitext", "wikitext-2-raw-v1", "train")]


def test_hub_dataset_without_a_text_column_names_its_columns(monkeypatch):
    from text_generation_server.quantize.data import _hub_dataset

    fake_datasets(monkeypatch, lambda split: {"content": ["x"], "id": [1]})
    with pytest.raises(DatasetError, match=r"'someone/code' has no 'text' column \(columns: content, id\)"):
        _hub_dataset("someone/code", "train")


def test_hub_dataset_without_the_datasets_package_says_which_extra_to_install(monkeypatch, tiny_llama, tmp_path,
                                                                             capfd):
    import tomllib

    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(DatasetError) as err:
        load_text("someone/corpus", "train")
    message = str(err.value)
    assert "needs the `datasets` package, which is not installed" in message
    assert "run `pip install 'text-generation-server[quantize]'`" in message
    assert "python-docs" in message
    extras = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert any(dep.startswith("datasets") for dep in extras["quantize"])
    # the CLI reports it as a user error, before any work
    assert run_cli("quantize", tiny_llama, tmp_path / "q", "--dataset", "someone/corpus") == 1
    err = capfd.readouterr().err
    assert "pip install 'text-generation-server[quantize]'" in err and "Traceback" not in err
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("device,message", [
    ("cuda", "--device cuda: no CUDA device is visible; use --device cpu"),
    ("cuda:3", "--device cuda:3: no CUDA device is visible; use --device cpu"),
    ("tpu", "--device 'tpu': expected auto, cpu, cuda or cuda:N"),
])  # fmt: skip
def test_a_device_that_is_not_there_is_refused_before_any_work(tiny_llama, corpus, tmp_path, capfd, device, message):
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    assert quantize(tiny_llama, tmp_path / "q", corpus, "--device", device) == 1
    err = capfd.readouterr().err
    assert message in err and "Calibration" not in err, err[-2000:]
    assert not (tmp_path / "q").exists()


def test_an_explicit_cpu_device_gives_the_auto_checkpoint_on_a_cpu_host(quantized, tiny_llama, corpus, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("auto is the GPU on this host")
    assert quantize(tiny_llama, tmp_path / "q", corpus, "--groupsize", "32", "--device", "cpu") == 0
    want, got = read_tensors(quantized), read_tensors(tmp_path / "q")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_bfloat16_calibration_keeps_the_quality_of_float32(quantized, tiny_llama, corpus, tmp_path, capfd):
    """--calibration-dtype bfloat16 runs the calibration forwards and Hessian products in bfloat16
    (the solve stays float32): the checkpoint's logits are as close to the original model's as the
    float32 run's (within 10% of its error), and auto resolves to a dtype it names."""
    from transformers import LlamaForCausalLM

    out = tmp_path / "bf16"
    assert quantize(tiny_llama, out, corpus, "--groupsize", "32", "--calibration-dtype", "bfloat16") == 0
    ids = prompt_ids(tiny_llama)
    original = logits_of(LlamaForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval(), ids)

    def error(qdir: Path) -> float:
        deq = logits_of(dequantized_llama(tiny_llama, qdir), ids)
        return float((deq - original).norm() / original.norm())

    assert error(out) <= 1.1 * error(quantized), (error(out), error(quantized))
    capfd.readouterr()
    assert quantize(tiny_llama, tmp_path / "auto", corpus, "--groupsize", "32", "--calibration-dtype", "auto") == 0
    assert "--calibration-dtype auto: " in capfd.readouterr().err
