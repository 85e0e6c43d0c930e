"""Quantizing needs about one decoder layer's memory, not the model's.

Two random Llamas differ only in depth (4 and 16 layers of width 512, float16 on
disk): the deeper one's float32 weights are 154 MB larger. Each is quantized in
its own process (`text-generation-server quantize`, as a user runs it) and the
kernel's peak resident set of that process is compared: the deeper model may
cost at most a quarter of its extra weights (the layer loop holds one layer, its
packed tensors go to disk as it finishes, the writer streams one tensor at a
time). Before, the quantized tensors and the copied ones were all held until
the end. The deep model's checkpoint is then served by the server's GPTQ loader.

The bound is on the peak resident set the kernel measured, not an rlimit:
RLIMIT_DATA counts the checkpoint's private file mapping in full (virtual
size) although only the tensor being read is ever resident, and RLIMIT_AS
counts every mapping, so neither measures what the quantizer occupies.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gptq_twin import calibration_text
from tiny_model import build_tiny_llama

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SERVER = Path(sys.executable).parent / "text-generation-server"
WIDTH, FFN = 512, 1408


def _model(path: Path, layers: int) -> Path:
    return build_tiny_llama(path, hidden_size=WIDTH, num_hidden_layers=layers, num_attention_heads=8,
                            num_key_value_heads=8, intermediate_size=FFN, dtype="float16")


def _fp32_bytes(layers: int) -> int:
    per_layer = 4 * WIDTH * WIDTH + 3 * WIDTH * FFN
    return layers * per_layer * 4


def _quantize(model: Path, out: Path, corpus: Path) -> tuple[int, str]:
    """Run the CLI in a child; (its peak RSS in bytes, as it reports it, its output).

    The child's own VmHWM (its closing "peak RSS" line): the rusage of a child includes the peak of
    the process it was forked from, here the test runner."""
    argv = [str(SERVER), "quantize", str(model), str(out), "--dataset", str(corpus), "--nsamples", "4",
            "--seqlen", "64", "--groupsize", "128"]
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"},
                          timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    peak = re.search(r"Wrote .* peak RSS (\d+) MiB", output)
    assert peak, output[-3000:]
    return int(peak.group(1)) << 20, output


def test_peak_memory_does_not_grow_with_the_model(tmp_path, record_property):
    corpus = calibration_text(tmp_path / "calib.txt")
    shallow, deep = _model(tmp_path / "m4", 4), _model(tmp_path / "m16", 16)
    rss_shallow, _ = _quantize(shallow, tmp_path / "q4", corpus)
    rss_deep, output = _quantize(deep, tmp_path / "q16", corpus)
    extra_weights = _fp32_bytes(16) - _fp32_bytes(4)
    growth = rss_deep - rss_shallow
    record_property(
        "figures: quantize peak RSS",
        f"4 layers {rss_shallow / 2**20:.0f} MiB, 16 layers {rss_deep / 2**20:.0f} MiB "
        f"(fp32 weights {_fp32_bytes(4) / 2**20:.0f} and {_fp32_bytes(16) / 2**20:.0f} MiB; one layer "
        f"{_fp32_bytes(1) / 2**20:.1f} MiB)",
    )
    assert growth < extra_weights / 4, (rss_shallow, rss_deep, extra_weights)
    assert "Wrote" in output
    served_logits(tmp_path / "q16")


def served_logits(checkpoint: Path) -> torch.Tensor:
    """The server's own GPTQ loader on the checkpoint: finite logits for a prompt."""
    from paged_runner import PagedRunner
    from text_generation_server.distributed import init_distributed
    from text_generation_server.models import load_model

    model = load_model(checkpoint, dtype=torch.float32, device=torch.device("cpu"), dist=init_distributed(0, 1),
                       quantize="gptq")
    logits = PagedRunner(model).step([("a", list(range(5, 21)))])[0]
    assert torch.isfinite(logits).all()
    return logits


