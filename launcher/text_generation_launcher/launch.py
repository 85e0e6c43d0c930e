"""One launch: the shard and router commands, and the start-up / supervision / shutdown sequence.

Order: model resolved (before this module runs) -> ports checked -> all
shards spawned (torch.distributed needs every rank at once) -> each shard's
socket answers Health -> router spawned -> router's grpc.health.v1 reports
SERVING -> "Ready" -> watch. Any child exiting stops everything (exit 1); a
stop request stops the router first (it drains), then the shards (exit 0).
Socket files are removed at the end whatever happened.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from loguru import logger
from text_generation_server.utils.sockets import SocketInUseError, clear_stale_socket, shard_socket

from .args import LauncherArgs, router_limit_args, router_tls_args
from .preflight import PreflightError, check_model, check_quantization, check_tokenizer
from .probes import (
    PortInUseError,
    check_port_free,
    local_address,
    prepare_socket_dir,
    router_http_healthy,
    router_serving,
    shard_answers_health,
)
from .supervisor import (
    Child,
    ChildExited,
    ChildStartError,
    StartupTimeout,
    StopRequested,
    Supervisor,
)


@dataclass(frozen=True)
class Commands:
    """Command prefixes of the two programs the launcher starts."""

    server: tuple[str, ...]
    router: tuple[str, ...]


def default_commands() -> Commands:
    """The console scripts installed beside this Python, else ``python -m`` of their modules."""
    bindir = Path(sys.executable).parent

    def find(script: str, module: str) -> tuple[str, ...]:
        path = bindir / script
        if path.is_file() and os.access(path, os.X_OK):
            return (str(path),)
        return (sys.executable, "-m", module)

    return Commands(
        server=find("text-generation-server", "text_generation_server.cli"),
        router=find("text-generation-router", "text_generation_router.cli"),
    )


def shard_argv(args: LauncherArgs, model_path: Path, commands: Commands) -> list[str]:
    """``text-generation-server serve`` with the flags the user chose (same for every rank)."""
    argv = [*commands.server, "serve", str(model_path), "--uds-path", args.shard_uds_path]
    if args.dtype is not None:
        argv += ["--dtype", args.dtype]
    if args.quantize is not None:
        argv += ["--quantize", args.quantize]
    if args.num_shard > 1:
        argv.append("--sharded")
    if args.json_output:
        argv.append("--json-output")
    if args.trust_remote_code:
        argv.append("--trust-remote-code")
    return argv


def shard_env(args: LauncherArgs, rank: int, base: Mapping[str, str]) -> dict[str, str]:
    """The environment of shard ``rank``: its place in the process group, its device (``LOCAL_RANK``:
    the rank's GPU among the visible ones, whatever the launcher inherited) and its share of the CPU
    threads."""
    env = dict(base)
    env.update(
        RANK=str(rank),
        WORLD_SIZE=str(args.num_shard),
        LOCAL_RANK=str(rank),
        MASTER_ADDR=args.master_addr,
        MASTER_PORT=str(args.master_port),
    )
    env["CUDA_MEMORY_FRACTION"] = str(args.cuda_memory_fraction)
    env["PREFIX_CACHING"] = "true" if args.prefix_caching else "false"
    env["SPECULATE"] = str(args.speculate or 0)
    if args.kv_cache_dtype is not None:
        env["KV_CACHE_DTYPE"] = args.kv_cache_dtype
    if args.disable_custom_kernels:
        env["CPU_KERNELS"] = "off"
        env["DISABLE_CUSTOM_KERNELS"] = "true"
    if "OMP_NUM_THREADS" not in base:
        env["OMP_NUM_THREADS"] = str(max(1, _cpu_count() // args.num_shard))
    if args.huggingface_hub_cache is not None:
        env["HUGGINGFACE_HUB_CACHE"] = env["HF_HUB_CACHE"] = args.huggingface_hub_cache
    return env


def router_env(args: LauncherArgs, base: Mapping[str, str]) -> dict[str, str]:
    """The router's environment: the launcher's, with the API key (kept off every command line)."""
    env = dict(base)
    if args.api_key is not None:
        env["API_KEY"] = args.api_key
    return env


def router_argv(args: LauncherArgs, model_path: Path, commands: Commands) -> list[str]:
    """``text-generation-router`` with the addresses, and only the limits the user set."""
    argv = [
        *commands.router,
        "--model-id", args.served_model_name,
        "--tokenizer", str(model_path),
        "--shard-uds-path", args.shard_uds_path,
        "--grpc-port", str(args.grpc_port),
        "--port", str(args.port),
        "--hostname", args.hostname,
        *router_limit_args(args),
        *router_tls_args(args),
    ]
    if args.cors_allow_origin is not None:
        argv += ["--cors-allow-origin", args.cors_allow_origin]
    if args.json_output:
        argv.append("--json-output")
    return argv


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def serve(
    args: LauncherArgs,
    model_path: Path,
    supervisor: Supervisor,
    commands: Commands | None = None,
    env: Mapping[str, str] | None = None,
) -> int:
    """Start shards and router for ``model_path`` and supervise them; returns the launcher's exit code.

    0 after a requested stop, 1 when something failed (a port, a child).
    Every child is stopped and every shard socket removed before returning.
    """
    commands = commands or default_commands()
    env = os.environ if env is None else env
    sockets = [shard_socket(args.shard_uds_path, rank) for rank in range(args.num_shard)]
    try:
        check_model(model_path)
        check_quantization(args, model_path)
        check_tokenizer(model_path)
        _preflight(args, sockets)
    except (PortInUseError, SocketInUseError, PreflightError) as err:
        logger.error(f"Cannot start: {err}")
        return 1

    shards: list[Child] = []
    router: Child | None = None
    ready = False
    try:
        try:
            for rank in range(args.num_shard):
                logger.info(f"Starting shard {rank}/{args.num_shard}")
                shards.append(
                    supervisor.spawn(f"shard {rank}", shard_argv(args, model_path, commands), shard_env(args, rank, env))
                )
            for rank, (shard, path) in enumerate(zip(shards, sockets, strict=True)):
                elapsed = supervisor.wait_ready(shard, lambda path=path: shard_answers_health(path))
                logger.info(f"Shard {rank} ready ({elapsed:.1f} s)")

            logger.info("Starting router")
            router = supervisor.spawn("router", router_argv(args, model_path, commands), router_env(args, env))
            elapsed = supervisor.wait_ready(router, _router_ready_probe(args))
            logger.info(f"Router ready ({elapsed:.1f} s)")
            logger.info(
                f"Ready: fmaas.GenerationService on {args.hostname}:{args.grpc_port}{_tls_note(args)} "
                f"(model {args.served_model_name}, {args.num_shard} shard{'s' if args.num_shard > 1 else ''}); "
                f"HTTP API (TGI routes, OpenAI-compatible /v1, /health, /metrics, /docs) on {args.hostname}:{args.port}"
                f"{' (API key required)' if args.api_key else ''}"
            )
            ready = True
            supervisor.watch()
        except ChildExited as err:
            phase = "" if ready else " during start-up"
            logger.error(f"{err}{phase}; stopping everything")
            _stop(args, supervisor, router, shards)
            return 1
        except (ChildStartError, StartupTimeout) as err:
            logger.error(f"Cannot start: {err}; stopping everything")
            _stop(args, supervisor, router, shards)
            return 1
        except StopRequested:
            if router is not None:
                logger.info(
                    f"Stopping: router first (drains in-flight requests for up to {args.drain_timeout:g} s; "
                    "a second signal cancels them), then the shards"
                )
            else:
                logger.info("Stopping during start-up")
            clean = _stop(args, supervisor, router, shards)
            logger.info("Stopped" if clean else "Stopped (some processes had to be killed)")
            return 0
    finally:
        # Whatever ended the launch (including an unexpected error), no child survives it.
        if any(c.poll() is None for c in supervisor.children):
            _stop(args, supervisor, router, shards)
        _remove_sockets(sockets)


def _router_ready_probe(args: LauncherArgs) -> Callable[[], bool]:
    """grpc.health.v1 on the gRPC port; with TLS there, the plaintext HTTP /health that mirrors it."""
    if args.tls_cert_path is not None:
        http_address = local_address(args.hostname, args.port)
        return lambda: router_http_healthy(http_address)
    address = local_address(args.hostname, args.grpc_port)
    return lambda: router_serving(address)


def _tls_note(args: LauncherArgs) -> str:
    if args.tls_client_ca_cert_path is not None:
        return " (mutual TLS)"
    return " (TLS)" if args.tls_cert_path is not None else ""


def _preflight(args: LauncherArgs, sockets: list[str]) -> None:
    """Ports free, the socket directory private to this user (created 0700 if missing), no live socket."""
    check_port_free(args.hostname, args.grpc_port, "--grpc-port")
    check_port_free(args.hostname, args.port, "--port")
    if args.num_shard > 1:
        check_port_free(args.master_addr, args.master_port, "--master-port", only_if_local=True)
    for path in sockets:
        directory = Path(path).parent
        if prepare_socket_dir(str(directory)):
            logger.info(f"Created socket directory {directory} (mode 0700)")
        if clear_stale_socket(path):
            logger.info(f"Removed stale socket {path} left by an earlier run")


def _stop(args: LauncherArgs, supervisor: Supervisor, router: Child | None, shards: list[Child]) -> bool:
    started = time.monotonic()
    stages: list[tuple[list[Child], float]] = []
    if router is not None:
        stages.append(([router], args.drain_timeout + args.shutdown_timeout))
    stages.append((shards, args.shutdown_timeout))
    clean = supervisor.stop(stages)
    logger.debug(f"Children stopped in {time.monotonic() - started:.1f} s")
    return clean


def _remove_sockets(sockets: list[str]) -> None:
    """Remove the shard socket files our stopped shards left; one that still answers belongs to
    another server (a second launch on the same --shard-uds-path) and stays."""
    for path in sockets:
        try:
            removed = clear_stale_socket(path)
        except SocketInUseError as err:
            logger.warning(f"Leaving {path} in place: {err}")
            continue
        except OSError as err:
            logger.warning(f"Cannot remove socket {path}: {err.strerror}")
            continue
        if removed:
            logger.info(f"Removed leftover socket {path}")
