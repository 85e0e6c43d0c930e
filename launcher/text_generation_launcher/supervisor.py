"""Spawn child processes, wait for them to become ready, watch them, and stop them in order.

Knows nothing about shards or routers: children are named commands, and
readiness is any callable. Guarantees a caller may rely on:

- every child runs in its own process group (a terminal's Ctrl-C reaches only
  the launcher, which then stops children in the right order) and, on Linux,
  receives SIGTERM if the launcher dies, so nothing is orphaned; no Python code
  runs between fork and exec;
- while waiting or watching, a child that exits raises :class:`ChildExited`
  at once, and a stop request (:meth:`Supervisor.request_stop`, meant for a
  signal handler) raises :class:`StopRequested`;
- :meth:`Supervisor.stop` sends SIGTERM stage by stage, SIGKILLs what is left
  after each stage's grace period, and returns only when every child is gone.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from loguru import logger

# Run in the child instead of the real command: ask the kernel for SIGTERM when the
# launcher dies (PR_SET_PDEATHSIG survives exec), then exec the real command. Doing
# this in a tiny exec'd interpreter rather than a preexec_fn keeps Python code out of
# the forked child: the launcher holds gRPC threads (readiness probes), and running
# fork handlers in a child of a threaded gRPC process can abort it.
_DEATH_SIGNAL_SHIM = """
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)  # the launcher died before prctl: nobody would stop this child
try:
    os.execvp(sys.argv[2], sys.argv[2:])
except OSError as err:
    print(f"cannot start {sys.argv[2]}: {err.strerror}", file=sys.stderr)
    os._exit(127)
"""


def _with_death_signal(argv: list[str]) -> list[str]:
    if not sys.platform.startswith("linux"):
        return argv
    return [sys.executable, "-I", "-S", "-c", _DEATH_SIGNAL_SHIM, str(os.getpid()), *argv]


def _check_executable(name: str, program: str) -> None:
    found = shutil.which(program) if os.sep not in program else (program if os.access(program, os.X_OK) else None)
    if found is None or not os.path.isfile(found):
        raise ChildStartError(f"cannot start {name} ({program}): no such executable")


class ChildExited(RuntimeError):
    """A child process ended while it was expected to run."""

    def __init__(self, child: Child, returncode: int, also: Sequence[tuple[Child, int]] = ()) -> None:
        message = f"{child.name} exited with {describe_returncode(returncode)}"
        if also:
            # Found gone at the same poll: any of them may be the cause (a killed shard takes its peer down).
            message += " (also exited: " + ", ".join(
                f"{other.name} with {describe_returncode(code)}" for other, code in also
            ) + ")"
        super().__init__(message)
        self.child = child
        self.returncode = returncode
        self.also = list(also)


class StopRequested(Exception):
    """The launcher was asked to stop (SIGTERM/SIGINT) while waiting."""


class StartupTimeout(RuntimeError):
    """A child did not become ready in time."""


def describe_returncode(returncode: int) -> str:
    """``exit code 3`` or ``signal SIGKILL`` for a Popen returncode."""
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


@dataclass
class Child:
    """One spawned process."""

    name: str
    argv: list[str]
    process: subprocess.Popen
    started_at: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll(self) -> int | None:
        return self.process.poll()

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the child's process group while the child is alive (never to a reused pid)."""
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            self.process.send_signal(sig)


