"""The Triton paged attention kernels compiled for CUDA equal the SDPA path (skips without a GPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CASES = [
    ["gqa-128", 32, 8, 128, 16, [1, 17, 300, 2048], None, None, "float16"],
    ["mha-64", 12, 12, 64, 16, [5, 999], None, None, "float32"],
    ["window", 8, 2, 128, 16, [40, 700], 256, None, "float16"],
    ["softcap", 8, 4, 256, 16, [33, 513], None, 50.0, "bfloat16"],
    ["head_dim_80", 16, 16, 80, 16, [64, 129], None, None, "float16"],
]
VARLEN = [
    ["prefill-128", 32, 8, 128, 16, [[500, 500], [37, 37]], None, None, "float16"],
    ["mixed", 16, 4, 64, 16, [[200, 900], [1, 70], [64, 64]], None, None, "float16"],
    ["varlen window", 8, 2, 128, 16, [[300, 300]], 64, None, "bfloat16"],
    ["varlen softcap", 8, 4, 256, 16, [[130, 130]], None, 50.0, "bfloat16"],
]


def test_triton_paged_attention_on_cuda_equals_sdpa():
    pytest.importorskip("triton")
    script = Path(__file__).resolve().parents[1] / "unit" / "triton_attention_check.py"
    done = subprocess.run([sys.executable, str(script), json.dumps(CASES), "cuda", json.dumps(VARLEN)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    for name, error in errors.items():
        # fp32 dots may run as tf32; float16/bfloat16 outputs round at 1e-3/8e-3 of their size
        assert error < 1e-2, (name, error)
