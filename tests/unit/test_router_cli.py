"""The `text-generation-router` process: exit codes, start-up errors, SIGTERM drain, dead shards.

The router runs as a real subprocess; the fake shards run in this process on
a background event loop.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from fake_shard import FakeModel, FakeShardGroup, LoopThread, free_port, make_tokenizer_dir
from grpc_health.v1 import health_pb2, health_pb2_grpc
from text_generation_server.pb.fmaas import generation_pb2 as pb
from text_generation_server.pb.fmaas import generation_pb2_grpc

ROUTER = Path(sys.executable).parent / "text-generation-router"

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return make_tokenizer_dir(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture
def shards(tmp_path):
    """Factory: fake shards on a background loop, stopped at the end."""
    loop = LoopThread()
    groups: list[FakeShardGroup] = []

    def _start(model: FakeModel | None = None) -> FakeShardGroup:
        group = FakeShardGroup(str(tmp_path / "shard"), model or FakeModel())
        loop.run(group.start())
        groups.append(group)
        return group

    _start.loop = loop
    yield _start
    for group in groups:
        loop.run(group.stop())
    loop.close()


class RouterProcess:
    def __init__(self, args: list[str], log: Path) -> None:
        self.grpc_port = free_port()
        self.http_port = free_port()
        self.log = log
        self._log_file = open(log, "wb")
        self.proc = subprocess.Popen(
            [str(ROUTER), "--grpc-port", str(self.grpc_port), "--port", str(self.http_port), "--hostname", "127.0.0.1", *args],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def health(self) -> int | None:
        try:
            with grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                return stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
        except grpc.RpcError:
            return None

    def wait_serving(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.text()
            if self.health() == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.1)
        raise AssertionError(f"router not SERVING:\n{self.text()}")

    def wait(self, timeout: float = 30) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log_file.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log_file.close()


@pytest.fixture
def router(tmp_path):
    started: list[RouterProcess] = []

    def _run(args: list[str]) -> RouterProcess:
        proc = RouterProcess(args, tmp_path / f"router{len(started)}.log")
        started.append(proc)
        return proc

    yield _run
    for proc in started:
        proc.kill()


def test_contradictory_limits_exit_2_with_one_clear_line():
    out = subprocess.run([str(ROUTER), "--max-input-tokens", "10", "--max-total-tokens", "5"], capture_output=True, timeout=60)
    assert out.returncode == 2
    err = out.stderr.decode()
    assert "--max-input-tokens (10) must be < --max-total-tokens (5)" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_help_lists_the_flags_with_their_environment_variables():
    out = subprocess.run([str(ROUTER), "--help"], capture_output=True, timeout=60)
    assert out.returncode == 0
    text = out.stdout.decode()
    for flag in ("--grpc-port", "GRPC_PORT", "--max-batch-total-tokens", "--waiting-served-ratio", "--graceful-shutdown-timeout"):
        assert flag in text


def test_missing_shard_socket_exits_1_naming_the_socket(router, tokenizer_dir, tmp_path):
    proc = router(["--tokenizer", str(tokenizer_dir), "--shard-uds-path", str(tmp_path / "none"), "--shard-connect-timeout", "0.5"])
    assert proc.wait() == 1
    assert f"no shard socket at {tmp_path / 'none'}-0" in proc.text()
    assert "Traceback" not in proc.text()


def test_limits_the_model_cannot_hold_exit_2(router, shards, tokenizer_dir):
    group = shards(FakeModel(max_position_embeddings=256))
    proc = router(["--tokenizer", str(tokenizer_dir), "--shard-uds-path", group.uds_path, "--max-total-tokens", "1000"])
    assert proc.wait() == 2
    assert "--max-total-tokens (1000) exceeds the model's max_position_embeddings (256)" in proc.text()
    assert "Traceback" not in proc.text()


def test_grpc_port_in_use_exits_1(router, shards, tokenizer_dir):
    import socket

    group = shards()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = router(["--tokenizer", str(tokenizer_dir), "--shard-uds-path", group.uds_path, "--grpc-port", str(port)])
        assert proc.wait() == 1
    assert "cannot listen for gRPC" in proc.text() and str(port) in proc.text()


def test_sigterm_drains_in_flight_streams_refuses_new_requests_and_exits_0(router, shards, tokenizer_dir):
    group = shards(FakeModel(step_delay=0.02))
    proc = router(["--tokenizer", str(tokenizer_dir), "--shard-uds-path", group.uds_path])
    proc.wait_serving()
    assert f"Serving fmaas.GenerationService on 127.0.0.1:{proc.grpc_port}" in proc.text()
    channel = grpc.insecure_channel(f"127.0.0.1:{proc.grpc_port}")
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    request = pb.SingleGenerationRequest(
        request=pb.GenerationRequest(text="Hello"), params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=60))
    )
    messages: list = []
    stream = stub.GenerateStream(request, timeout=60)
    messages.append(next(stream))
    messages.append(next(stream))
    reader = threading.Thread(target=lambda: messages.extend(stream))
    reader.start()
    proc.proc.send_signal(signal.SIGTERM)
    refused = None
    deadline = time.monotonic() + 10
    while refused is None and time.monotonic() < deadline:
        try:
            stub.Generate(pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text="late")]), timeout=5)
        except grpc.RpcError as err:
            refused = err
        time.sleep(0.02)
    reader.join(30)
    assert refused is not None and refused.code() == grpc.StatusCode.UNAVAILABLE
    assert messages[-1].stop_reason == pb.MAX_TOKENS and messages[-1].generated_token_count == 60
    assert proc.wait() == 0, proc.text()
    assert "Draining" in proc.text()
    channel.close()


def test_sigterm_grace_period_cancels_what_is_left(router, shards, tokenizer_dir):
    group = shards(FakeModel(step_delay=0.02))
    proc = router(["--tokenizer", str(tokenizer_dir), "--shard-uds-path", group.uds_path, "--graceful-shutdown-timeout", "0.5"])
    proc.wait_serving()
    with grpc.insecure_channel(f"127.0.0.1:{proc.grpc_port}") as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        request = pb.SingleGenerationRequest(
            request=pb.GenerationRequest(text="Hello"), params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=1000))
        )
        stream = stub.GenerateStream(request, timeout=60)
        next(stream)
        start = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        rest = list(stream)
    assert rest[-1].stop_reason == pb.CANCELLED
    assert proc.wait() == 0
    assert time.monotonic() - start < 10


def test_a_dead_shard_makes_the_router_exit_1(router, shards, tokenizer_dir):
    group = shards()
    proc = router(["--tokenizer", str(tokenizer_dir), "--shard-uds-path", group.uds_path])
    proc.wait_serving()
    shards.loop.run(group.kill(0))
    assert proc.wait(30) == 1
    assert "unreachable" in proc.text()


def test_a_second_sigterm_cancels_in_flight_requests_at_once(router, shards, tokenizer_dir):
    group = shards(FakeModel(step_delay=0.02))
    proc = router(["--tokenizer", str(tokenizer_dir), "--shard-uds-path", group.uds_path, "--graceful-shutdown-timeout", "60"])
    proc.wait_serving()
    with grpc.insecure_channel(f"127.0.0.1:{proc.grpc_port}") as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        request = pb.SingleGenerationRequest(
            request=pb.GenerationRequest(text="Hello"), params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=1000))
        )
        stream = stub.GenerateStream(request, timeout=60)
        next(stream)
        start = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        next(stream)
        time.sleep(0.3)
        proc.proc.send_signal(signal.SIGTERM)
        rest = list(stream)
    assert rest[-1].stop_reason == pb.CANCELLED
    assert proc.wait() == 0
    assert time.monotonic() - start < 15
