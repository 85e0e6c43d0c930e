"""Bounded soak: steady concurrent load on a real launch (loopback only), then check nothing grows.

Starts ``text-generation-launcher`` (default: a tiny random Llama built in a
temporary directory; ``--model-id default`` for the built-in default model,
or any model directory), keeps ``--concurrency`` clients busy for
``--duration`` seconds with a mix of calls: greedy and sampled Generate,
GenerateStream (some cancelled by the client after a few tokens), Tokenize,
invalid requests, and abuse: texts over --payload-limit (refused before
tokenizing, or by gRPC from the message length), a Tokenize with offsets of
a text just under the limit, and stalled readers (a stream whose client
stops reading, which the server must cancel after --stream-write-timeout,
launched at STALL_TIMEOUT_S here). Every ``--sample-every`` seconds it reads the private
RSS (RssAnon) of the router and of each shard from /proc and the KV blocks in
use from the router's /metrics. It also reads that memory once before the
load starts (after one call of each kind and an idle pause, so the router
has trimmed) and once after it (after the same pause), and reports both. It
exits 1 at once if it cannot find the router and every shard among the
launcher's children, since it would have nothing to measure.

Pass criteria (exit 1 otherwise): no process's private memory grows by more
than ``--max-growth-mib`` once idle (after the load against a pause after the
first, warm-up third, when every path has run under load once), nor by more
than ``--max-peak-growth-mib`` while the load runs (the highest sample of the
last third against the highest of the middle third);
the KV blocks in use during the last third stay within what the first
warm samples saw (steady load holds a steady cache); the cache is empty once
the load stops; the p50 and p90 latencies of the last third are within
``--max-latency-ratio`` of the middle third's; every error code is one the
request mix expects. Prints the figures either way, and writes them as JSON
with ``--out``.

Usage: python benchmarks/soak.py [--duration 180] [--concurrency 6] [--num-shard 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "The capital of France is",
    "Once upon a time there was",
    "def main():",
    "Numbers: 1 2 3",
    "A quick brown fox",
    "In the beginning",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The router returns freed memory to the OS after 10 s without requests in flight.
IDLE_TRIM_WAIT_S = 12.0


def private_mib(pid: int) -> float:
    """Private resident memory (RssAnon) of ``pid`` in MiB; NaN when /proc does not say."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return float("nan")
    for line in lines:
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def children(launcher_pid: int) -> dict[str, int]:
    """router / shard-R -> pid among the launcher's children."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) != launcher_pid:
                continue
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if b"text-generation-router" in cmdline or b"text_generation_router" in cmdline:
            found["router"] = int(entry.name)
        elif b"\0serve\0" in cmdline:
            rank = next((e[5:].decode() for e in environ if e.startswith(b"RANK=")), "0")
            found[f"shard-{rank}"] = int(entry.name)
    return found


def kv_blocks_used(http_port: int) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
    except OSError:
        return None
    match = re.search(r"^tgi_kv_cache_blocks_used(?:\{[^}]*\})? ([0-9.e+-]+)$", text, re.M)
    return float(match[1]) if match else None


@dataclass
class Tally:
    """What the clients saw, shared by the worker threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    codes: collections.Counter = field(default_factory=collections.Counter)
    unexpected: list = field(default_factory=list)
    latencies: list = field(default_factory=list)  # (start time, seconds) of successful generations
    requests: int = 0
    busy: int = 0  # clients inside a call

    def record(self, kind: str, code: grpc.StatusCode, expected: set, started: float, details: str = "") -> None:
        with self.lock:
            self.requests += 1
            self.codes[f"{kind}:{code.name}"] += 1
            if code not in expected:
                self.unexpected.append((kind, code.name, details[:200]))
            elif code == grpc.StatusCode.OK and kind in ("generate", "sample"):
                self.latencies.append((started, time.monotonic() - started))


