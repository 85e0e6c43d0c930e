"""Our server as a `make bench` contestant: a real launcher (router + shard) started by the benchmark.

Measured through the full public gRPC path with the benchmark tool's
targets, plus the shard's own Decode called directly over its unix socket,
which is what the server overhead is measured against.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from bench_prompts import Prompt
from grpc_health.v1 import health_pb2, health_pb2_grpc
from text_generation_benchmark.http_target import HttpTarget
from text_generation_benchmark.measure import Shape
from text_generation_benchmark.server_target import ServerTarget
from text_generation_benchmark.shard_target import ShardTarget

LAUNCHER = Path(sys.executable).parent / "text-generation-launcher"


class LaunchError(RuntimeError):
    """The server did not come up; the message carries the launcher's own last error lines."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launcher:
    """One ``text-generation-launcher`` child with its own ports, socket prefix and log file."""

    def __init__(self, name: str, args: list[str], workdir: Path, threads: int) -> None:
        self.name = name
        self.grpc_port = _free_port()
        self.http_port = _free_port()
        self.uds_path = str(workdir / f"{name}-shard")
        self.log_path = workdir / f"{name}.log"
        self.cmd = [
            str(LAUNCHER),
            *args,
            "--grpc-port", str(self.grpc_port),
            "--port", str(self.http_port),
            "--shard-uds-path", self.uds_path,
            "--master-port", str(_free_port()),
        ]
        # The shard takes its torch threads from OMP_NUM_THREADS, as the peers get them.
        self.env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, timeout: float) -> None:
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LaunchError(f"launcher exited with {self.proc.returncode}: {self.last_error()}")
            if self._serving():
                return
            time.sleep(0.5)
        self.stop()
        raise LaunchError(f"not serving after {timeout:.0f} s: {self.last_error()}")

    def _serving(self) -> bool:
        try:
            with grpc.insecure_channel(self.address) as channel:
                answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            return answer.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False

    def last_error(self) -> str:
        """The last ERROR line of the log (or its last line), for a one-line reason."""
        try:
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return f"(no log at {self.log_path})"
        errors = [ln for ln in lines if " ERROR " in ln or "Error" in ln]
        line = (errors or lines or ["(empty log)"])[-1]
        return line.split(" ERROR ", 1)[-1].strip()[:400] + f" (log: {self.log_path})"

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class OurServer:
    """Measurements of one running launcher, through gRPC and directly at its shard."""

    def __init__(self, launcher: Launcher) -> None:
        self.launcher = launcher
        self.server = ServerTarget(launcher.address, connect_timeout=30)
        self.http = HttpTarget(f"http://127.0.0.1:{launcher.http_port}")
        self.shard = ShardTarget(launcher.uds_path, connect_timeout=30)

    async def connect(self) -> None:
        await self.server.connect()
        await self.http.connect()
        await self.shard.connect()

    async def close(self) -> None:
        await self.server.close()
        await self.http.close()
        await self.shard.close()

    def describe(self) -> dict:
        return self.shard.describe()

    async def single_stream(self, prompt: Prompt, n: int) -> float:
        run = await self.server.run(Shape(1, len(prompt.ids), n), [prompt.text])
        return 1.0 / (sum(run.inter_token_s) / len(run.inter_token_s))

    async def single_stream_times(self, prompt: Prompt, n: int) -> list[float]:
        """Per-token times of one stream through gRPC (first token excluded)."""
        run = await self.server.run(Shape(1, len(prompt.ids), n), [prompt.text])
        return run.inter_token_s

    async def shard_decode_times(self, prompt: Prompt, n: int) -> list[float]:
        """Per-token times of the same generation with Prefill/Decode called on the shard directly."""
        run = await self.shard.run(Shape(1, len(prompt.ids), n), [prompt.ids])
        return run.inter_token_s

    async def http_single_stream_times(self, prompt: Prompt, n: int) -> list[float]:
        """Per-token times of one stream through HTTP /generate_stream (first token excluded)."""
        run = await self.http.run(Shape(1, len(prompt.ids), n), [prompt.text])
        return run.inter_token_s

    async def http_ttft(self, prompt: Prompt) -> float:
        run = await self.http.run(Shape(1, len(prompt.ids), 1), [prompt.text])
        return run.ttft_s[0]

    async def batched(self, prompts: list[Prompt], n: int) -> float:
        run = await self.server.run(Shape(len(prompts), len(prompts[0].ids), n), [p.text for p in prompts])
        return run.total_tokens_per_s

    async def ttft(self, prompt: Prompt) -> float:
        run = await self.server.run(Shape(1, len(prompt.ids), 1), [prompt.text])
        return run.ttft_s[0]

