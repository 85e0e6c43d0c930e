"""A quantization run that is killed leaves no output directory, and ``--resume`` continues it
from its last saved layer to exactly the checkpoint an uninterrupted run writes.

Every run is a separate ``text-generation-server quantize`` process with the same settings
(thread count included), so the comparison is bit for bit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from text_generation_server.quantize.progress import RunProgress
from tiny_model import build_tiny_llama

LAYERS = 12
CLI = Path(sys.executable).parent / "text-generation-server"


@pytest.fixture(scope="module")
def model_and_text(tmp_path_factory) -> tuple[Path, Path]:
    from gptq_twin import calibration_text

    root = tmp_path_factory.mktemp("resume")
    model = build_tiny_llama(root / "deep", num_hidden_layers=LAYERS)
    return model, calibration_text(root / "calib.txt")


def command(model: Path, text: Path, out: Path, *extra: str) -> list[str]:
    return [str(CLI), "quantize", str(model), str(out), "--dataset", str(text), "--nsamples", "8", "--seqlen", "64",
            "--groupsize", "32", "--act-order", *extra]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_a_killed_run_resumes_to_the_checkpoint_an_uninterrupted_run_writes(model_and_text, tmp_path):
    model, text = model_and_text
    whole = tmp_path / "whole"
    done = subprocess.run(command(model, text, whole), capture_output=True, text=True, timeout=600, env=env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert not RunProgress.path_for(whole).exists()  # a finished run leaves no progress behind

    out = tmp_path / "resumed"
    proc = subprocess.Popen(command(model, text, out, "--save-every", "0"), stderr=subprocess.PIPE, text=True,
                            env=env())  # fmt: skip
    assert proc.stderr is not None
    for line in proc.stderr:
        if f"layer 3/{LAYERS}" in line:
            proc.kill()  # SIGKILL: no handler runs, files may be mid-write
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists(), "a killed run must leave no output directory"
    kept = RunProgress.path_for(out)
    assert kept.is_dir() and any(kept.glob("layer-*.safetensors"))

    resumed = subprocess.run(command(model, text, out, "--save-every", "0", "--resume"), capture_output=True,
                             text=True, timeout=600, env=env())  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "--resume: " in resumed.stderr and "continuing from layer" in resumed.stderr, resumed.stderr[-3000:]
    continued_at = int(resumed.stderr.split("continuing from layer ")[1].split()[0])
    assert 3 <= continued_at < LAYERS, continued_at
    assert f"layer {continued_at - 1}/{LAYERS}" not in resumed.stderr  # finished layers are not redone
    assert not kept.exists()
    want, got = tensors(whole), tensors(out)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    print(f"killed after layer 3 of {LAYERS}; resumed at layer {continued_at}; {len(want)} tensors bit-identical")


def test_resume_refuses_the_progress_of_a_run_with_other_settings(model_and_text, tmp_path):
    model, text = model_and_text
    out = tmp_path / "out"
    proc = subprocess.Popen(command(model, text, out, "--save-every", "0"), stderr=subprocess.PIPE, text=True,
                            env=env())  # fmt: skip
    assert proc.stderr is not None
    for line in proc.stderr:
        if f"layer 2/{LAYERS}" in line:
            proc.send_signal(signal.SIGINT)  # Ctrl-C: the CLI names where the progress is kept
            break
    rest = proc.stderr.read()
    proc.wait(timeout=60)
    assert proc.returncode == 130, rest[-2000:]
    assert "rerun with --resume to continue" in rest, rest[-2000:]
    other = subprocess.run(command(model, text, out, "--bits", "8", "--resume"), capture_output=True, text=True,
                           timeout=600, env=env())  # fmt: skip
    assert other.returncode == 1
    assert "--resume: the run in" in other.stderr and "other spec" in other.stderr, other.stderr[-2000:]
    assert not out.exists()
