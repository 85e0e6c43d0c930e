"""Isolation through the real launcher: who can reach the shards, what listens where, what gets loaded.

- the socket directory the launcher creates (the default one included) is
  0700 and each shard socket is 0600: another user cannot connect to a shard;
- torch.distributed listens on the master address only (loopback by default,
  or a non-loopback --master-addr of this host);
- a directory with only pickle (.bin) weights is refused without unpickling
  anything; a socket directory group or other users can open is refused.
"""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from .conftest import LAUNCHER, ServerProcess, free_port, processes_mentioning

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NOBODY = 65534


def listening_addresses(port: int) -> list[str]:
    """Local addresses of TCP listeners on ``port`` (from /proc/net/tcp and tcp6)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state = fields[1], fields[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
                if len(address) == 8:
                    found.append(socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1]))
                else:
                    raw = bytes.fromhex(address)
                    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                    found.append(socket.inet_ntop(socket.AF_INET6, words))
    return found


def listeners_of(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket process ``pid`` holds in the LISTEN state."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:
                continue
            address, hex_port = fields[1].split(":")
            raw = bytes.fromhex(address)
            if len(raw) == 4:
                text = socket.inet_ntop(socket.AF_INET, raw[::-1])
            else:
                text = socket.inet_ntop(socket.AF_INET6, b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))
            found.append((text, int(hex_port, 16)))
    return found


def connect_as(uid: int, path: str) -> str:
    """Try to connect to a unix socket as another user; returns 'connected' or the error name."""
    code = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        "    s.connect(sys.argv[1]); print('connected')\n"
        "except OSError as e:\n"
        "    print(type(e).__name__)\n"
    )
    python = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
    out = subprocess.run([python, "-I", "-c", code, path], user=uid, capture_output=True, text=True, timeout=60)
    return out.stdout.strip() or out.stderr.strip()


@pytest.fixture
def open_tmp():
    """A directory other users may traverse (pytest's own tmp dirs are 0700 all the way down)."""
    path = Path(tempfile.mkdtemp(prefix="tgi-isolation-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_shards_are_reachable_only_by_this_user_and_the_store_only_on_loopback(tiny_llama_tied, open_tmp):
    server = ServerProcess(open_tmp, ["--model-id", str(tiny_llama_tied), "--sharded", "true", "--num-shard", "2"])
    master_port = free_port()
    uds_dir = open_tmp / "sockets"  # does not exist yet: the launcher creates it
    server.uds_path = str(uds_dir / "shard")
    server.args[server.args.index("--shard-uds-path") + 1] = server.uds_path
    server.args[server.args.index("--master-port") + 1] = str(master_port)
    server.start()
    try:
        assert stat.S_IMODE(uds_dir.stat().st_mode) == 0o700
        sockets = sorted(uds_dir.iterdir())
        assert [p.name for p in sockets] == ["shard-0", "shard-1"]
        for path in sockets:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, oct(path.stat().st_mode)
        if os.geteuid() == 0:
            # The directory keeps other users out ...
            assert connect_as(NOBODY, str(sockets[0])) == "PermissionError"
            # ... and with the directory opened up, so does the socket's own mode,
            os.chmod(uds_dir, 0o755)
            assert connect_as(NOBODY, str(sockets[0])) == "PermissionError"
            # which is what stops them (with the socket opened up too, they get in).
            os.chmod(sockets[0], 0o666)
            assert connect_as(NOBODY, str(sockets[0])) == "connected"
            os.chmod(sockets[0], 0o600)
            os.chmod(uds_dir, 0o700)
        addresses = listening_addresses(master_port)
        assert addresses and all(a in ("127.0.0.1", "::1") for a in addresses), addresses
        # Nothing a shard listens on (the store, gloo's own pair sockets, anything else) is
        # reachable from off the host.
        shards = [
            pid for pid in processes_mentioning(server.uds_path)
            if b"serve" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        ]
        assert len(shards) == 2, processes_mentioning(server.uds_path)
        for pid in shards:
            held = listeners_of(pid)
            assert all(a in ("127.0.0.1", "::1") or a.startswith("::ffff:127.") for a, _ in held), (pid, held)
    finally:
        assert server.stop() == 0, server.log_tail()


# World-writable; sticky like /tmp (the old default's directory); only readable by the group.
@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o750], ids=["0777", "1777", "0750"])
def test_a_socket_directory_group_or_others_can_open_is_refused(tiny_llama, tmp_path, mode):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, mode)
    out = subprocess.run(
        [
            str(LAUNCHER), "--model-id", str(tiny_llama), "--shard-uds-path", str(shared / "shard"),
            "--grpc-port", str(free_port()), "--port", str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1, out.stderr
    log = out.stdout + out.stderr
    assert f"--shard-uds-path: the socket directory {shared} (owner " in log, log
    assert f"mode {mode:04o}) can be opened by group or other users" in log, log
    assert f"chmod 700 {shared}" in log, log
    assert "Starting shard" not in log
    assert processes_mentioning(str(shared)) == []
    assert list(shared.iterdir()) == [] and stat.S_IMODE(shared.stat().st_mode) == mode


def test_the_default_socket_directory_is_created_0700_and_holds_the_sockets(tiny_llama):
    default_dir = Path("/tmp/text-generation-server")
    existed = default_dir.exists()
    if existed:
        info = default_dir.lstat()
        if info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) != 0o700 or not stat.S_ISDIR(info.st_mode):
            pytest.skip(f"{default_dir} exists from elsewhere (mode {stat.S_IMODE(info.st_mode):04o}, "
                        f"uid {info.st_uid}); the launcher refuses it, as the test above shows")
        if any(default_dir.iterdir()):
            pytest.skip(f"{default_dir} is in use by another launch")
    work = Path(tempfile.mkdtemp(prefix="tgi-default-uds-"))
    server = ServerProcess(work, ["--model-id", str(tiny_llama)])
    at = server.args.index("--shard-uds-path")
    del server.args[at : at + 2]  # the launcher's default
    server.uds_path = str(default_dir / "shard")
    server.start()
    try:
        info = default_dir.lstat()
        assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700, oct(info.st_mode)
        assert info.st_uid == os.geteuid()
        assert sorted(p.name for p in default_dir.iterdir()) == ["shard-0"]
        assert stat.S_IMODE((default_dir / "shard-0").stat().st_mode) == 0o600
        if not existed:
            assert f"Created socket directory {default_dir} (mode 0700)" in server.log_path.read_text()
        assert server.greedy(["Hello"], 2, 0).tokens[0], server.log_tail()
    finally:
        assert server.stop() == 0, server.log_tail()
        if not existed:
            default_dir.rmdir()  # empty again: the launcher removed its sockets
        shutil.rmtree(work, ignore_errors=True)


def first_non_loopback_ipv4() -> str | None:
    """This host's first IPv4 address outside 127.0.0.0/8 (`ip -o -4 addr`, else the default route's source)."""
    if shutil.which("ip"):
        out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, timeout=10)
        for line in out.stdout.splitlines():
            address = line.split()[3].split("/")[0]
            if not address.startswith("127."):
                return address
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("203.0.113.1", 9))  # sends nothing; picks the route's source address
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


