"""Fixtures the engine tests share (a test module may define its own of the same name instead)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def dist():
    """The process group of one unsplit rank."""
    from text_generation_server.distributed import init_distributed

    return init_distributed(0, 1)


@pytest.fixture(scope="session")
def model(tiny_llama, dist):
    """``tiny_llama`` loaded for serving: float32 on the CPU, one rank, its execution plan chosen."""
    from text_generation_server.models import load_model

    return load_model(tiny_llama, dtype=torch.float32, device=torch.device("cpu"), dist=dist)
