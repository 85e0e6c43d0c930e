"""The shard's process group: the only module that calls torch.distributed.

A world of one needs no group at all, so ``init_distributed(0, 1)`` returns a
no-op :class:`Distributed` without touching torch.distributed; every
collective then returns its input. Larger worlds rendezvous through a TCP
store on ``master_addr:master_port`` (rank 0 listens) and use NCCL on CUDA,
gloo otherwise.

Nothing listens beyond ``master_addr``: rank 0 binds the store's socket to
that address itself (torch's own store would listen on every interface), and
gloo (and NCCL's sockets on CUDA) are pinned to the interface that holds the
master address: ``lo`` for a loopback one, else the local interface with
that address, unless GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME are set already.
"""

from __future__ import annotations

import datetime
import errno
import os
import socket
import struct
from pathlib import Path

import torch
import torch.distributed as tdist
from loguru import logger


class DistributedInitError(RuntimeError):
    """The process group could not be formed (port taken, peers missing, timeout)."""


class Distributed:
    """Rank, world size, device and the collectives the tensor-parallel layers need."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        device: torch.device,
        backend: str,
        group: tdist.ProcessGroup | None = None,
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.backend = backend
        self._group = group

    def __repr__(self) -> str:
        return (
            f"Distributed(rank={self.rank}, world_size={self.world_size}, "
            f"device={self.device}, backend={self.backend})"
        )

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over all ranks in place and return it."""
        if self.world_size == 1:
            return t
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM, group=self._group)
        return t

    def all_gather(
        self, t: torch.Tensor, dim: int = -1, sizes: list[int] | None = None
    ) -> torch.Tensor:
        """Concatenate every rank's ``t`` along ``dim`` in rank order.

        Ranks may hold different sizes along ``dim`` (uneven vocab or head
        splits). Pass ``sizes`` (each rank's size along ``dim``) when the caller
        already knows them; otherwise they are exchanged first.
        """
        if self.world_size == 1:
            return t
        dim = dim % t.dim()
        if sizes is None:
            local = torch.tensor([t.shape[dim]], dtype=torch.int64, device=t.device)
            counts = [torch.empty_like(local) for _ in range(self.world_size)]
            tdist.all_gather(counts, local, group=self._group)
            sizes = [int(c.item()) for c in counts]
        if len(sizes) != self.world_size or sizes[self.rank] != t.shape[dim]:
            raise ValueError(
                f"all_gather sizes {sizes} do not match world size {self.world_size} "
                f"and this rank's size {t.shape[dim]} along dim {dim}"
            )
        longest = max(sizes)
        t = t.contiguous()
        if t.shape[dim] < longest:
            pad_shape = list(t.shape)
            pad_shape[dim] = longest - t.shape[dim]
            t = torch.cat([t, t.new_zeros(pad_shape)], dim=dim)
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        tdist.all_gather(parts, t, group=self._group)
        if all(s == longest for s in sizes):
            return torch.cat(parts, dim=dim)
        return torch.cat([p.narrow(dim, 0, s) for p, s in zip(parts, sizes, strict=True)], dim=dim)

    def barrier(self) -> None:
        """Wait until every rank reaches this point."""
        if self.world_size == 1:
            return
        tdist.barrier(group=self._group)

    def shutdown(self) -> None:
        """Leave the process group; safe to call more than once."""
        if self.world_size == 1 or self._group is None:
            return
        if tdist.is_initialized():
            # Rank 0 hosts the rendezvous store: leaving before the others have
            # finished their last collective aborts their process (and, with
            # gloo, can abort rank 0 at exit). Meet once, then leave together.
            try:
                tdist.barrier()
            except RuntimeError as err:
                logger.warning(f"Process group barrier at shutdown failed: {err}")
            tdist.destroy_process_group()
        self._group = None

    def abort(self) -> None:
        """Leave the process group without waiting for the other ranks (after a failure on this rank)."""
        if self.world_size == 1 or self._group is None:
            return
        if tdist.is_initialized():
            tdist.destroy_process_group()
        self._group = None


