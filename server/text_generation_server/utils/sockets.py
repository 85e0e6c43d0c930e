"""Shard socket paths and the checks around them, shared by the launcher and the shards.

Shard ``rank`` listens on ``{uds_path}-{rank}``; the directory holding the
sockets must be one only this user can open (created with mode 0700 when
missing). A socket file that nobody answers on was left by a dead shard and
may be removed; one that answers, or a path that is not a socket, never is.
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path


class SocketInUseError(OSError):
    """A shard socket path is served by a running process, or is not a socket."""


def shard_socket(uds_path: str, rank: int) -> str:
    """The unix socket path of shard ``rank``."""
    return f"{uds_path}-{rank}"


def shard_url(uds_path: str, rank: int) -> str:
    """The gRPC address of shard ``rank``."""
    return f"unix://{shard_socket(uds_path, rank)}"


def make_private_dir(path: Path) -> bool:
    """Create ``path`` (and missing parents) with mode 0700 whatever the umask; False when it
    already existed. ``OSError`` when it cannot be created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return False
    # mkdir's mode is filtered through the umask; make it exactly 0700.
    os.chmod(path, 0o700)
    return True


def clear_stale_socket(path: str | Path, flag: str = "--shard-uds-path") -> bool:
    """Remove a socket file nobody listens on (left by a killed shard); True if one was removed.

    Raises :class:`SocketInUseError` when a process answers on it, or for a
    path that exists but is not a socket (other files are never deleted);
    ``flag`` names the option to change in the message.
    """
    path = str(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(mode):
        raise SocketInUseError(f"{path} exists and is not a socket; choose another {flag}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)
            return True
    raise SocketInUseError(f"{path} is in use by another running server; stop it or choose another {flag}")
