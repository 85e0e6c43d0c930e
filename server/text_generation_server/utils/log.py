"""One logging setup for every process (launcher, router, shard).

Each process calls :func:`setup_logging` once at start-up. Lines go to
stderr; with ``json_output`` each line is one JSON object (loguru's
``serialize``), which is what log collectors in containers expect. Records
of the standard ``logging`` module (huggingface_hub, grpc, ...) and
``warnings`` go through loguru too, so they share the format.

With ``json_output`` nothing else may reach stderr as plain text: progress
bars are switched off (tqdm, huggingface_hub and transformers read the
environment, which child processes inherit), and whatever a library still
writes to ``sys.stderr`` itself (transformers' own handler, a stray print) is
logged as one WARNING record per line.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import threading
from typing import TextIO

from loguru import logger

_FORMAT = (
    "<green>{time:YYYY-MM-DDTHH:mm:ss.SSSZ}</green> <level>{level: <7}</level> "
    "<cyan>{extra[component]}</cyan> {message}"
)

# Read by tqdm (>= 4.66: TQDM_<PARAM>), huggingface_hub and transformers.
_NO_PROGRESS_BARS = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def _peer_gone(record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    return (
        record.name.startswith("grpc")
        and type(error).__name__ == "ExecuteBatchError"
        and "raised in core by servicer method" in record.getMessage()
    )


class _ToLoguru(logging.Handler):
    """Hands standard-library log records to loguru, keeping level and origin."""

    def emit(self, record: logging.LogRecord) -> None:
        if _peer_gone(record):
            # gRPC could not send the status of a call whose client had already gone (or stopped
            # reading and was cut off): expected, and already handled by the call's own code.
            logger.debug(f"gRPC: {record.getMessage()} (the client had gone)")
            return
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.patch(
            lambda r: r.update(name=record.name, function=record.funcName, line=record.lineno)
        ).opt(exception=record.exc_info).log(level, record.getMessage())


class _StderrAsRecords(io.TextIOBase):
    """Stands in for ``sys.stderr``: each complete line becomes a WARNING record.

    A carriage return starts the line over, so a progress bar that slipped
    through leaves only its last frame.
    """

    def __init__(self, real: TextIO) -> None:
        self.real = real
        self._buffer = ""
        self._busy = threading.local()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if getattr(self._busy, "on", False):
            # loguru reporting its own sink failure: pass through rather than recurse.
            return self.real.write(text)
        self._buffer += text
        *lines, self._buffer = self._buffer.split("\n")
        for line in lines:
            self._emit(line)
        return len(text)

    def flush(self) -> None:
        self.real.flush()

    def fileno(self) -> int:
        return self.real.fileno()

    def isatty(self) -> bool:
        return False

    def _emit(self, line: str) -> None:
        line = line.rsplit("\r", 1)[-1].rstrip()
        if not line:
            return
        self._busy.on = True
        try:
            logger.opt(depth=2).warning(line)
        finally:
            self._busy.on = False


def setup_logging(component: str, *, json_output: bool = False, level: str | None = None) -> None:
    """Send loguru output to stderr, tagged with the process's component name.

    ``level`` defaults to the ``LOG_LEVEL`` environment variable, then INFO.
    """
    level = (level or os.environ.get("LOG_LEVEL") or "INFO").upper()
    stream = sys.stderr.real if isinstance(sys.stderr, _StderrAsRecords) else sys.stderr
    logger.remove()
    logger.configure(extra={"component": component})
    logger.add(
        stream,
        level=level,
        format=_FORMAT,
        serialize=json_output,
        backtrace=False,
        diagnose=False,
        colorize=None if not json_output else False,
    )
    logging.basicConfig(handlers=[_ToLoguru()], level=logging.WARNING, force=True)
    logging.captureWarnings(True)
    if json_output:
        os.environ.update(_NO_PROGRESS_BARS)
        sys.stderr = _StderrAsRecords(stream)
    else:
        sys.stderr = stream
