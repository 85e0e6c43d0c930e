"""Process-group start-up: a world of one needs nothing; failures say what to fix."""

from __future__ import annotations

import socket
import time

import pytest
import torch
from text_generation_server.distributed import DistributedInitError, init_distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_world_of_one_is_a_no_op_group():
    dist = init_distributed(0, 1)
    assert (dist.rank, dist.world_size, dist.backend, dist.device) == (
        0,
        1,
        "none",
        torch.device("cpu"),
    )
    t = torch.arange(4.0)
    assert dist.all_reduce(t) is t
    assert dist.all_gather(t) is t
    dist.barrier()
    dist.shutdown()
    assert not torch.distributed.is_initialized()


def test_master_port_in_use_is_reported_with_the_flag_to_change():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(DistributedInitError) as e:
            init_distributed(0, 2, "127.0.0.1", port, timeout_s=5)
    assert str(e.value) == (
        f"master port {port} on 127.0.0.1 is already in use; pass --master-port with a free port"
    )


def test_missing_master_times_out_naming_rank_world_and_address():
    port = free_port()
    started = time.monotonic()
    with pytest.raises(DistributedInitError) as e:
        init_distributed(1, 2, "127.0.0.1", port, timeout_s=1)
    assert time.monotonic() - started < 30
    assert f"rank 1 of world 2 at 127.0.0.1:{port}" in str(e.value)


def test_missing_peer_times_out_naming_rank_world_and_address():
    port = free_port()
    with pytest.raises(DistributedInitError) as e:
        init_distributed(0, 2, "127.0.0.1", port, timeout_s=1)
    text = str(e.value)
    assert f"rank 0 of world 2 at 127.0.0.1:{port}" in text
    assert "not all 2 ranks joined" in text
    assert not torch.distributed.is_initialized()


def test_bad_rank_or_world_size_is_refused():
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        init_distributed(0, 0)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\)"):
        init_distributed(2, 2)
