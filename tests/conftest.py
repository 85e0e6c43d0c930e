from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_model import build_tiny_llama  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer random Llama (4 heads, 2 KV heads, untied) with a BPE tokenizer."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_llama_tied(tmp_path_factory) -> Path:
    """Like tiny_llama but with tied embeddings and 6 heads / 3 KV heads (as the default model's 9/3 ratio)."""
    return build_tiny_llama(
        tmp_path_factory.mktemp("tiny-llama-tied"),
        hidden_size=96,
        num_attention_heads=6,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    )


@pytest.fixture(params=["native", "torch"])
def cpu_kernels(request, monkeypatch) -> str:
    """Runs a test with the native CPU kernels on ("native", skipped where they cannot run)
    and off ("torch"): both paths of every fused step must give the reference's answer."""
    from text_generation_server import kernels

    monkeypatch.setenv(kernels.ENV, "auto" if request.param == "native" else "off")
    kernels.reset_for_tests()
    if request.param == "native" and not kernels.cpu_ops_status().available:
        pytest.skip(f"native CPU kernels unavailable: {kernels.cpu_ops_status().reason}")
    yield request.param
    kernels.reset_for_tests()
