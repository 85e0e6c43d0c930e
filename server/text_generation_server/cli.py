"""``text-generation-server``: the shard worker (``serve``) and model download.

Rank and world come from the environment the launcher sets (``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``). Every user error ends in
one log line naming what was wrong and exit code 1.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger

from text_generation_server.utils.cpu import host_has_bf16_instructions
from text_generation_server.utils.log import setup_logging

if TYPE_CHECKING:  # torch loads only when a command needs it
    import torch

# The launcher's default too: sockets {path}-{rank} in a directory of their own, mode 0700.
DEFAULT_UDS_PATH = "/tmp/text-generation-server/shard"
DTYPES = ("auto", "float32", "bfloat16", "float16")
# Optional subcommand modules exposing ``register(subparsers)``.
EXTRA_COMMANDS = ("text_generation_server.quantize.cli",)


class ShardStartError(RuntimeError):
    """The shard cannot start as configured; the message says why."""


@dataclass(frozen=True)
class ShardEnv:
    rank: int
    world_size: int
    master_addr: str
    master_port: int

    @classmethod
    def from_environ(cls, environ: dict[str, str] | None = None) -> ShardEnv:
        env = os.environ if environ is None else environ

        def integer(name: str, default: int, lowest: int) -> int:
            raw = env.get(name, "").strip()
            if not raw:
                return default
            try:
                value = int(raw)
            except ValueError:
                raise ShardStartError(f"{name}={raw!r} is not an integer") from None
            if value < lowest:
                raise ShardStartError(f"{name}={value} must be >= {lowest}")
            return value

        rank = integer("RANK", 0, 0)
        world_size = integer("WORLD_SIZE", 1, 1)
        if rank >= world_size:
            raise ShardStartError(f"RANK={rank} must be below WORLD_SIZE={world_size}")
        port = integer("MASTER_PORT", 29500, 1)
        if port > 65535:
            raise ShardStartError(f"MASTER_PORT={port} is not a TCP port (1-65535)")
        addr = env.get("MASTER_ADDR", "").strip() or "localhost"
        return cls(rank, world_size, addr, port)


# ---- start-up choices, each logged once -------------------------------------------


def prefix_caching_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """``PREFIX_CACHING`` (TGI's name; the launcher's --prefix-caching sets it): on unless it is
    0/false/off/no."""
    from text_generation_server.utils.argtypes import parse_bool

    environ = os.environ if environ is None else environ
    raw = environ.get("PREFIX_CACHING", "")
    if not raw.strip():
        return True
    try:
        return parse_bool(raw)
    except argparse.ArgumentTypeError:
        raise ShardStartError(f"PREFIX_CACHING={raw.strip()!r} must be true or false (1/0, on/off)") from None


def speculate_tokens(environ: Mapping[str, str] | None = None) -> int:
    """``SPECULATE`` (the launcher's --speculate): tokens a greedy request may guess per step, 0 = none."""
    environ = os.environ if environ is None else environ
    raw = environ.get("SPECULATE", "").strip()
    if not raw:
        return 0
    if not raw.isdigit():
        raise ShardStartError(f"SPECULATE={raw!r} must be a whole number of tokens (0 = no speculation)")
    return int(raw)


KV_CACHE_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16"}


def kv_cache_dtype(environ: Mapping[str, str] | None = None) -> torch.dtype | None:
    """``KV_CACHE_DTYPE`` (the launcher's --kv-cache-dtype): the KV cache's element type, None for
    the compute dtype. bfloat16 halves a float32 model's cache; fp8 is not supported."""
    import torch

    environ = os.environ if environ is None else environ
    raw = environ.get("KV_CACHE_DTYPE", "").strip().lower()
    if raw in ("", "auto"):
        return None
    if raw not in KV_CACHE_DTYPES:
        raise ShardStartError(f"KV_CACHE_DTYPE={raw!r} is not supported; use bfloat16 or leave it unset "
                              f"(the compute dtype)")
    return getattr(torch, KV_CACHE_DTYPES[raw])


def choose_device(env: ShardEnv, environ: Mapping[str, str] | None = None) -> torch.device:
    """The shard's device: GPU ``LOCAL_RANK`` (the launcher sets it to the rank; RANK where it is
    unset) among the visible ones when CUDA is present, else the CPU. A GPU index beyond the
    visible devices is refused naming both, rather than putting two shards on one GPU."""
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    environ = os.environ if environ is None else environ
    local = environ.get("LOCAL_RANK", "").strip()
    if local and not local.isdigit():
        raise ShardStartError(f"LOCAL_RANK={local!r} must be a GPU index (0, 1, ...)")
    index = int(local) if local else env.rank
    count = torch.cuda.device_count()
    if index >= count:
        visible = environ.get("CUDA_VISIBLE_DEVICES")
        where = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
        raise ShardStartError(
            f"shard {env.rank} is to run on GPU {index} (LOCAL_RANK), but {count} GPU(s) are visible{where}; "
            f"use at most {count} shard(s) on this host"
        )
    return torch.device("cuda", index)


def _cpu_dtype(name: str, checkpoint_dtype: str | None, quantized: bool, default_model: bool) -> torch.dtype:
    import torch

    from text_generation_server.kernels import cpu_ops_status

    capability = torch.backends.cpu.get_cpu_capability()
    bf16 = host_has_bf16_instructions()
    found = f"capability {capability}, bf16 instructions {'present' if bf16 else 'absent'}"
    if name != "auto":
        if name == "float16" and not cpu_ops_status().available:
            logger.warning(f"float16 on CPU ({found}) without the native kernels is several times slower than float32")
        elif name == "bfloat16" and not bf16 and not cpu_ops_status().available:
            logger.warning(f"bfloat16 on this CPU ({found}) without the native kernels is much slower than float32")
        else:
            logger.info(f"dtype {name} on CPU ({found})")
        return getattr(torch, name)
    if quantized:
        logger.info(f"dtype float32 on CPU ({found}): a quantized model computes in float32 around its kernels")
        return torch.float32
    status = cpu_ops_status()
    if not status.available:
        logger.info(f"dtype float32 on CPU ({found}): 16-bit weights need the native CPU kernels ({status.reason})")
        return torch.float32
    if default_model:
        chosen = "bfloat16" if bf16 else "float16"
        why = ("bf16 dot products for prefills and batches" if bf16 else
               "no bf16 dot products here; float16 holds the weights to 11 bits")
        logger.info(f"dtype {chosen} on CPU for the built-in model ({found}): its fastest form here, 16-bit weights "
                    f"read by the native kernels with float32 activations, {why}; --dtype float32 for the exact one")
        return getattr(torch, chosen)
    if checkpoint_dtype in ("bfloat16", "float16"):
        logger.info(f"dtype {checkpoint_dtype} on CPU ({found}): the checkpoint's own, its weights read by the native "
                    f"kernels in 16 bits with float32 activations; --dtype float32 widens them")
        return getattr(torch, checkpoint_dtype)
    logger.info(f"dtype float32 on CPU ({found}): the checkpoint's {checkpoint_dtype or 'dtype unknown'}")
    return torch.float32


def resolve_dtype(
    name: str,
    device: torch.device,
    checkpoint_dtype: str | None = None,
    *,
    quantized: bool = False,
    default_model: bool = False,
) -> torch.dtype:
    """The compute dtype for ``--dtype`` on ``device``. ``auto`` on the CPU: where the native CPU
    kernels run, an unquantized checkpoint's own 16-bit dtype (its weights stay 16-bit and the
    native layers multiply them by float32 activations), the built-in default model in its
    fastest form (bfloat16 where the CPU has bf16 dot products, float16 otherwise), float32 for
    everything else (quantized models compute in float32 around their own kernels). On CUDA:
    the checkpoint's own half dtype (``checkpoint_dtype``, config.json's), bfloat16 only where
    the GPU has it, float16 otherwise. An explicit bfloat16 on a GPU without it is refused."""
    import torch

    if device.type == "cpu":
        return _cpu_dtype(name, checkpoint_dtype, quantized, default_model)
    bf16 = torch.cuda.is_bf16_supported()
    gpu = torch.cuda.get_device_name(device)
    if name == "auto":
        chosen = checkpoint_dtype if checkpoint_dtype in ("float16", "bfloat16") else "float16"
        if chosen == "bfloat16" and not bf16:
            logger.info(f"dtype float16 on {device} ({gpu} has no bfloat16; the checkpoint is bfloat16)")
            return torch.float16
        logger.info(f"dtype {chosen} on {device} ({gpu}; the checkpoint's {checkpoint_dtype or 'dtype unknown'})")
        return getattr(torch, chosen)
    if name == "bfloat16" and not bf16:
        raise ShardStartError(f"--dtype bfloat16: {gpu} ({device}) has no bfloat16 support; use float16")
    return getattr(torch, name)


def checkpoint_dtype(model_dir: Path) -> str | None:
    """config.json's ``dtype`` (or ``torch_dtype``), where it names one."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("dtype") or config.get("torch_dtype")
    return value if isinstance(value, str) else None


def checkpoint_is_quantized(model_dir: Path) -> bool:
    """Whether the checkpoint carries quantization settings of its own (a GPTQ checkpoint served
    without --quantize); an unreadable file counts as quantized, for loading to name it."""
    from text_generation_server.layers.quant.registry import checkpoint_quant_config

    try:
        return checkpoint_quant_config(Path(model_dir)) is not None
    except ValueError:
        return True


def configure_threads(world_size: int) -> int:
    """Split the cores between the shards of this host unless OMP_NUM_THREADS says otherwise."""
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        threads = torch.get_num_threads()
        logger.info(f"{threads} torch threads (from OMP_NUM_THREADS)")
        return threads
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    threads = max(1, cores // world_size)
    torch.set_num_threads(threads)
    logger.info(f"{threads} torch threads ({cores} cores / {world_size} shards)")
    return threads


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of this rank's parameters and buffers (a tied weight counted once)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def memory_status(status: Path = Path("/proc/self/status")) -> dict[str, int]:
    """This process's memory figures in bytes from /proc (``VmHWM`` peak RSS, ``RssAnon`` private RSS, ...).

    Empty where /proc does not exist.
    """
    try:
        text = status.read_text()
    except OSError:
        return {}
    figures = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            figures[key] = int(parts[0]) * 1024
    return figures


def make_socket_dir(directory: Path) -> None:
    """Create the socket directory with mode 0700 when it is missing (the launcher has made it otherwise)."""
    from text_generation_server.utils.sockets import make_private_dir

    if directory.exists():
        return
    if make_private_dir(directory):  # False: another rank made it first
        logger.info(f"Created socket directory {directory} (mode 0700)")


def resolve_model_dir(model: str | None, revision: str | None) -> Path:
    from text_generation_server.model_source import resolve_model

    return resolve_model(model, revision)


# ---- serve ------------------------------------------------------------------------


def _serve(args: argparse.Namespace, env: ShardEnv) -> None:
    import torch

    from text_generation_server.default_model import is_default_checkpoint
    from text_generation_server.distributed import init_distributed
    from text_generation_server.engine import Generator
    from text_generation_server.engine.stopping import eos_token_ids
    from text_generation_server.memory_check import check_model_fits
    from text_generation_server.model_source import DEFAULT_MODEL_ID
    from text_generation_server.models import load_model
    from text_generation_server.server import ModelWorker, serve

    if args.sharded and env.world_size == 1:
        logger.warning("--sharded with WORLD_SIZE=1: serving the whole model from this one shard")
    if args.trust_remote_code:
        logger.info("--trust-remote-code has no effect: supported architectures are built in")
    model_dir = resolve_model_dir(args.model, args.revision)
    logger.info(f"Loading model {model_dir} (rank {env.rank}/{env.world_size})")
    device = choose_device(env)
    prefix_caching = prefix_caching_enabled()
    speculate = speculate_tokens()
    kv_dtype = kv_cache_dtype()
    logger.info(f"Prefix caching {'on' if prefix_caching else 'off (PREFIX_CACHING)'}; speculative decoding "
                f"{f'of up to {speculate} n-gram tokens per step' if speculate else 'off'}")
    dtype = resolve_dtype(args.dtype, device, checkpoint_dtype(model_dir),
                          quantized=bool(args.quantize) or checkpoint_is_quantized(model_dir),
                          default_model=is_default_checkpoint(model_dir))
    # Before joining the group: a model that cannot fit fails every rank alike, with figures.
    check_model_fits(model_dir, dtype, env.world_size, device, quantize=args.quantize)
    threads = configure_threads(env.world_size)
    # Every parallel torch call of this shard, loading included, runs on this one thread (its
    # current CUDA device is the shard's, so kernels launch where the tensors are).
    worker = ModelWorker(device)
    worker.call(torch.set_num_threads, threads)
    dist = init_distributed(
        env.rank,
        env.world_size,
        master_addr=env.master_addr,
        master_port=env.master_port,
        device=device,
    )
    try:
        model = worker.call(
            functools.partial(load_model, model_dir, dtype=dtype, device=device, dist=dist, quantize=args.quantize)
        )
        mem = memory_status()
        # Peak RSS counts the checkpoint's mapped file pages too; private RSS is what this rank holds.
        rss = (
            f", peak RSS {mem['VmHWM'] / 2**20:.1f} MiB, private RSS {mem['RssAnon'] / 2**20:.1f} MiB"
            if "VmHWM" in mem and "RssAnon" in mem
            else ""
        )
        logger.info(
            f"Model ready: dtype {str(model.dtype).removeprefix('torch.')}, device {device}, "
            f"kernel {model.kernel}, tp plan: {model.tp_plan}; "
            f"parameters {parameter_bytes(model) / 2**20:.1f} MiB on this rank{rss}"
        )
        generator = worker.call(
            functools.partial(
                Generator,
                model,
                dist,
                model_id=args.model or DEFAULT_MODEL_ID,
                quantize=getattr(model, "quantize", args.quantize),
                eos_token_ids=eos_token_ids(model.config, model_dir),
                prefix_caching=prefix_caching,
                speculate=speculate,
                kv_dtype=kv_dtype,
            )
        )
        make_socket_dir(Path(args.uds_path).parent)
        asyncio.run(
            serve(generator, uds_path=args.uds_path, rank=env.rank, world_size=env.world_size, worker=worker)
        )
    except BaseException:
        # The other ranks may never reach a leaving barrier (they are still loading, or
        # serving): leave at once so this rank's error reaches the launcher now.
        dist.abort()
        raise
    dist.shutdown()
    logger.info("Shard stopped")


def serve_command(args: argparse.Namespace) -> int:
    setup_logging("shard", json_output=args.json_output)
    try:
        env = ShardEnv.from_environ()
        logger.configure(extra={"component": f"shard-{env.rank}"})
        _serve(args, env)
    except Exception as error:  # start-up failures end in one line, not a traceback
        return _startup_failure(error)
    _exit_now(0)
    return 0


def _exit_now(code: int) -> None:
    """Leave without the interpreter's teardown once the shard has stopped cleanly.

    Tearing down a loaded model's millions of Python objects takes 5-10 s,
    long enough for the launcher's grace period to run out and SIGKILL a
    shard that has already finished; everything worth keeping is flushed first.
    """
    logger.complete()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def _startup_failure(error: Exception) -> int:
    from text_generation_server.distributed import DistributedInitError
    from text_generation_server.engine.kv_cache import CacheFullError
    from text_generation_server.memory_check import ModelTooLargeError
    from text_generation_server.model_source import ModelNotFoundError
    from text_generation_server.models import CheckpointError, UnsupportedModelError

    known = (
        ShardStartError,
        ModelNotFoundError,
        UnsupportedModelError,
        CheckpointError,
        DistributedInitError,
        CacheFullError,
        ModelTooLargeError,
        ValueError,
        OSError,
    )
    if isinstance(error, known):
        logger.error(f"Cannot serve: {error}")
        logger.opt(exception=error).debug("start-up failure details")
    else:
        logger.opt(exception=error).error(f"Shard failed: {type(error).__name__}: {error}")
    return 1


# ---- download-weights -------------------------------------------------------------


def download_command(args: argparse.Namespace) -> int:
    setup_logging("download", json_output=args.json_output)
    from text_generation_server.model_source import download_weights

    try:
        path = download_weights(args.model, args.revision, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as error:
        logger.error(f"Cannot download {args.model or 'the default model'}: {error}")
        return 1
    print(path)
    return 0


# ---- parser -----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="text-generation-server",
        description="Shard worker of the text-generation backend, and model tools.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser(
        "serve",
        help="serve one shard of a model over the internal gRPC API",
        description="Serve one shard (RANK of WORLD_SIZE, from the environment) on "
        "unix://{uds-path}-{rank}.",
    )
    serve.add_argument(
        "model",
        nargs="?",
        metavar="MODEL",
        help="a local directory (config.json + safetensors) or a Hugging Face model id already "
        "downloaded; omitted: the built-in default model",
    )
    serve.add_argument("--revision", help="hub revision of MODEL")
    serve.add_argument(
        "--uds-path",
        default=DEFAULT_UDS_PATH,
        help=f"socket path prefix; the shard listens on PATH-RANK (default {DEFAULT_UDS_PATH})",
    )
    serve.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="compute dtype (default auto: on CUDA the checkpoint's float16/bfloat16; on CPU the checkpoint's "
             "16-bit dtype where the native kernels run, the built-in model's fastest form, float32 otherwise)",
    )
    serve.add_argument(
        "--quantize",
        help="quantization: gptq, bitsandbytes, bitsandbytes-nf4, bitsandbytes-fp4 (as this build "
        "supports); a quantized checkpoint selects its own method without it",
    )
    serve.add_argument(
        "--sharded", action="store_true", help="this shard is one of WORLD_SIZE > 1 ranks"
    )
    serve.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="accepted for TGI compatibility; changes nothing: no code from the checkpoint is ever run "
        "and serving never unpickles weights",
    )
    serve.add_argument("--json-output", action="store_true", help="log one JSON object per line")
    serve.set_defaults(func=serve_command)

    download = commands.add_parser(
        "download-weights",
        help="download a model's config, tokenizer and safetensors weights into the cache",
    )
    download.add_argument(
        "model", nargs="?", metavar="MODEL", help="Hugging Face model id (omitted: default model)"
    )
    download.add_argument("--revision", help="hub revision")
    download.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="consent to converting pickle (pytorch_model*.bin) weights to safetensors: converting means "
        "unpickling them (with torch.load(weights_only=True)), so pass it only for a checkpoint you trust; "
        "without it a model with only .bin weights is refused (hub: its .bin files are not downloaded)",
    )
    download.add_argument("--json-output", action="store_true", help="log one JSON object per line")
    download.set_defaults(func=download_command)

    for module_name in EXTRA_COMMANDS:
        _register_extra(module_name, commands)
    return parser


def _register_extra(module_name: str, commands: argparse._SubParsersAction) -> None:
    """Add a tool module's subcommands; a broken tool must not take ``serve`` down with it."""
    if importlib.util.find_spec(module_name) is None:
        return
    try:
        importlib.import_module(module_name).register(commands)
    except Exception as error:  # reported, and every other command keeps working
        logger.warning(
            f"subcommands of {module_name} are unavailable: {type(error).__name__}: {error}"
        )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        logger.info("Interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