def test_packed_layers_go_to_disk_as_they_finish_and_are_streamed_into_the_checkpoint(tiny_llama, tmp_path,
                                                                                        monkeypatch):
    """No layer's packed tensors stay in memory: the writer gets them as files to read, one at a time,
    and what it writes equals what safetensors' own writer would."""
    from safetensors.torch import load_file, save_file
    from text_generation_server.quantize import pipeline, writer
    from text_generation_server.quantize.gptq import QuantSpec
    from text_generation_server.quantize.pipeline import CalibrationSettings
    from text_generation_server.quantize.writer import PendingTensor, save_streaming

    given = {}
    original = writer.write_checkpoint

    def spy(out_dir, source_dir, quantized, *args, **kwargs):
        given.update(quantized)
        return original(out_dir, source_dir, quantized, *args, **kwargs)

    monkeypatch.setattr(pipeline, "write_checkpoint", spy)
    corpus = calibration_text(tmp_path / "calib.txt")
    out = pipeline.quantize_checkpoint(str(tiny_llama), tmp_path / "q", QuantSpec(bits=4, group_size=32),
                                       CalibrationSettings(dataset=str(corpus), nsamples=4, seqlen=32))
    assert given and all(isinstance(t, PendingTensor) for t in given.values())
    written = load_file(str(out / "model.safetensors"))
    assert {n for n in given} <= set(written)

    # the streaming format is safetensors' own: every dtype, empty and 0-d tensors included
    tensors = {"w": torch.randn(3, 5), "q": torch.randint(-9, 9, (7, 2), dtype=torch.int32),
               "h": torch.randn(4).half(), "b": torch.randn(2, 2).bfloat16(), "e": torch.zeros(0, 3),
               "s": torch.tensor(2.5), "u": torch.arange(5, dtype=torch.uint8)}
    save_streaming(tmp_path / "a.safetensors",
                   {k: PendingTensor(v.dtype, tuple(v.shape), lambda v=v: v) for k, v in tensors.items()})
    save_file(tensors, str(tmp_path / "b.safetensors"))
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["llama", "falcon"])
def test_activations_on_disk_give_the_same_checkpoint_as_in_memory(kind, tmp_path, capfd):
    """--activation-memory 0 keeps every calibration batch in files (the sequential Llama recipe
    and the generic per-group one); the checkpoint is bit-identical to an in-memory run, the files
    are gone afterwards, and a resumed run takes its activations from the saved file."""
    from gptq_twin import run_quantizer
    from safetensors.torch import load_file
    from tiny_model import build_tokenizer, family_checkpoint

    if kind == "llama":
        model = _model(tmp_path / "m", 3)
    else:  # Falcon's parallel blocks take the generic recipe (a forward of the layer per group)
        model = family_checkpoint(tmp_path / "m", "falcon-7b")
        build_tokenizer(model)
    corpus = calibration_text(tmp_path / "calib.txt")
    flags = ("--groupsize", "32", "--nsamples", "8", "--seqlen", "32")
    memory = run_quantizer(model, tmp_path / "mem", corpus, *flags)
    capfd.readouterr()
    disk = run_quantizer(model, tmp_path / "disk", corpus, *flags, "--activation-memory", "0")
    err = capfd.readouterr().err
    assert "activations on disk" in err and "up to 0 MiB in memory" in err
    a, b = load_file(str(memory / "model.safetensors")), load_file(str(disk / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_buffers_computed_at_construction_survive_loading_and_release(tmp_path):
    """The quantizer builds the model with its parameters on the meta device and loads one module
    at a time. Buffers no checkpoint holds (Gemma's embedding scale, the rotary tables) are
    computed at construction: they must keep their values through every load and release, not be
    left as uninitialised memory (a Hessian of NaNs on some runs, depending on the heap)."""
    import transformers as tf
    from text_generation_server.quantize.checkpoint import (
        SafetensorsCheckpoint,
        decoder_parts,
        load_module,
        meta_model,
        release,
    )
    from tiny_model import SMALL, build_random

    config = tf.Gemma3TextConfig(**SMALL, head_dim=32, sliding_window=7,
                                 layer_types=["sliding_attention", "full_attention"])
    path = build_random(tmp_path / "gemma3", tf.Gemma3ForCausalLM, config)
    model = meta_model(config)
    parts = decoder_parts(model)
    assert all(p.device.type == "meta" for p in model.parameters())
    checkpoint = SafetensorsCheckpoint(path)
    for _ in range(2):  # loaded, released, loaded again
        load_module(parts.embed, parts.embed_prefix, checkpoint)
        assert parts.embed.embed_scale.item() == pytest.approx(SMALL["hidden_size"] ** 0.5)
        ids = torch.tensor([[1, 2, 3]])
        want = checkpoint.get(parts.embed_prefix + "weight")[ids] * SMALL["hidden_size"] ** 0.5
        torch.testing.assert_close(parts.embed(ids), want)
        release(parts.embed)
        assert parts.embed.weight.device.type == "meta"
    tables = list(parts.inner.rotary_emb.buffers())
    assert tables and all(t.device.type == "cpu" and torch.isfinite(t).all() for t in tables)
