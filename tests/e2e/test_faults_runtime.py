"""Faults while serving, through the real launcher, router and shards (tiny model).

- a shard killed with SIGKILL mid-generation: in-flight streams end UNAVAILABLE,
  the launcher stops the rest and exits non-zero within 30 s, leaving no
  process, socket or shared-memory segment;
- the router killed the same way: the same clean, non-zero end;
- SIGTERM to the launcher during 8 streams: health turns NOT_SERVING at once,
  new requests get UNAVAILABLE, the running streams finish, exit code 0.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from .conftest import ServerProcess, processes_mentioning

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

EXIT_WITHIN = 30.0


def shm_entries() -> set[str]:
    shm = Path("/dev/shm")
    return {p.name for p in shm.iterdir()} if shm.is_dir() else set()


def roles(server: ServerProcess) -> dict[str, int]:
    """``router`` / ``shard-R`` -> pid, for the children of this launch."""
    found = {}
    for pid in processes_mentioning(server.uds_path):
        if pid == server.proc.pid:
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"text-generation-router" in cmdline:
            found["router"] = pid
        elif b"\0serve\0" in cmdline:
            rank = next((e[5:].decode() for e in environ if e.startswith(b"RANK=")), "0")
            found[f"shard-{rank}"] = pid
    return found


@dataclass
class Stream:
    """One GenerateStream call run on its own thread."""

    text: str
    new_tokens: int
    messages: list = field(default_factory=list)
    code: grpc.StatusCode | None = None  # None while running, OK when the stream completed
    details: str = ""

    def start(self, address: str) -> threading.Thread:
        thread = threading.Thread(target=self._run, args=(address,), daemon=True)
        thread.start()
        return thread

    def _run(self, address: str) -> None:
        from text_generation_server.pb.fmaas import generation_pb2 as pb
        from text_generation_server.pb.fmaas import generation_pb2_grpc

        request = pb.SingleGenerationRequest(
            request=pb.GenerationRequest(text=self.text),
            params=pb.Parameters(
                stopping=pb.StoppingCriteria(max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens)
            ),
        )
        with grpc.insecure_channel(address) as channel:
            try:
                for message in generation_pb2_grpc.GenerationServiceStub(channel).GenerateStream(request, timeout=300):
                    self.messages.append(message)
                self.code = grpc.StatusCode.OK
            except grpc.RpcError as err:
                self.details = err.details() or ""
                self.code = err.code()

    @property
    def tokens(self) -> int:
        return self.messages[-1].generated_token_count if self.messages else 0


def start_streams(server: ServerProcess, count: int, new_tokens: int, wait_for_tokens: int) -> tuple[list[Stream], list[threading.Thread]]:
    streams = [Stream(f"Stream {i} tells a story about", new_tokens) for i in range(count)]
    threads = [s.start(server.address) for s in streams]
    deadline = time.monotonic() + 120
    while any(s.tokens < wait_for_tokens for s in streams):
        assert time.monotonic() < deadline, [(s.tokens, s.code, s.details) for s in streams]
        assert all(s.code is None for s in streams), [(s.code, s.details) for s in streams]
        time.sleep(0.02)
    return streams, threads


def assert_nothing_left(server: ServerProcess, shm_before: set[str]) -> None:
    time.sleep(0.5)
    assert processes_mentioning(server.uds_path) == [], server.log_tail()
    sockets = list(Path(server.uds_path).parent.glob(Path(server.uds_path).name + "-*"))
    assert sockets == [], sockets
    assert shm_entries() - shm_before == set()


@pytest.mark.parametrize("victim", ["shard-0", "shard-1", "router"])
def test_a_killed_process_mid_generation_ends_streams_unavailable_and_the_launch_non_zero(
    tiny_llama_tied, tmp_path, victim, record_property
):
    shm_before = shm_entries()
    server = ServerProcess(
        tmp_path, ["--model-id", str(tiny_llama_tied), "--sharded", "true", "--num-shard", "2"]
    ).start()
    try:
        children = roles(server)
        assert set(children) == {"router", "shard-0", "shard-1"}, children
        streams, threads = start_streams(server, 4, new_tokens=200, wait_for_tokens=3)
        os.kill(children[victim], signal.SIGKILL)
        killed_at = time.monotonic()
        for thread in threads:
            thread.join(timeout=60)
        codes = [(s.code, s.details, s.tokens) for s in streams]
        assert all(s.code == grpc.StatusCode.UNAVAILABLE for s in streams), codes
        assert all(0 < s.tokens < 200 for s in streams), codes
        code = server.proc.wait(timeout=EXIT_WITHIN + 30)
        took = time.monotonic() - killed_at
    finally:
        server.stop()
    log = server.log_path.read_text(errors="replace")
    assert code != 0, log[-3000:]
    assert took <= EXIT_WITHIN, (took, log[-3000:])
    name = victim.replace("-", " ")
    errors = [line for line in log.splitlines() if "stopping everything" in line]
    assert len(errors) == 1 and f"{name} exited with signal SIGKILL" in errors[0], log[-3000:]
    assert_nothing_left(server, shm_before)
    record_property(
        f"figures: kill -9 {victim} mid-generation",
        f"4 streams ended {sorted({c.name for c, _, _ in codes})} after {[t for _, _, t in codes]} tokens; "
        f"launcher exit {code} {took:.1f} s after the kill; no process, socket or /dev/shm entry left",
    )


@pytest.mark.parametrize("when", ["idle", "mid-generation"])
def test_a_stopped_shard_is_found_stuck_and_stops_the_launch_as_a_dead_one(tiny_llama_tied, tmp_path, when, record_property):
    """kill -STOP keeps a shard's sockets open and its process alive: only an unanswered call shows it.
    Health probes (while idle) and steps (mid-generation) are bounded by --shard-step-timeout."""
    step_timeout = 4.0
    shm_before = shm_entries()
    server = ServerProcess(
        tmp_path, ["--model-id", str(tiny_llama_tied), "--sharded", "true", "--num-shard", "2",
                   "--shard-step-timeout", str(step_timeout)]
    ).start()
    children = roles(server)
    try:
        streams, threads = start_streams(server, 2, new_tokens=200, wait_for_tokens=3) if when != "idle" else ([], [])
        os.kill(children["shard-1"], signal.SIGSTOP)
        stopped_at = time.monotonic()
        for thread in threads:
            thread.join(timeout=60)
        codes = [(s.code, s.details, s.tokens) for s in streams]
        code = server.proc.wait(timeout=step_timeout + 10 + EXIT_WITHIN + 30)
        took = time.monotonic() - stopped_at
    finally:
        try:
            os.kill(children["shard-1"], signal.SIGCONT)
        except ProcessLookupError:
            pass
        server.stop()
    log = server.log_path.read_text(errors="replace")
    assert all(c == grpc.StatusCode.UNAVAILABLE and "--shard-step-timeout" in d for c, d, _ in codes), codes
    assert all(0 < t < 200 for _, _, t in codes), codes
    assert code != 0, log[-3000:]
    # At most one probe interval (10 s, or the timeout when shorter) plus the timeout, plus the stop.
    assert took <= min(10.0, step_timeout) + step_timeout + EXIT_WITHIN, (took, log[-3000:])
    assert "the shard is stuck" in log and "router exited" in log, log[-3000:]
    assert_nothing_left(server, shm_before)
    record_property(
        f"figures: kill -STOP shard 1 ({when})",
        f"streams {[(c.name, t) for c, _, t in codes]}; launcher exit {code} {took:.1f} s after the stop "
        f"(--shard-step-timeout {step_timeout:g}); no process, socket or /dev/shm entry left",
    )


def test_sigterm_drains_eight_streams_refuses_new_work_and_exits_zero(tiny_llama, tmp_path, record_property):
    from text_generation_server.pb.fmaas import generation_pb2 as pb
    from text_generation_server.pb.fmaas import generation_pb2_grpc

    shm_before = shm_entries()
    server = ServerProcess(tmp_path, ["--model-id", str(tiny_llama), "--graceful-shutdown-timeout", "120"]).start()
    streams, threads = start_streams(server, 8, new_tokens=120, wait_for_tokens=2)
    server.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()

    # Health turns NOT_SERVING at once (within the launcher's poll plus the router's signal handling).
    status = None
    while time.monotonic() - signalled < 5:
        status = server.health()
        if status == health_pb2.HealthCheckResponse.NOT_SERVING:
            break
        time.sleep(0.05)
    not_serving_after = time.monotonic() - signalled
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING, status
    assert all(s.code is None for s in streams), "streams must still be running while draining"

    with grpc.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            generation_pb2_grpc.GenerationServiceStub(channel).Generate(
                pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text="too late")]), timeout=30
            )
    # Refused by the draining router itself (not a connection failure), saying why.
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
    assert "shutting down" in (refused.value.details() or ""), refused.value.details()

    for thread in threads:
        thread.join(timeout=120)
    results = [(s.code, s.details, s.tokens) for s in streams]
    assert all(s.code == grpc.StatusCode.OK for s in streams), results
    assert all(s.tokens == 120 and s.messages[-1].stop_reason == pb.MAX_TOKENS for s in streams), results
    assert server.proc.wait(timeout=60) == 0, server.log_tail()
    server.stop()
    assert not_serving_after < 2.0, not_serving_after
    assert_nothing_left(server, shm_before)
    record_property(
        "figures: SIGTERM during 8 streams",
        f"NOT_SERVING after {not_serving_after:.2f} s; a new request refused UNAVAILABLE; "
        f"8 streams finished OK with {[s.tokens for s in streams]} tokens; exit 0",
    )
