"""Per-shard resident memory of a real launch for 1, 2, 3 ... shards.

For each shard count the launcher starts the model (default: the built-in
default model) with free ports; once the router reports SERVING, one short
greedy request runs, then every shard process is read from /proc: peak RSS
(VmHWM, which counts pages of the mmapped checkpoint file too) and private
RSS (RssAnon). Each shard's own start-up line gives its parameter bytes and
its peak and private RSS right after loading (before the KV cache and
warm-up). A bare interpreter that imports what a shard imports gives the fixed
cost every process pays whatever it holds.

Usage: python benchmarks/shard_memory.py [--model-id DIR] [--shards 1 2 3]
Prints one table; exits non-zero if a launch fails.
"""

from __future__ import annotations

import argparse
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

MiB = 2**20
READY_LINE = re.compile(
    r"shard-(\d+) Model ready: .*parameters ([\d.]+) MiB on this rank"
    r"(?:, peak RSS ([\d.]+) MiB, private RSS ([\d.]+) MiB)?"
)


@dataclass
class ShardMemory:
    rank: int
    pid: int
    params_mib: float
    load_peak_mib: float | None
    load_private_mib: float | None
    peak_mib: float  # VmHWM: includes pages of the mapped checkpoint file
    anon_mib: float  # RssAnon now: the process's private memory (weights, KV cache, buffers)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(f"{field} not in /proc/{pid}/status")


def shard_pids(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of the launcher's ``serve`` children (RANK read from each one's environment)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != launcher_pid or b"\0serve\0" not in (entry / "cmdline").read_bytes():
                continue
            env = dict(
                item.split(b"=", 1) for item in (entry / "environ").read_bytes().split(b"\0") if b"=" in item
            )
        except (OSError, IndexError, ValueError):
            continue
        found[int(env.get(b"RANK", b"0"))] = int(entry.name)
    return found


def wait_serving(address: str, proc: subprocess.Popen, timeout: float) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"launcher exited with {proc.returncode} before serving")
        try:
            with grpc.insecure_channel(address) as channel:
                status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"not serving after {timeout:.0f} s")


def one_request(address: str) -> None:
    import grpc
    from text_generation_server.pb.fmaas import generation_pb2 as pb
    from text_generation_server.pb.fmaas import generation_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        generation_pb2_grpc.GenerationServiceStub(channel).Generate(
            pb.BatchedGenerationRequest(
                requests=[pb.GenerationRequest(text="The capital of France is")],
                params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=8)),
            ),
            timeout=300,
        )


def measure(shards: int, model_id: str | None, timeout: float, kv_tokens: int) -> list[ShardMemory]:
    launcher = Path(sys.executable).parent / "text-generation-launcher"
    with tempfile.TemporaryDirectory(prefix="shard-memory-") as tmp:
        grpc_port = free_port()
        argv = [
            str(launcher),
            "--grpc-port", str(grpc_port),
            "--port", str(free_port()),
            "--master-port", str(free_port()),
            "--shard-uds-path", f"{tmp}/shard",
        ]
        if kv_tokens > 0:
            # Sequences of at most 1024 tokens keep the warm-up prefill within that budget.
            argv += ["--max-total-tokens", "1024", "--max-batch-total-tokens", str(kv_tokens)]
        if model_id:
            argv += ["--model-id", model_id]
        if shards > 1:
            argv += ["--sharded", "true", "--num-shard", str(shards)]
        log_path = Path(tmp) / "launcher.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
            try:
                address = f"127.0.0.1:{grpc_port}"
                wait_serving(address, proc, timeout)
                one_request(address)
                pids = shard_pids(proc.pid)
                if sorted(pids) != list(range(shards)):
                    raise RuntimeError(f"expected ranks 0..{shards - 1}, found {sorted(pids)}")
                peaks = {rank: proc_status_kib(pid, "VmHWM") for rank, pid in pids.items()}
                anon = {rank: proc_status_kib(pid, "RssAnon") for rank, pid in pids.items()}
            except Exception:
                sys.stderr.write(log_path.read_text(errors="replace")[-4000:])
                raise
            finally:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(timeout=120)
        ready = {int(m[1]): m for m in READY_LINE.finditer(log_path.read_text(errors="replace"))}
    results = []
    for rank in range(shards):
        m = ready.get(rank)
        results.append(
            ShardMemory(
                rank=rank,
                pid=pids[rank],
                params_mib=float(m[2]) if m else float("nan"),
                load_peak_mib=float(m[3]) if m and m[3] else None,
                load_private_mib=float(m[4]) if m and m[4] else None,
                peak_mib=peaks[rank] / 1024,
                anon_mib=anon[rank] / 1024,
            )
        )
    return results


def baseline_mib() -> tuple[float, float]:
    """Peak and private RSS of a process that imports what a shard imports and holds no model."""
    code = (
        "import torch, grpc, text_generation_server.server, text_generation_server.models\n"
        "s = {l.split(':')[0]: l.split()[1] for l in open('/proc/self/status') if l.startswith(('VmHWM', 'RssAnon'))}\n"
        "print(s['VmHWM'], s['RssAnon'])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak, private = out.stdout.split()
    return int(peak) / 1024, int(private) / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-id", default=None, help="model to launch (default: the built-in default model)")
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 3], help="shard counts to measure")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for each launch")
    parser.add_argument(
        "--kv-tokens",
        type=int,
        default=4096,
        help="--max-batch-total-tokens for each launch (with --max-total-tokens 1024), so the KV cache "
        "does not hide the weights (0: the server's default sizing)",
    )
    args = parser.parse_args()
    if not Path("/proc/self/status").exists():
        print("needs Linux /proc", file=sys.stderr)
        return 2

    base_peak, base_private = baseline_mib()
    print(
        f"fixed cost of a shard process (imports, no model): peak RSS {base_peak:.0f} MiB, "
        f"private RSS {base_private:.0f} MiB"
    )
    header = (
        f"{'shards':>6} {'rank':>4} {'params MiB':>10} {'after load: peak RSS':>21} {'private RSS':>12} "
        f"{'serving: peak RSS (VmHWM)':>26} {'private RSS':>12}"
    )
    print(header)
    print("-" * len(header))
    single: tuple[float, float] | None = None
    for n in args.shards:
        rows = measure(n, args.model_id, args.timeout, args.kv_tokens)
        for row in rows:
            load = f"{row.load_peak_mib:.0f}" if row.load_peak_mib is not None else "?"
            private = f"{row.load_private_mib:.0f}" if row.load_private_mib is not None else "?"
            print(
                f"{n:>6} {row.rank:>4} {row.params_mib:>10.1f} {load:>21} {private:>12} "
                f"{row.peak_mib:>26.0f} {row.anon_mib:>12.0f}"
            )
        params = max(r.params_mib for r in rows)
        private_weights = max((r.load_private_mib or 0.0) for r in rows) - base_private
        if n == 1:
            single = (params, private_weights)
        elif single is not None:
            print(
                f"{'':>6} largest shard vs 1 shard: parameters {params / single[0]:.2f}x, private RSS after load "
                f"above the fixed cost {private_weights / max(single[1], 1e-9):.2f}x (ideal {1 / n:.2f})"
            )
        sys.stdout.flush()
    return 0


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # Unwinds through measure()'s finally, which stops the launcher it started.
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    sys.exit(main())
