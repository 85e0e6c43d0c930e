"""Process-group start-up: a world of one needs nothing; failures say what to fix."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch
from text_generation_server.distributed import (
    DistributedInitError,
    init_distributed,
    interface_of,
    pin_to_master_interface,
)


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


# ---- which interface torch.distributed may use ------------------------------------------------------


def local_ipv4_addresses() -> dict[str, str]:
    """interface -> IPv4 address, from `ip -o -4 addr` (an independent reading of the same facts)."""
    import shutil
    import subprocess

    if shutil.which("ip") is None:
        return {}
    out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, timeout=10).stdout
    found = {}
    for line in out.splitlines():
        fields = line.split()
        found.setdefault(fields[1], fields[3].split("/")[0])
    return found


@pytest.fixture
def ifname_env(monkeypatch):
    """GLOO_/NCCL_SOCKET_IFNAME unset for the test and restored after it (whatever the code under test sets)."""
    for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        monkeypatch.setenv(name, "recorded")  # makes monkeypatch restore the original value afterwards
        monkeypatch.delenv(name)
    return monkeypatch


def test_loopback_address_is_found_on_lo():
    assert interface_of("127.0.0.1") == "lo"


def test_ipv6_loopback_is_found_on_lo_when_the_host_has_ipv6():
    table = Path("/proc/net/if_inet6")
    if not table.exists() or "00000000000000000000000000000001" not in table.read_text():
        pytest.skip("no IPv6 loopback address on this host")
    assert interface_of("::1") == "lo"


def test_an_address_no_interface_holds_and_a_host_name_give_none():
    assert interface_of("203.0.113.77") is None  # TEST-NET-3: never configured here
    assert interface_of("2001:db8::77") is None
    assert interface_of("localhost") is None  # names are resolved by the caller, not here


def test_every_primary_ipv4_address_maps_to_its_interface():
    addresses = local_ipv4_addresses()
    if not addresses:
        pytest.skip("`ip` is not installed")
    for interface, address in addresses.items():
        assert interface_of(address) == interface, (interface, address)


def test_loopback_master_pins_gloo_to_lo_and_a_users_choice_is_kept(ifname_env):
    assert pin_to_master_interface("127.0.0.1", torch.device("cpu")) == "lo"
    assert os.environ["GLOO_SOCKET_IFNAME"] == "lo"
    assert "NCCL_SOCKET_IFNAME" not in os.environ  # NCCL only on CUDA
    ifname_env.setenv("GLOO_SOCKET_IFNAME", "users-choice")
    assert pin_to_master_interface("127.0.0.1", torch.device("cpu")) is None
    assert os.environ["GLOO_SOCKET_IFNAME"] == "users-choice"


def test_on_cuda_nccl_is_pinned_too(ifname_env):
    assert pin_to_master_interface("127.0.0.1", torch.device("cuda", 0)) == "lo"
    assert os.environ["GLOO_SOCKET_IFNAME"] == os.environ["NCCL_SOCKET_IFNAME"] == "lo"


def test_a_non_loopback_master_pins_to_its_interface(ifname_env):
    addresses = {i: a for i, a in local_ipv4_addresses().items() if not a.startswith("127.")}
    if not addresses:
        pytest.skip("no non-loopback IPv4 address on this host")
    interface, address = next(iter(addresses.items()))
    assert pin_to_master_interface(address, torch.device("cpu")) == interface
    assert os.environ["GLOO_SOCKET_IFNAME"] == interface


def test_a_remote_master_leaves_the_choice_to_gloo(ifname_env):
    assert pin_to_master_interface("203.0.113.77", torch.device("cpu")) is None
    assert "GLOO_SOCKET_IFNAME" not in os.environ