def test_a_non_loopback_master_address_is_the_only_address_the_shards_listen_on(tiny_llama_tied, tmp_path):
    address = first_non_loopback_ipv4()
    if address is None:
        pytest.skip("this host has no IPv4 address outside loopback")
    server = ServerProcess(
        tmp_path, ["--model-id", str(tiny_llama_tied), "--sharded", "true", "--num-shard", "2", "--master-addr", address]
    )
    master_port = int(server.args[server.args.index("--master-port") + 1])
    server.start()
    try:
        shards = [
            pid for pid in processes_mentioning(server.uds_path)
            if b"serve" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        ]
        assert len(shards) == 2, processes_mentioning(server.uds_path)
        held = {pid: listeners_of(pid) for pid in shards}
        # The store (rank 0) and gloo's own listeners: all on the master address, none on a wildcard or loopback.
        assert any((address, master_port) in found for found in held.values()), held
        for pid, found in held.items():
            assert found and all(a in (address, f"::ffff:{address}") for a, _ in found), (address, pid, found)
        log = server.log_path.read_text(errors="replace")
        assert "torch.distributed sockets on interface " in log and f"master address {address}" in log, log[-3000:]
        answer = server.greedy(["Hello there", "Once upon"], 4, 0)
        assert [len(t) for t in answer.tokens] == [4, 4], server.log_tail()
    finally:
        assert server.stop() == 0, server.log_tail()


class _Marker:
    """Unpickling this creates a file: proof that a pickle was executed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_pickle_weights_are_never_unpickled_and_the_launch_is_refused(tiny_llama, tmp_path):
    model = tmp_path / "pickled"
    shutil.copytree(tiny_llama, model)
    (model / "model.safetensors").unlink()
    marker = tmp_path / "pickle-ran"
    with open(model / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Marker(str(marker))}, f)
    out = subprocess.run(
        [
            str(LAUNCHER), "--model-id", str(model), "--shard-uds-path", str(tmp_path / "shard"),
            "--grpc-port", str(free_port()), "--port", str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    log = out.stdout + out.stderr
    assert out.returncode == 1, log
    assert "safetensors" in log and "pytorch_model.bin" in log, log
    assert not marker.exists(), "a pickle from the checkpoint was executed"
    assert "Starting shard" not in log
