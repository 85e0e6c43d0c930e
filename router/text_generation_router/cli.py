"""`text-generation-router`: serve the public API in front of running shards.

Exit codes: 0 after a drain (SIGTERM/SIGINT; a second signal cancels what is
still running instead of waiting out the grace period), 2 for a flag problem
(including limits that do not fit the model), 1 when the shards cannot be
reached, fail, or a port cannot be opened.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Sequence

from loguru import logger
from text_generation_server.utils.log import setup_logging

from .config import ConfigError, RouterArgs, parse_args
from .server import BindError, Router
from .shard_client import ShardConnectError, ShardError
from .tokenization import TokenizerLoadError


async def serve(args: RouterArgs) -> int:
    """Run the router until a signal (drain, 0) or a shard failure (1); start-up errors return 1 or 2."""
    router = Router(args)
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)

    start = asyncio.ensure_future(router.start())
    stop_wait = asyncio.ensure_future(stop_requested.wait())
    try:
        await asyncio.wait([start, stop_wait], return_when=asyncio.FIRST_COMPLETED)
        if not start.done():
            logger.info("Stop requested during start-up")
            start.cancel()
            await asyncio.gather(start, return_exceptions=True)
            await router.stop()
            return 0
        try:
            start.result()
        except ConfigError as err:
            logger.error(f"Invalid configuration: {err}")
            await router.stop()
            return 2
        except (TokenizerLoadError, ShardConnectError, ShardError, BindError) as err:
            logger.error(f"Cannot start: {err}")
            await router.stop()
            return 1

        fatal_wait = asyncio.ensure_future(router.fatal.wait())
        await asyncio.wait([stop_wait, fatal_wait], return_when=asyncio.FIRST_COMPLETED)
        fatal_wait.cancel()
        if router.fatal.is_set():
            logger.error(f"Stopping: {router.fatal_message}")
            await router.stop()
            return 1
        logger.info("Received stop signal (a second one cancels in-flight requests at once)")
        stop_requested.clear()
        hurry = asyncio.ensure_future(_hurry_on_second_signal(stop_requested, router))
        await router.drain(args.graceful_shutdown_timeout)
        hurry.cancel()
        logger.info("Router stopped")
        return 0
    finally:
        stop_wait.cancel()


async def _hurry_on_second_signal(stop_requested: asyncio.Event, router: Router) -> None:
    await stop_requested.wait()
    logger.warning("Second stop signal: cancelling in-flight requests now")
    router.hurry()


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point."""
    try:
        args = parse_args(argv)
    except ConfigError as err:
        print(f"text-generation-router: error: {err}", file=sys.stderr)
        sys.exit(2)
    setup_logging("router", json_output=args.json_output)
    sys.exit(asyncio.run(serve(args)))


if __name__ == "__main__":
    main()