class Supervisor:
    """The set of children of one launch."""

    def __init__(self, poll_interval: float = 0.1) -> None:
        self.poll_interval = poll_interval
        self.children: list[Child] = []
        self._stop_requests = 0

    # ---- stop requests (signal-handler safe: only counts) ------------------------------------

    def request_stop(self) -> None:
        """Ask the current wait to end with StopRequested; a second request also hurries a stop in progress."""
        self._stop_requests += 1

    @property
    def stop_requested(self) -> bool:
        return self._stop_requests > 0

    # ---- spawning ------------------------------------------------------------------------------

    def spawn(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> Child:
        """Start ``argv`` as a supervised child; its stdout/stderr are the launcher's."""
        logger.debug(f"Spawning {name}: {' '.join(argv)}")
        _check_executable(name, argv[0])
        try:
            process = subprocess.Popen(
                _with_death_signal(list(argv)),
                env=dict(env) if env is not None else None,
                stdin=subprocess.DEVNULL,
                process_group=0,
            )
        except OSError as err:
            raise ChildStartError(f"cannot start {name} ({argv[0]}): {err.strerror or err}") from None
        child = Child(name=name, argv=list(argv), process=process)
        self.children.append(child)
        return child

    # ---- waiting -------------------------------------------------------------------------------

    def check(self) -> None:
        """Raise StopRequested or ChildExited if either happened."""
        if self.stop_requested:
            raise StopRequested()
        exited = [(child, code) for child in self.children if (code := child.poll()) is not None]
        if exited:
            # A death by signal (killed, crashed) is the likelier cause than a peer's clean error exit.
            exited.sort(key=lambda item: item[1] >= 0)
            (child, code), *also = exited
            raise ChildExited(child, code, also)

    def wait_ready(
        self,
        child: Child,
        ready: Callable[[], bool],
        *,
        timeout: float | None = None,
        probe_interval: float = 0.5,
        progress_interval: float = 30.0,
    ) -> float:
        """Poll ``ready()`` until it is true; returns seconds since ``child`` started.

        Every child is watched meanwhile: ChildExited if any exits,
        StopRequested on a stop request, StartupTimeout after ``timeout``.
        """
        started = time.monotonic()
        next_probe = started
        next_progress = started + progress_interval
        while True:
            self.check()
            now = time.monotonic()
            if now >= next_probe:
                if ready():
                    return time.monotonic() - child.started_at
                self.check()
                next_probe = time.monotonic() + probe_interval
            if timeout is not None and now - started > timeout:
                raise StartupTimeout(f"{child.name} was not ready after {timeout:.0f} s")
            if now >= next_progress:
                logger.info(f"Still waiting for {child.name} ({now - child.started_at:.0f} s)")
                next_progress = now + progress_interval
            time.sleep(self.poll_interval)

    def watch(self) -> None:
        """Block until a child exits (ChildExited) or a stop is requested (StopRequested)."""
        while True:
            self.check()
            time.sleep(self.poll_interval)

    # ---- stopping ------------------------------------------------------------------------------

    def stop(self, stages: Sequence[tuple[Sequence[Child], float]]) -> bool:
        """Stop children stage by stage: SIGTERM, wait up to the stage's grace seconds, SIGKILL the rest.

        Children of later stages keep running until earlier stages are gone
        (the router drains while the shards still answer). A stop request
        arriving meanwhile re-sends SIGTERM to the current stage (a router
        cancels in-flight work on its second signal). Children not named in
        any stage are stopped in a last stage. Returns True when every child
        exited on SIGTERM, False when some needed SIGKILL.
        """
        named = {id(c) for stage, _ in stages for c in stage}
        rest = [c for c in self.children if id(c) not in named]
        all_stages = list(stages) + ([(rest, max((g for _, g in stages), default=10.0))] if rest else [])
        clean = True
        for stage, grace in all_stages:
            alive = [c for c in stage if c.poll() is None]
            if not alive:
                continue
            requests_seen = self._stop_requests
            for child in alive:
                child.signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(c.poll() is None for c in alive):
                if self._stop_requests > requests_seen:
                    requests_seen = self._stop_requests
                    logger.info(f"Stop requested again: signalling {', '.join(c.name for c in alive)} once more")
                    for child in alive:
                        child.signal(signal.SIGTERM)
                time.sleep(self.poll_interval)
            for child in alive:
                if child.poll() is None:
                    clean = False
                    logger.warning(f"{child.name} did not exit within {grace:g} s of SIGTERM; killing it")
                    child.signal(signal.SIGKILL)
            for child in alive:
                try:
                    child.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    logger.error(f"{child.name} (pid {child.pid}) did not die after SIGKILL")
                    clean = False
                    continue
                logger.info(f"{child.name} stopped ({describe_returncode(child.process.returncode)})")
        return clean


class ChildStartError(RuntimeError):
    """A child's executable could not be started at all."""
