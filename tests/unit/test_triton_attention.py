"""The Triton paged attention kernels (CUDA's attention) against the SDPA reference.

On this CPU host the kernels run under ``TRITON_INTERPRET=1`` in a fresh interpreter
(``triton_attention_check.py``; the variable must be set before Triton is imported) on
small shapes. Decode: multi-head and grouped KV heads, a head size that is not a power of
two, block tables in shuffled order, contexts shorter and longer than a block, a sliding
window, Gemma's soft cap, float16, and a whole decode step through the backend (cache
write included). Varlen (prefill): fresh prompts, chunks after earlier context, single
tokens and one-token contexts in one mixed step, window, soft cap, float16, each through
the backend against the SDPA backend's own step. tests/gpu runs the same script on CUDA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CASES = [
    ["mha", 4, 4, 16, 4, [1, 7, 13], None, None, "float32"],
    ["gqa", 8, 2, 32, 16, [5, 40, 33, 16], None, None, "float32"],
    ["head_dim_24", 4, 1, 24, 8, [9, 3], None, None, "float32"],
    ["window", 4, 2, 16, 4, [3, 11, 20], 5, None, "float32"],
    ["softcap", 4, 2, 16, 4, [6, 19], None, 2.0, "float32"],
    ["float16", 4, 2, 16, 16, [17, 70], None, None, "float16"],
]
# [name, heads, kv_heads, head_dim, block_size, [[new tokens, context length], ...], window, softcap, dtype]
VARLEN = [
    ["prefill", 4, 2, 16, 4, [[7, 7], [20, 20]], None, None, "float32"],
    ["mixed", 4, 2, 16, 4, [[5, 13], [1, 9], [18, 18], [1, 1]], None, None, "float32"],
    ["varlen window", 4, 1, 24, 8, [[17, 17], [6, 30]], 5, None, "float32"],
    ["varlen softcap", 8, 8, 16, 4, [[9, 9], [3, 12]], None, 3.0, "float32"],
    ["varlen float16", 4, 2, 32, 16, [[33, 40], [40, 40]], None, None, "float16"],
]


@pytest.mark.timeout(600)
def test_triton_paged_attention_matches_sdpa_under_the_interpreter():
    script = Path(__file__).with_name("triton_attention_check.py")
    done = subprocess.run([sys.executable, str(script), json.dumps(CASES), "cpu", json.dumps(VARLEN)],
                          capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(errors) == {c[0] for c in CASES + VARLEN} | {"backend_step"}
    for name, error in errors.items():
        assert error < (2e-3 if "float16" in name else 1e-5), (name, error)


def test_cuda_selects_the_triton_backend_unless_custom_kernels_are_disabled(monkeypatch):
    from text_generation_server.layers.attention import (
        TorchSDPABackend,
        TritonPagedDecodeBackend,
        select_attention_backend,
    )

    monkeypatch.delenv("DISABLE_CUSTOM_KERNELS", raising=False)
    assert isinstance(select_attention_backend(torch.device("cuda", 0)), TritonPagedDecodeBackend)
    monkeypatch.setenv("DISABLE_CUSTOM_KERNELS", "true")
    backend = select_attention_backend(torch.device("cuda", 0))
    assert type(backend) is TorchSDPABackend
