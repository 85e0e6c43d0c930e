"""Start the real launcher (which starts the shards and the router) for e2e tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = Path(sys.executable).parent / "text-generation-launcher"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_mentioning(needle: str) -> list[int]:
    """Pids whose command line contains needle (used to prove nothing was left behind)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            status = (entry / "status").read_text()
        except OSError:
            continue
        if needle in cmdline and "State:\tZ" not in status:
            pids.append(int(entry.name))
    return pids


@dataclass
class Greedy:
    """What one batched greedy Generate answered, per prompt."""

    tokens: list[list[str]]  # the generated token strings
    logprobs: list[list[float]]  # logprob of each generated token
    top: list[list[list[tuple[str, float]]]]  # per step, the top-N (text, logprob)


class ServerProcess:
    """One `text-generation-launcher` process and the ports/sockets it was given."""

    def __init__(self, tmp: Path, args: list[str], env: dict[str, str] | None = None):
        self.grpc_port = free_port()
        self.http_port = free_port()
        # A directory the launcher creates (mode 0700) whatever the mode of ``tmp``.
        self.uds_path = str(tmp / "sockets" / "shard")
        self.log_path = tmp / "launcher.log"
        self.args = [
            str(LAUNCHER),
            *args,
            "--grpc-port",
            str(self.grpc_port),
            "--port",
            str(self.http_port),
            "--shard-uds-path",
            self.uds_path,
            "--master-port",
            str(free_port()),
        ]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, timeout: float = 600.0) -> ServerProcess:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"launcher exited with {self.proc.returncode}:\n{self.log_tail()}")
            # Served, and the launcher has seen it too (its own probe may lag the test's by a poll).
            if self.health() == health_pb2.HealthCheckResponse.SERVING and self._launcher_ready():
                return self
            time.sleep(0.5)
        self.stop()
        raise AssertionError(f"server not SERVING after {timeout} s:\n{self.log_tail()}")

    def _launcher_ready(self) -> bool:
        try:
            return b"Ready: fmaas.GenerationService" in self.log_path.read_bytes()
        except OSError:
            return False

    def health(self, service: str = "") -> int | None:
        try:
            with grpc.insecure_channel(self.address) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
        except grpc.RpcError:
            return None

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"launcher ignored signal {sig} for {timeout} s:\n{self.log_tail()}") from None
        self._log.close()
        return self.proc.returncode

    def greedy(self, prompts: list[str], new_tokens: int, top_n: int, timeout: float = 900) -> Greedy:
        """Exactly ``new_tokens`` greedy tokens for each prompt in one batched Generate, with top-N logprobs."""
        from text_generation_server.pb.fmaas import generation_pb2 as pb
        from text_generation_server.pb.fmaas import generation_pb2_grpc

        request = pb.BatchedGenerationRequest(
            model_id="any",
            requests=[pb.GenerationRequest(text=p) for p in prompts],
            params=pb.Parameters(
                method=pb.GREEDY,
                stopping=pb.StoppingCriteria(max_new_tokens=new_tokens, min_new_tokens=new_tokens),
                response=pb.ResponseOptions(generated_tokens=True, token_logprobs=True, top_n_tokens=top_n),
            ),
        )
        with grpc.insecure_channel(self.address) as channel:
            reply = generation_pb2_grpc.GenerationServiceStub(channel).Generate(request, timeout=timeout)
        return Greedy(
            tokens=[[t.text for t in r.tokens] for r in reply.responses],
            logprobs=[[t.logprob for t in r.tokens] for r in reply.responses],
            top=[[[(x.text, x.logprob) for x in t.top_tokens] for t in r.tokens] for r in reply.responses],
        )

    def sample(self, prompts: list[str], new_tokens: int, seed: int, timeout: float = 900) -> Greedy:
        """``new_tokens`` sampled tokens per prompt (temperature 0.8, top-k 50, top-p 0.9, ``seed``)
        in one batched Generate, with each token's logprob and the top-2 alternatives."""
        from text_generation_server.pb.fmaas import generation_pb2 as pb
        from text_generation_server.pb.fmaas import generation_pb2_grpc

        request = pb.BatchedGenerationRequest(
            model_id="any",
            requests=[pb.GenerationRequest(text=p) for p in prompts],
            params=pb.Parameters(
                method=pb.SAMPLE,
                sampling=pb.SamplingParameters(temperature=0.8, top_k=50, top_p=0.9, seed=seed),
                stopping=pb.StoppingCriteria(max_new_tokens=new_tokens, min_new_tokens=new_tokens),
                response=pb.ResponseOptions(generated_tokens=True, token_logprobs=True, top_n_tokens=2),
            ),
        )
        with grpc.insecure_channel(self.address) as channel:
            reply = generation_pb2_grpc.GenerationServiceStub(channel).Generate(request, timeout=timeout)
        return Greedy(
            tokens=[[t.text for t in r.tokens] for r in reply.responses],
            logprobs=[[t.logprob for t in r.tokens] for r in reply.responses],
            top=[[[(x.text, x.logprob) for x in t.top_tokens] for t in r.tokens] for r in reply.responses],
        )

    def tgis(self, calls: list[dict]) -> list[dict]:
        """Run calls through a client generated from the published TGIS proto (a subprocess)."""
        out = subprocess.run(
            [sys.executable, str(Path(__file__).parent / "tgis_client.py"), self.address],
            input=json.dumps(calls).encode(),
            capture_output=True,
            timeout=600,
        )
        if out.returncode != 0:
            raise AssertionError(f"TGIS client failed:\n{out.stderr.decode()}")
        return json.loads(out.stdout)


@pytest.fixture
def launch(tmp_path) -> Iterator:
    """Start a launcher with the given args; everything started is stopped at the end of the test."""
    started: list[ServerProcess] = []

    def _launch(args: list[str], env: dict[str, str] | None = None, timeout: float = 600.0) -> ServerProcess:
        server = ServerProcess(tmp_path / f"s{len(started)}", args, env)
        (tmp_path / f"s{len(started)}").mkdir()
        started.append(server)
        return server.start(timeout)

    yield _launch
    for server in started:
        if server.proc is not None and server.proc.poll() is None:
            server.stop()


def pytest_terminal_summary(terminalreporter) -> None:
    """Figures a test recorded with ``record_property("figures: ...", value)`` appear in the summary, pass or fail."""
    lines = []
    for reports in terminalreporter.stats.values():
        for report in reports:
            if getattr(report, "when", None) != "call":
                continue
            for name, value in getattr(report, "user_properties", ()):
                if str(name).startswith("figures"):
                    lines.append(f"{report.nodeid}: {name[len('figures'):].lstrip(': ')}: {value}")
    if lines:
        terminalreporter.section("figures")
        for line in lines:
            terminalreporter.write_line(line)