KINDS = ["generate", "sample", "stream-cancel", "tokenize", "invalid", "huge-text", "huge-tokenize", "stalled"]
KIND_WEIGHTS = [4, 3, 2, 1, 1, 1, 1, 1]
# The launch's --stream-write-timeout; a stalled client waits this long plus a margin, then reads.
STALL_TIMEOUT_S = 5
PAYLOAD_LIMIT = 2_000_000  # the launcher's default --payload-limit
# Huge texts go out whole, and a Tokenize with offsets of one comes back ~9 MB.
CLIENT_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def stalled_stream(address: str, prompt: str, tally: Tally) -> None:
    """Open a stream on a connection with a ~1 KiB window, read one message, stop reading; the server
    must cancel it (CANCELLED naming --stream-write-timeout) once the client read what was sent."""
    from text_generation_server.pb.fmaas import generation_pb2 as pb
    from text_generation_server.pb.fmaas import generation_pb2_grpc

    started = time.monotonic()
    options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
    detailed = pb.ResponseOptions(generated_tokens=True, token_logprobs=True, top_n_tokens=5)
    with grpc.insecure_channel(address, options=options) as channel:
        call = generation_pb2_grpc.GenerationServiceStub(channel).GenerateStream(
            pb.SingleGenerationRequest(
                request=pb.GenerationRequest(text=prompt),
                params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=200, min_new_tokens=200),
                                     response=detailed),
            ),
            timeout=300,
        )
        try:
            next(call)
            time.sleep(STALL_TIMEOUT_S + 20)  # under load the window may take seconds to fill
            for _ in call:
                pass
            tally.record("stalled", grpc.StatusCode.OK, set(), started, "the stream was never cut off")
        except grpc.RpcError as err:
            cut = err.code() == grpc.StatusCode.CANCELLED and "--stream-write-timeout" in (err.details() or "")
            tally.record("stalled", err.code(), {err.code()} if cut else set(), started, err.details() or "")


def one_call(stub, kind: str, prompt: str, new_tokens: int, tally: Tally, address: str) -> None:
    """One call of the mix, its outcome recorded in ``tally``."""
    from text_generation_server.pb.fmaas import generation_pb2 as pb

    ok = {grpc.StatusCode.OK}
    started = time.monotonic()
    if kind == "stalled":
        stalled_stream(address, prompt, tally)
        return
    stopping = pb.StoppingCriteria(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    try:
        if kind == "generate":
            stub.Generate(
                pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text=prompt)],
                                            params=pb.Parameters(stopping=stopping)),
                timeout=300,
            )
        elif kind == "sample":
            stub.Generate(
                pb.BatchedGenerationRequest(
                    requests=[pb.GenerationRequest(text=prompt)],
                    params=pb.Parameters(
                        method=pb.SAMPLE,
                        sampling=pb.SamplingParameters(temperature=0.9, top_k=20, top_p=0.9),
                        stopping=stopping,
                    ),
                ),
                timeout=300,
            )
        elif kind == "stream-cancel":
            call = stub.GenerateStream(
                pb.SingleGenerationRequest(request=pb.GenerationRequest(text=prompt),
                                           params=pb.Parameters(stopping=stopping)),
                timeout=300,
            )
            for i, _ in enumerate(call):
                if i >= 2:
                    call.cancel()
                    break
            tally.record(kind, grpc.StatusCode.OK, ok, started)
            return
        elif kind == "tokenize":
            stub.Tokenize(pb.BatchedTokenizeRequest(requests=[pb.TokenizeRequest(text=prompt)]), timeout=60)
        elif kind == "huge-tokenize":
            text = (prompt + " ") * ((PAYLOAD_LIMIT - 1000) // (len(prompt) + 1))
            stub.Tokenize(pb.BatchedTokenizeRequest(return_offsets=True, return_tokens=True,
                                                    requests=[pb.TokenizeRequest(text=text)]), timeout=300)
        elif kind == "huge-text":
            # Over the limit by less than the 1 MiB margin (our refusal), or by more (gRPC's, unread).
            size = PAYLOAD_LIMIT + random.choice([1000, 4 * 2**20])
            stub.Generate(pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text="x" * size)]), timeout=60)
        else:
            stub.Generate(
                pb.BatchedGenerationRequest(
                    requests=[pb.GenerationRequest(text=prompt)],
                    params=pb.Parameters(method=pb.SAMPLE, sampling=pb.SamplingParameters(temperature=-1)),
                ),
                timeout=60,
            )
        tally.record(kind, grpc.StatusCode.OK, ok if kind not in ("invalid", "huge-text") else set(), started)
    except grpc.RpcError as err:
        expected = set()
        if kind == "invalid":
            expected = {grpc.StatusCode.INVALID_ARGUMENT}
        elif kind == "huge-text":
            expected = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
        if kind == "stream-cancel" and err.code() == grpc.StatusCode.CANCELLED:
            expected = {grpc.StatusCode.CANCELLED}
        tally.record(kind, err.code(), expected, started, err.details() or "")


