"""The shard socket directory: created private, and an existing one only when no one else can open it."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
from text_generation_launcher.args import DEFAULT_SHARD_UDS_PATH, parse_args
from text_generation_launcher.probes import SocketInUseError, prepare_socket_dir
from text_generation_server.utils.sockets import shard_socket

NOBODY = 65534


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_default_sockets_live_in_a_directory_of_their_own_not_directly_in_tmp():
    args = parse_args([], env={}, cuda_device_count=lambda: 0)
    assert args.shard_uds_path == DEFAULT_SHARD_UDS_PATH == "/tmp/text-generation-server/shard"
    assert Path(shard_socket(args.shard_uds_path, 1)) == Path("/tmp/text-generation-server/shard-1")
    assert Path(shard_socket(args.shard_uds_path, 0)).parent != Path("/tmp")


@pytest.mark.parametrize("umask", [0o022, 0o000, 0o277])
def test_a_missing_directory_is_created_0700_whatever_the_umask(tmp_path, umask):
    target = tmp_path / "sockets"
    previous = os.umask(umask)  # 0o277 alone would leave mkdir(0o700) at 0o500
    try:
        assert prepare_socket_dir(str(target)) is True
    finally:
        os.umask(previous)
    assert target.is_dir() and mode_of(target) == 0o700
    assert target.stat().st_uid == os.geteuid()
    # Once it exists (and is private) it is accepted as it is.
    assert prepare_socket_dir(str(target)) is False


def test_missing_parents_are_created_too(tmp_path):
    target = tmp_path / "a" / "b" / "sockets"
    assert prepare_socket_dir(str(target)) is True
    assert mode_of(target) == 0o700


def test_a_private_directory_of_this_user_is_accepted(tmp_path):
    private = tmp_path / "private"
    private.mkdir()
    os.chmod(private, 0o700)
    assert prepare_socket_dir(str(private)) is False
    assert mode_of(private) == 0o700  # left as it was


@pytest.mark.parametrize("mode", [0o755, 0o750, 0o705, 0o710, 0o770, 0o777, 0o1777, 0o1733])
def test_a_directory_group_or_others_can_open_is_refused_naming_flag_directory_owner_mode_and_fix(tmp_path, mode):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, mode)
    with pytest.raises(SocketInUseError) as err:
        prepare_socket_dir(str(shared))
    message = str(err.value)
    assert message.startswith("--shard-uds-path: ")
    assert str(shared) in message
    assert f"mode {mode:04o}" in message
    assert f"uid {os.geteuid()}" in message
    assert f"chmod 700 {shared}" in message
    assert mode_of(shared) == mode  # the launcher never changes a directory it did not create


def test_the_flag_named_is_the_one_given(tmp_path):
    os.chmod(tmp_path, 0o755)
    with pytest.raises(SocketInUseError, match=r"^--uds-path: "):
        prepare_socket_dir(str(tmp_path), flag="--uds-path")


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_a_directory_of_another_user_is_refused_even_when_private(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(SocketInUseError) as err:
        prepare_socket_dir(str(theirs))
    message = str(err.value)
    assert str(theirs) in message and f"uid {NOBODY}" in message and "does not belong to this user" in message
    assert "--shard-uds-path" in message


def test_a_symbolic_link_is_refused_even_to_a_private_directory(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(SocketInUseError, match="symbolic link"):
        prepare_socket_dir(str(link))


def test_a_file_where_the_directory_should_be_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SocketInUseError, match="is not a directory"):
        prepare_socket_dir(str(blocker))


def test_a_directory_that_cannot_be_created_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SocketInUseError, match=f"cannot create the socket directory {blocker / 'sockets'}"):
        prepare_socket_dir(str(blocker / "sockets"))


def test_a_launch_removes_only_sockets_nobody_answers_on(tmp_path):
    """On its way out a launch removes what its stopped shards left, never a live socket of another
    launch on the same --shard-uds-path, nor a file that is not a socket."""
    import socket

    from text_generation_launcher.launch import _remove_sockets

    base = Path(tempfile.mkdtemp(prefix="s", dir="/tmp"))  # unix socket paths must stay short
    try:
        stale, live, plain = base / "shard-0", base / "shard-1", base / "shard-2"
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dead.bind(str(stale))
        dead.close()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(live))
        listener.listen()
        plain.write_text("not a socket")
        try:
            _remove_sockets([str(stale), str(live), str(plain), str(base / "shard-3")])
            assert not stale.exists() and live.exists() and plain.read_text() == "not a socket"
        finally:
            listener.close()
    finally:
        shutil.rmtree(base)
