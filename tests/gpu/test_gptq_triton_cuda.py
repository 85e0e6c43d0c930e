"""The Triton GPTQ kernel compiled for CUDA equals the dense matmul (skips without a GPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CASES = [
    ["g128", dict(group_size=128), 512, 256],
    ["g128-ragged-576", dict(group_size=128), 576, 256],
    ["g64-act-order-asym", dict(group_size=64, desc_act=True, sym=False), 256, 128],
    ["g64-v2", dict(group_size=64, fmt="gptq_v2", sym=False), 256, 128],
    ["per-row", dict(group_size=-1), 256, 128],
    ["8-bit", dict(group_size=128, bits=8), 256, 128],
]


def test_triton_kernel_on_cuda_equals_dense_matmul():
    pytest.importorskip("triton")
    script = Path(__file__).resolve().parents[1] / "unit" / "gptq_triton_check.py"
    proc = subprocess.run(
        [sys.executable, str(script), json.dumps(CASES), "cuda"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, *_ in CASES:
        assert isinstance(errors[name], float), errors[name]
        # fp32 dots may run as tf32 on the GPU.
        assert errors[name] < 5e-3, name


def test_gptq_picks_triton_on_cuda():
    pytest.importorskip("triton")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from gptq_random import random_gptq
    from text_generation_server.layers.quant.gptq_kernels import build_kernel

    weights, _ = random_gptq(256, 128)
    kernel, _ = build_kernel(weights, torch.device("cuda"))
    assert kernel.name == "gptq-triton"