def _listen_on(master_addr: str, master_port: int) -> int:
    """A listening socket on ``master_addr:master_port`` only, handed to the store as a file descriptor."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            master_addr, master_port, type=socket.SOCK_STREAM
        )[0]
    except socket.gaierror as e:
        raise DistributedInitError(f"cannot resolve the master address {master_addr!r} ({e.strerror})") from e
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise DistributedInitError(
                f"master port {master_port} on {master_addr} is already in use; "
                f"pass --master-port with a free port"
            ) from e
        raise DistributedInitError(
            f"rank 0 cannot listen on {master_addr}:{master_port} ({e.strerror}); --master-addr must be "
            f"an address of the host running rank 0"
        ) from e
    # The store owns the descriptor from here on.
    return sock.detach()


_SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's (primary) IPv4 address


def _ipv4_interface(address: str) -> str | None:
    import fcntl

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            try:
                reply = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, request)
            except OSError:  # the interface has no IPv4 address
                continue
            if socket.inet_ntoa(reply[20:24]) == address:
                return name
    return None


def _ipv6_interface(address: str, table: Path = Path("/proc/net/if_inet6")) -> str | None:
    wanted = socket.inet_pton(socket.AF_INET6, address.split("%", 1)[0]).hex()
    try:
        lines = table.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        # address, ifindex, prefix length, scope, flags, name
        if len(fields) >= 6 and fields[0].lower() == wanted:
            return fields[5]
    return None


def interface_of(address: str) -> str | None:
    """The local network interface holding ``address`` (a literal IPv4 or IPv6 address), or None.

    IPv4 is matched against each interface's primary address (SIOCGIFADDR),
    IPv6 against /proc/net/if_inet6; None where neither knows the address.
    """
    try:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        socket.inet_pton(family, address.split("%", 1)[0])
    except OSError:
        return None
    try:
        return _ipv6_interface(address) if family == socket.AF_INET6 else _ipv4_interface(address)
    except OSError:
        return None


def _is_loopback(address: str) -> bool:
    return address.startswith("127.") or address in ("::1", "::ffff:127.0.0.1")


def pin_to_master_interface(master_addr: str, device: torch.device) -> str | None:
    """Keep gloo (and NCCL on CUDA) on the interface of ``master_addr``; returns the interface chosen.

    A loopback master address pins to ``lo``; another one to the local
    interface holding it. Variables the user set are kept. Nothing is set
    when the address is not one of this host's (a remote master).
    """
    variables = ["GLOO_SOCKET_IFNAME"] + (["NCCL_SOCKET_IFNAME"] if device.type == "cuda" else [])
    preset = [name for name in variables if os.environ.get(name)]
    for name in preset:
        logger.info(f"{name}={os.environ[name]} from the environment: kept")
    todo = [name for name in variables if name not in preset]
    if not todo:
        return None
    try:
        infos = socket.getaddrinfo(master_addr, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return None  # _listen_on / the store report an unresolvable address
    addresses = [info[4][0] for info in infos]
    # The address the store listens on (_listen_on binds the first one).
    first = addresses[0] if addresses else None
    names = {name for _, name in socket.if_nameindex()}
    if addresses and all(_is_loopback(a) for a in addresses):
        interface = "lo" if "lo" in names else None
    else:
        interface = interface_of(first) if first is not None else None
    if interface is None:
        logger.info(
            f"No interface of this host holds the master address {master_addr} ({first}): "
            f"{', '.join(todo)} left unset"
        )
        return None
    for name in todo:
        os.environ[name] = interface
    settings = ", ".join(f"{name}={interface}" for name in todo)
    logger.info(
        f"torch.distributed sockets on interface {interface}, which holds the master address "
        f"{master_addr} ({first}): {settings}"
    )
    return interface


def _choose_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(
    rank: int,
    world_size: int,
    master_addr: str = "localhost",
    master_port: int = 29500,
    device: torch.device | None = None,
    timeout_s: float = 120.0,
) -> Distributed:
    """Join the shard process group, or return a no-op group for a world of one.

    Raises :class:`DistributedInitError` when rank 0 cannot listen on the
    master port or the peers do not all arrive within ``timeout_s``.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    device = device if device is not None else torch.device("cpu")
    if world_size == 1:
        logger.info(f"Single shard on {device}: no process group needed")
        return Distributed(rank, 1, device, "none")

    backend = _choose_backend(device)
    where = f"rank {rank} of world {world_size} at {master_addr}:{master_port}"
    timeout = datetime.timedelta(seconds=timeout_s)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    listen_fd = _listen_on(master_addr, master_port) if rank == 0 else None
    pin_to_master_interface(master_addr, device)
    try:
        store = tdist.TCPStore(
            master_addr,
            master_port,
            world_size,
            is_master=rank == 0,
            timeout=timeout,
            wait_for_workers=False,
            master_listen_fd=listen_fd,
        )
    except tdist.DistError as e:
        text = str(e)
        if "EADDRINUSE" in text or "address already in use" in text.lower():
            raise DistributedInitError(
                f"master port {master_port} on {master_addr} is already in use; "
                f"pass --master-port with a free port"
            ) from e
        raise DistributedInitError(
            f"{where}: could not reach rank 0's rendezvous store within {timeout_s:g}s; "
            f"check that rank 0 is running and the master address and port match ({text})"
        ) from e
    try:
        # NCCL binds the group to the rank's GPU at once (device_id) rather than guessing it
        # from whatever device is current at the first collective.
        device_id = {"device_id": device} if device.type == "cuda" else {}
        tdist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=timeout, **device_id
        )
        # A barrier proves every peer joined; without it a missing peer would
        # surface only at the first collective of the first request.
        tdist.barrier()
    except tdist.DistError as e:
        if tdist.is_initialized():
            tdist.destroy_process_group()
        raise DistributedInitError(
            f"{where}: not all {world_size} ranks joined the {backend} process group "
            f"within {timeout_s:g}s ({e})"
        ) from e
    logger.info(f"Joined {backend} process group as {where} on {device}")
    return Distributed(rank, world_size, device, backend, tdist.group.WORLD)
