"""One logging setup for every process (launcher, router, shard).

Each process calls :func:`setup_logging` once at start-up. Lines go to
stderr; with ``json_output`` each line is one JSON object (loguru's
``serialize``), which is what log collectors in containers expect.
"""

from __future__ import annotations

import os
import sys

from loguru import logger

_FORMAT = (
    "<green>{time:YYYY-MM-DDTHH:mm:ss.SSSZ}</green> <level>{level: <7}</level> "
    "<cyan>{extra[component]}</cyan> {message}"
)


def setup_logging(component: str, *, json_output: bool = False, level: str | None = None) -> None:
    """Send loguru output to stderr, tagged with the process's component name.

    ``level`` defaults to the ``LOG_LEVEL`` environment variable, then INFO.
    """
    level = (level or os.environ.get("LOG_LEVEL") or "INFO").upper()
    logger.remove()
    logger.configure(extra={"component": component})
    logger.add(
        sys.stderr,
        level=level,
        format=_FORMAT,
        serialize=json_output,
        backtrace=False,
        diagnose=False,
        colorize=None if not json_output else False,
    )
