"""`text-generation-launcher`: resolve the model, then start and supervise the shards and the router.

Exit codes: 0 after a requested stop (SIGTERM/SIGINT), 1 when the model
cannot be found or a process fails, 2 for a flag problem (before anything
starts).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from loguru import logger
from text_generation_server.utils.log import setup_logging

from .args import ArgsError, LauncherArgs, parse_args, tgis_environment_notes
from .launch import Commands, serve
from .supervisor import Supervisor


def resolve(args: LauncherArgs) -> Path | None:
    """The local checkpoint to serve, or None after logging why there is none."""
    from text_generation_server.model_source import ModelNotFoundError, resolve_or_download

    logger.info(f"Resolving model {args.served_model_name}{f' at revision {args.revision}' if args.revision else ''}")
    try:
        # A hub id that is not cached is downloaded here, before any shard starts, as TGI's launcher
        # does: config, tokenizer and safetensors only (serving never unpickles .bin weights).
        path = resolve_or_download(args.model_id, args.revision)
    except ModelNotFoundError as err:
        logger.error(f"Model not found: {err}")
        return None
    logger.info(f"Model {args.served_model_name}: {path}")
    return path


def run(argv: Sequence[str] | None = None, commands: Commands | None = None) -> int:
    """The whole launcher; returns its exit code. ``commands`` replaces the programs started (tests)."""
    try:
        args = parse_args(argv)
    except ArgsError as err:
        print(f"text-generation-launcher: error: {err}", file=sys.stderr)
        return 2
    setup_logging("launcher", json_output=args.json_output)
    if args.otlp_endpoint is not None or args.otlp_service_name is not None:
        logger.warning("--otlp-endpoint/--otlp-service-name ignored: trace export is not implemented")
    if args.validation_workers is not None:
        logger.info(f"--validation-workers {args.validation_workers}: the router tokenizes on two threads of its own")
    for note in tgis_environment_notes(os.environ):
        logger.info(note)
    if args.huggingface_hub_cache is not None:
        # Read by model resolution here and inherited by every child.
        os.environ["HUGGINGFACE_HUB_CACHE"] = os.environ["HF_HUB_CACHE"] = args.huggingface_hub_cache

    try:
        model_path = resolve(args)
    except KeyboardInterrupt:
        logger.info("Interrupted while resolving the model")
        return 130
    if model_path is None:
        return 1

    supervisor = Supervisor()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        # Only counts: the supervision loop notices within one poll interval and logs there.
        signal.signal(sig, lambda signum, frame: supervisor.request_stop())
    try:
        return serve(args, model_path, supervisor, commands)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main() -> None:
    """Console entry point."""
    sys.exit(run())


if __name__ == "__main__":
    main()
