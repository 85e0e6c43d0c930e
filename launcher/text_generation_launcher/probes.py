"""Readiness probes and port checks the launcher runs against its children and the host."""

from __future__ import annotations

import errno
import os
import pwd
import socket
import stat
from pathlib import Path

from text_generation_server.utils.sockets import SocketInUseError, make_private_dir


def shard_answers_health(socket_path: str, timeout: float = 2.0) -> bool:
    """True when the shard's socket exists and its generate.v1 Health RPC answers."""
    if not os.path.exists(socket_path):
        return False
    import grpc
    from text_generation_server.pb.generate.v1 import generate_pb2, generate_pb2_grpc

    with grpc.insecure_channel(f"unix://{socket_path}") as channel:
        try:
            generate_pb2_grpc.TextGenerationServiceStub(channel).Health(generate_pb2.HealthRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
    return True


def router_serving(address: str, timeout: float = 2.0) -> bool:
    """True when grpc.health.v1 at ``address`` reports SERVING for the whole server."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def router_http_healthy(address: str, timeout: float = 2.0) -> bool:
    """True when the router's HTTP ``/health`` at ``address`` answers 200 (it does once it reports SERVING).

    With TLS on the gRPC port, the launcher cannot complete a handshake there
    (it holds no client certificate and need not trust the server's CA), so it
    asks the plaintext HTTP endpoint, which mirrors grpc.health.v1.
    """
    import http.client

    host, _, port = address.rpartition(":")
    connection = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout)
    try:
        connection.request("GET", "/health")
        return connection.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def local_address(hostname: str, port: int) -> str:
    """Where the launcher reaches a server listening on ``hostname``: loopback for wildcard addresses."""
    if hostname in ("0.0.0.0", ""):
        return f"127.0.0.1:{port}"
    if hostname in ("::", "[::]"):
        return f"[::1]:{port}"
    if ":" in hostname and not hostname.startswith("["):
        return f"[{hostname}]:{port}"
    return f"{hostname}:{port}"


class PortInUseError(RuntimeError):
    """A port the launch needs is taken or cannot be bound; the message names the flag."""


def check_port_free(host: str, port: int, flag: str, *, only_if_local: bool = False) -> None:
    """Raise PortInUseError unless something could listen on ``host:port`` now.

    ``only_if_local`` skips the check when ``host`` is not an address of this
    machine (a remote torch.distributed master).
    """
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise PortInUseError(f"{flag}: cannot resolve host {host!r} ({err.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # SO_REUSEADDR ignores connections lingering in TIME_WAIT but still fails on a listener.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise PortInUseError(
                    f"port {port} on {host} is already in use (another server?); pass a free port with {flag}"
                ) from None
            if err.errno == errno.EADDRNOTAVAIL and only_if_local:
                return
            raise PortInUseError(f"{flag}: cannot listen on {host}:{port} ({err.strerror})") from None


def prepare_socket_dir(directory: str, flag: str = "--shard-uds-path") -> bool:
    """Make sure shard sockets live in a directory only this user can open.

    A missing directory is created with mode 0700 (True is returned; missing
    parents are created as usual). An existing one must be a real directory
    (not a symbolic link), owned by the current user, with no permission bits
    for group or others: anyone who can open it could see, and with write
    access replace, the shard sockets. Raises SocketInUseError with a
    message naming ``flag``, the directory, its owner and mode, and the fix.
    """
    path = Path(directory)
    created = False
    try:
        info = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        created = _make_private_dir(path, flag)
        info = os.lstat(path)
    fix = (
        f"pass {flag} DIR/shard with a DIR that does not exist yet (the launcher creates it with mode 0700) "
        f"or that only this user can open"
    )
    if stat.S_ISLNK(info.st_mode):
        raise SocketInUseError(
            f"{flag}: the socket directory {path} is a symbolic link (to {os.readlink(path)}); "
            f"whoever controls the link controls where the shard sockets are; {fix}"
        )
    if not stat.S_ISDIR(info.st_mode):
        raise SocketInUseError(f"{flag}: {path} is not a directory; {fix}")
    me = os.geteuid()
    mode = stat.S_IMODE(info.st_mode)
    described = f"owner {_user_name(info.st_uid)}, mode {mode:04o}"
    if info.st_uid != me:
        raise SocketInUseError(
            f"{flag}: the socket directory {path} ({described}) does not belong to this user "
            f"({_user_name(me)}), so its owner could reach or replace the shard sockets; {fix}"
        )
    if mode & 0o077:
        raise SocketInUseError(
            f"{flag}: the socket directory {path} ({described}) can be opened by group or other users; "
            f"shard sockets need a directory only this user can open: run `chmod 700 {path}`, or {fix}"
        )
    return created


def _make_private_dir(path: Path, flag: str) -> bool:
    """Create ``path`` with mode 0700; False if it appeared meanwhile (then the caller checks it as found)."""
    try:
        return make_private_dir(path)
    except OSError as err:
        raise SocketInUseError(f"{flag}: cannot create the socket directory {path} ({err.strerror})") from None


def _user_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"