def client(address: str, stop: threading.Event, pause: threading.Event, tally: Tally, seed: int, new_tokens: int) -> None:
    from text_generation_server.pb.fmaas import generation_pb2_grpc

    rng = random.Random(seed)
    with grpc.insecure_channel(address, options=CLIENT_OPTIONS) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        while not stop.is_set():
            if pause.is_set():
                time.sleep(0.1)
                continue
            prompt = rng.choice(PROMPTS)
            kind = rng.choices(KINDS, KIND_WEIGHTS)[0]
            with tally.lock:
                tally.busy += 1
            try:
                one_call(stub, kind, prompt, new_tokens, tally, address)
            finally:
                with tally.lock:
                    tally.busy -= 1


def warm_up(address: str, new_tokens: int) -> Tally:
    """One call of each kind in the mix, one after the other (what the first seconds of load would allocate)."""
    from text_generation_server.pb.fmaas import generation_pb2_grpc

    tally = Tally()
    with grpc.insecure_channel(address, options=CLIENT_OPTIONS) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        for kind, prompt in zip(KINDS, PROMPTS * 2, strict=False):
            one_call(stub, kind, prompt, new_tokens, tally, address)
    return tally


def measurable(pids: dict[str, int], num_shard: int) -> str | None:
    """Why the soak cannot measure these processes, or None when the router and every shard were found."""
    wanted = ["router", *(f"shard-{rank}" for rank in range(max(1, num_shard)))]
    missing = [name for name in wanted if name not in pids]
    if missing:
        return (
            f"cannot find the {', '.join(missing)} process(es) among the launcher's children "
            f"(found: {pids or 'none'}); the soak measures their memory and would measure nothing"
        )
    unreadable = [name for name, pid in pids.items() if math.isnan(private_mib(pid))]
    if unreadable:
        return f"cannot read the private memory (RssAnon in /proc/PID/status) of {', '.join(unreadable)}"
    return None


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def tiny_model(directory: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_model import build_tiny_llama

    return build_tiny_llama(directory / "tiny", hidden_size=96, num_attention_heads=6, num_key_value_heads=3,
                            max_position_embeddings=512)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-id", default="tiny", help="'tiny' (built here), 'default', or a model directory")
    parser.add_argument("--num-shard", type=int, default=2)
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of load")
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--sample-every", type=float, default=2.0)
    parser.add_argument("--max-growth-mib", type=float, default=64.0,
                        help="idle memory after the load against idle after the warm-up third (the leak check)")
    parser.add_argument("--max-peak-growth-mib", type=float, default=384.0,
                        help="peak under load, last third against middle third; one Tokenize of a text near "
                             "--payload-limit holds 400-700 MiB for a second, so peaks differ by a few hundred "
                             "MiB with what overlaps the samples (measured -72 and +258 in two runs)")
    parser.add_argument("--max-latency-ratio", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures here as JSON")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        tmp_path = Path(tmp)
        launcher = Path(sys.executable).parent / "text-generation-launcher"
        grpc_port, http_port = free_port(), free_port()
        argv = [str(launcher), "--hostname", "127.0.0.1", "--grpc-port", str(grpc_port), "--port", str(http_port),
                "--master-port", str(free_port()), "--shard-uds-path", str(tmp_path / "sock" / "shard"),
                "--stream-write-timeout", str(STALL_TIMEOUT_S)]
        if args.model_id == "tiny":
            argv += ["--model-id", str(tiny_model(tmp_path))]
        elif args.model_id != "default":
            argv += ["--model-id", args.model_id]
        if args.num_shard > 1:
            argv += ["--sharded", "true", "--num-shard", str(args.num_shard)]
        log_path = tmp_path / "launcher.log"
        log = open(log_path, "wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            return run(args, proc, grpc_port, http_port, log_path)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=120)
            log.close()
            print(f"launcher exit code {proc.returncode}")


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # Unwinds through main()'s finally, which stops the launcher.
    raise SystemExit(128 + signum)


def wait_serving(address: str, proc: subprocess.Popen, log_path: Path) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"launcher exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with grpc.insecure_channel(address) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    raise SystemExit("not serving after 900 s")


def run(args: argparse.Namespace, proc: subprocess.Popen, grpc_port: int, http_port: int, log_path: Path) -> int:
    address = f"127.0.0.1:{grpc_port}"
    wait_serving(address, proc, log_path)
    pids = children(proc.pid)
    problem = measurable(pids, args.num_shard)
    if problem is None:
        warmup_tally = warm_up(address, args.new_tokens)
        if warmup_tally.unexpected:
            problem = f"the warm-up calls got unexpected outcomes: {warmup_tally.unexpected}"
    if problem is not None:
        print(f"SOAK FAILED: {problem}", file=sys.stderr)
        if args.out:
            args.out.write_text(json.dumps({"processes": pids, "failures": [problem]}, indent=2) + "\n")
        return 1
    time.sleep(IDLE_TRIM_WAIT_S)
    before_load = {name: private_mib(pid) for name, pid in pids.items()}
    print("private memory before load (MiB): " + "  ".join(f"{n} {m:.1f}" for n, m in sorted(before_load.items())))
    print(f"serving; processes {pids}; {args.concurrency} clients for {args.duration:.0f} s")
    tally = Tally()
    stop = threading.Event()
    pause = threading.Event()
    threads = [
        threading.Thread(target=client, args=(address, stop, pause, tally, i, args.new_tokens), daemon=True)
        for i in range(args.concurrency)
    ]
    started = time.monotonic()
    load_start = started
    pauses: list[tuple[float, float]] = []  # (when, seconds): idle pauses, not load time
    for t in threads:
        t.start()
    samples: list[tuple[float, dict[str, float], float | None]] = []
    after_warmup_idle: dict[str, float] | None = None
    while time.monotonic() - started < args.duration:
        if after_warmup_idle is None and time.monotonic() - started >= args.duration / 3:
            # The first third warmed every path up under load; idle memory now is what the rest
            # of the run must come back to (what stays after a burst, e.g. allocator
            # fragmentation, is there already; a leak adds to it).
            pause_start = time.monotonic()
            pause.set()
            while tally.busy:
                time.sleep(0.1)
            time.sleep(IDLE_TRIM_WAIT_S)
            after_warmup_idle = {name: private_mib(pid) for name, pid in pids.items()}
            print("idle after the warm-up third (MiB): "
                  + "  ".join(f"{n} {m:.1f}" for n, m in sorted(after_warmup_idle.items())))
            pauses.append((pause_start, time.monotonic() - pause_start))
            started += pauses[-1][1]  # the pause is not load time
            pause.clear()
        time.sleep(min(args.sample_every, max(0.0, args.duration - (time.monotonic() - started))))
        if proc.poll() is not None:
            print(f"launcher died during the soak:\n{log_path.read_text()[-3000:]}")
            return 1
        mem = {name: private_mib(pid) for name, pid in pids.items()}
        kv = kv_blocks_used(http_port)
        elapsed = time.monotonic() - started
        samples.append((elapsed, mem, kv))
        print(f"{elapsed:6.0f} s  requests {tally.requests:6d}  kv blocks {kv}  "
              + "  ".join(f"{n} {m:.0f} MiB" for n, m in sorted(mem.items())))
        sys.stdout.flush()
    stop.set()
    for t in threads:
        t.join(timeout=300)
    time.sleep(IDLE_TRIM_WAIT_S)
    kv_idle = kv_blocks_used(http_port)
    final_mem = {name: private_mib(pid) for name, pid in pids.items()}

    failures = []
    warm = [s for s in samples if s[0] >= args.duration / 3] or samples
    last = [s for s in samples if s[0] >= 2 * args.duration / 3] or warm[-1:]
    report: dict = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                    "memory_mib": {}, "kv_blocks": {}, "latency_s": [], "outcomes": {}}
    print("\nprivate memory (MiB): idle before load -> idle after the warm-up third -> peak of the middle third "
          "-> peak of the last third -> idle after load")
    middle = [s for s in warm if s[0] < 2 * args.duration / 3] or warm[:1]
    idle_warm = after_warmup_idle or before_load
    for name in sorted(pids):
        peak_last = max(s[1][name] for s in last)
        peak_middle = max(s[1][name] for s in middle)
        # Under load memory moves with what is in flight (a huge Tokenize holds hundreds of MiB
        # for a second): a leak shows as the peaks climbing from the middle to the last third.
        growth_loaded = peak_last - peak_middle
        # Idle, after the router's trim: against idle after the warm-up third.
        growth = final_mem[name] - idle_warm[name]
        print(f"  {name:8s} {before_load[name]:8.1f} -> {idle_warm[name]:8.1f} -> {peak_middle:8.1f} -> "
              f"{peak_last:8.1f} -> {final_mem[name]:8.1f}  (peaks {growth_loaded:+.1f}; idle {growth:+.1f})")
        report["memory_mib"][name] = {"before_load": before_load[name], "idle_after_warmup_third": idle_warm[name],
                                      "middle_third_peak": peak_middle, "last_third_peak": peak_last,
                                      "idle_after_load": final_mem[name]}
        for what, value, limit in (("from the middle to the last third's peak", growth_loaded, args.max_peak_growth_mib),
                                   ("idle, after the load against after the warm-up third", growth, args.max_growth_mib)):
            if value > limit:
                failures.append(f"{name} private memory grew {value:.0f} MiB {what} (limit {limit:.0f})")
    kv_first = [s[2] for s in warm if s[2] is not None and s[0] < 2 * args.duration / 3]
    kv_last = [s[2] for s in last if s[2] is not None]
    if kv_first and kv_last:
        # Steady load: the cache in use may move with the request mix, not climb.
        bound = max(kv_first) * 1.5 + 8
        print(f"KV blocks in use: warm {min(kv_first):.0f}-{max(kv_first):.0f}, last third "
              f"{min(kv_last):.0f}-{max(kv_last):.0f} (bound {bound:.0f})")
        report["kv_blocks"].update(warm_max=max(kv_first), last_third_max=max(kv_last))
        if max(kv_last) > bound:
            failures.append(f"KV blocks in use climbed to {max(kv_last):.0f} (warm-up at most {max(kv_first):.0f})")
    print(f"KV blocks in use once idle: {kv_idle}")
    report["kv_blocks"]["idle"] = kv_idle
    if kv_idle not in (None, 0.0):
        failures.append(f"{kv_idle:.0f} KV blocks still in use with no request running")

    def load_time(t0: float) -> float:
        return t0 - load_start - sum(length for when, length in pauses if t0 >= when)

    thirds = [[lat for t0, lat in tally.latencies if min(2, load_time(t0) * 3 // args.duration) == k] for k in range(3)]
    print("latency of completed generations (s): p50 / p90 / p99 per third of the run")
    for k, values in enumerate(thirds):
        p50, p90, p99 = (percentile(values, q) for q in (0.5, 0.9, 0.99))
        print(f"  third {k + 1}: n={len(values):5d}  {p50:.3f} / {p90:.3f} / {p99:.3f}")
        report["latency_s"].append({"n": len(values), "p50": p50, "p90": p90, "p99": p99})
    # Against the middle third: the first is the warm-up (and stalled clients asleep thin it out).
    if thirds[1] and thirds[2]:
        for q in (0.5, 0.9):
            ratio = percentile(thirds[2], q) / percentile(thirds[1], q)
            print(f"  p{int(q * 100)} last/middle third: {ratio:.2f}")
            if ratio > args.max_latency_ratio:
                failures.append(f"p{int(q * 100)} latency rose {ratio:.2f}x from the middle to the last third")
    print(f"requests sent: {tally.requests}; outcomes by kind and code:")
    for key, count in sorted(tally.codes.items()):
        print(f"  {key:32s} {count}")
    report["requests"] = tally.requests
    report["outcomes"] = dict(sorted(tally.codes.items()))
    if tally.unexpected:
        failures.append(f"{len(tally.unexpected)} unexpected outcomes, first: {tally.unexpected[:3]}")
    report["failures"] = failures
    print("\nSOAK " + ("PASSED" if not failures else "FAILED:\n  " + "\n  ".join(failures)))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
