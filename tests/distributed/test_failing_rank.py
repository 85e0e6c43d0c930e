"""A rank that fails to load exits at once with its error, even while its peer is still busy.

Leaving the process group normally meets the other ranks at a barrier; a
rank that failed must not wait there for peers that are loading or serving
(until the group's timeout), or the launcher would not learn of the failure
for minutes.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))

import failing_rank_worker  # noqa: E402

# Two spawned ranks import torch: over ten seconds.
pytestmark = pytest.mark.slow

# Far below the process group's 120 s timeout; covers interpreter start and imports.
EXIT_WITHIN = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_rank_failing_to_load_exits_1_without_waiting_for_a_busy_peer(tiny_llama, tmp_path):
    ctx = mp.start_processes(
        failing_rank_worker.run_rank,
        args=(2, free_port(), str(tiny_llama), str(tmp_path)),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    result = tmp_path / "rank1.json"
    started = time.monotonic()
    try:
        while not result.exists() and time.monotonic() - started < 90:
            time.sleep(0.2)
    finally:
        for process in ctx.processes:
            if process.is_alive():
                process.terminate()
            process.join(10)
    assert result.exists(), "rank 1 did not return after failing to load"
    outcome = json.loads(result.read_text())
    assert outcome["code"] == 1
    assert outcome["seconds"] < EXIT_WITHIN, outcome
