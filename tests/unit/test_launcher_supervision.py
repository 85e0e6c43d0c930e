"""The launcher with stand-in shard and router processes: start-up order, crashes, shutdown order, no leftovers.

tests/unit/launcher_fakes/drive_launcher.py runs the real launcher with fake
`text-generation-server serve` / `text-generation-router` programs (or the
real router) that record what they were given and when they were signalled.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

FAKES = Path(__file__).resolve().parent / "launcher_fakes"
sys.path.insert(0, str(FAKES))
from procs import PY, alive, free_port, processes_mentioning, wait_for  # noqa: E402


class Launch:
    """The real launcher (tests/unit/launcher_fakes/drive_launcher.py) with fake children."""

    def __init__(self, tmp: Path, model: Path, extra: list[str], env: dict[str, str] | None = None,
                 real_router: bool = False) -> None:
        self.tmp = tmp
        self.events_path = tmp / "events.jsonl"
        self.log_path = tmp / "launcher.log"
        self.uds = str(tmp / "shard")
        self.grpc_port, self.http_port = free_port(), free_port()
        self.argv = [
            PY, str(FAKES / "drive_launcher.py"), "--model-id", str(model),
            "--shard-uds-path", self.uds, "--grpc-port", str(self.grpc_port), "--port", str(self.http_port),
            "--master-port", str(free_port()), "--hostname", "127.0.0.1", *extra,
        ]
        self.env = {
            **os.environ,
            "FAKE_EVENTS": str(self.events_path),
            "FAKE_SERVER_CMD": json.dumps([PY, str(FAKES / "fake_shard_process.py")]),
            **(env or {}),
        }
        if not real_router:
            self.env["FAKE_ROUTER_CMD"] = json.dumps([PY, str(FAKES / "fake_router_process.py")])
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT, env=self.env)

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self) -> list[dict]:
        if not self.events_path.exists():
            return []
        return [json.loads(line) for line in self.events_path.read_text().splitlines() if line.strip()]

    def pids(self) -> set[int]:
        return {e["pid"] for e in self.events() if e["event"] == "start"}

    def wait_ready(self, timeout: float = 60.0) -> None:
        assert wait_for(lambda: "Ready:" in self.text() or self.proc.poll() is not None, timeout), self.text()
        assert "Ready:" in self.text(), self.text()

    def wait_exit(self, timeout: float = 30.0) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"launcher still running after {timeout} s:\n{self.text()}") from None
        self.log.close()
        return code

    def assert_nothing_left(self) -> None:
        assert wait_for(lambda: not any(alive(p) for p in self.pids()), 10), [p for p in self.pids() if alive(p)]
        assert wait_for(lambda: processes_mentioning(self.uds) == [], 10), processes_mentioning(self.uds)
        leftovers = sorted(p.name for p in self.tmp.glob("shard*"))
        assert leftovers == [], leftovers

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in self.pids():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def launch(tiny_llama, tmp_path):
    runs: list[Launch] = []

    def start(extra: list[str] | None = None, env: dict[str, str] | None = None, **kw) -> Launch:
        run_dir = tmp_path / f"run{len(runs)}"
        run_dir.mkdir(mode=0o700)  # holds the sockets: only this user may open it
        run = Launch(run_dir, kw.pop("model", tiny_llama), extra or [], env, **kw)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.close()


def test_sigterm_stops_router_first_then_shards_exit_0_and_leaves_nothing(launch):
    run = launch(["--num-shard", "2"], env={"FAKE_ROUTER_DRAIN": "0.5"})
    run.wait_ready()
    assert "Ready: fmaas.GenerationService on 127.0.0.1:" in run.text()
    assert "(model " in run.text() and "2 shards)" in run.text()
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait_exit() == 0, run.text()
    run.assert_nothing_left()
    events = run.events()
    router_exit = next(e["t"] for e in events if e["who"] == "router" and e["event"] == "exit")
    shard_sigterms = [e["t"] for e in events if e["who"].startswith("shard") and e["event"] == "sigterm"]
    assert len(shard_sigterms) == 2
    assert all(t >= router_exit for t in shard_sigterms), events


def test_sigint_is_a_clean_stop_too(launch):
    run = launch()
    run.wait_ready()
    run.proc.send_signal(signal.SIGINT)
    assert run.wait_exit() == 0, run.text()
    run.assert_nothing_left()


def test_logs_each_start_up_stage(launch):
    run = launch(["--num-shard", "2"])
    run.wait_ready()
    text = run.text()
    for line in ["Starting shard 0/2", "Starting shard 1/2", "Shard 0 ready (", "Shard 1 ready (", "Starting router",
                 "Router ready ("]:
        assert line in text, text
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait_exit() == 0


def test_shard_crash_during_start_up_stops_everything_with_exit_1_naming_the_shard(launch):
    run = launch(["--num-shard", "2"], env={"FAKE_SHARD_DELAY": "30", "FAKE_CRASH_RANK": "1", "FAKE_CRASH_AFTER": "0.5"})
    assert run.wait_exit() == 1, run.text()
    assert "shard 1 exited with exit code 3 during start-up; stopping everything" in run.text()
    assert "Starting router" not in run.text()
    run.assert_nothing_left()


def test_shard_crash_after_ready_stops_router_and_other_shard_with_exit_1(launch):
    run = launch(["--num-shard", "2"], env={"FAKE_CRASH_RANK": "0", "FAKE_CRASH_AFTER": "2"})
    run.wait_ready()
    assert run.wait_exit() == 1, run.text()
    assert "shard 0 exited with exit code 3; stopping everything" in run.text()
    assert {e["who"] for e in run.events() if e["event"] == "sigterm"} == {"router", "shard 1"}
    run.assert_nothing_left()


def test_router_exit_stops_the_shards_with_exit_1(launch):
    run = launch(env={"FAKE_ROUTER_CRASH_AFTER": "1"})
    run.wait_ready()
    assert run.wait_exit() == 1, run.text()
    assert "router exited with exit code 4; stopping everything" in run.text()
    run.assert_nothing_left()


def test_launcher_killed_with_sigkill_leaves_no_orphans(launch):
    run = launch(["--num-shard", "2"])
    run.wait_ready()
    assert len(run.pids()) == 3
    run.proc.kill()
    run.proc.wait()
    assert wait_for(lambda: not any(alive(p) for p in run.pids()), 15), run.events()
    # the shards removed their own sockets on the SIGTERM their parent's death sent them
    assert wait_for(lambda: not list(run.tmp.glob("shard-*")), 5)


def test_shards_get_rank_world_master_device_and_a_share_of_threads(launch):
    # An inherited LOCAL_RANK would put every shard on one GPU: each shard gets its own.
    run = launch(["--num-shard", "2", "--dtype", "bfloat16", "--json-output", "--cuda-memory-fraction", "0.8"],
                 env={"OMP_NUM_THREADS": "", "LOCAL_RANK": "0"})  # fmt: skip
    run.wait_ready()
    starts = {e["who"]: e for e in run.events() if e["event"] == "start"}
    for rank in range(2):
        shard = starts[f"shard {rank}"]
        assert shard["argv"][:4] == ["serve", str(run.argv[3]), "--uds-path", run.uds]
        assert {"--sharded", "--json-output"} <= set(shard["argv"])
        assert shard["argv"][shard["argv"].index("--dtype") + 1] == "bfloat16"
        assert shard["env"]["RANK"] == str(rank) and shard["env"]["WORLD_SIZE"] == "2"
        assert shard["env"]["LOCAL_RANK"] == str(rank)
        assert shard["env"]["CUDA_MEMORY_FRACTION"] == "0.8"
        assert shard["env"]["MASTER_ADDR"] == "localhost"
        assert shard["env"]["MASTER_PORT"] == run.argv[run.argv.index("--master-port") + 1]
        assert shard["env"]["OMP_NUM_THREADS"] == ""  # set by the user (even empty): left alone
        assert shard["pgid"] == shard["pid"]  # own process group
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait_exit() == 0


def test_threads_are_split_between_shards_when_the_user_did_not_set_them(launch, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    run = launch(["--num-shard", "2"])
    run.wait_ready()
    starts = [e for e in run.events() if e["event"] == "start" and e["who"].startswith("shard")]
    expected = str(max(1, len(os.sched_getaffinity(0)) // 2))
    assert [s["env"]["OMP_NUM_THREADS"] for s in starts] == [expected, expected]
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait_exit() == 0


def test_router_gets_addresses_and_only_the_limits_the_user_set(launch):
    run = launch(["--max-total-tokens", "200", "--max-input-tokens", "100"], env={"MAX_BATCH_SIZE": "8"})
    run.wait_ready()
    [router] = [e for e in run.events() if e["who"] == "router" and e["event"] == "start"]
    argv = router["argv"]
    pairs = dict(zip(argv[::2], argv[1::2], strict=False))
    assert pairs["--model-id"] == str(run.argv[3])
    assert pairs["--tokenizer"] == str(run.argv[3])
    assert pairs["--shard-uds-path"] == run.uds
    assert pairs["--grpc-port"] == str(run.grpc_port) and pairs["--port"] == str(run.http_port)
    assert pairs["--hostname"] == "127.0.0.1"
    assert pairs["--max-total-tokens"] == "200" and pairs["--max-input-tokens"] == "100"
    assert pairs["--max-batch-size"] == "8"
    assert "--max-concurrent-requests" not in argv and "--waiting-served-ratio" not in argv
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait_exit() == 0


def test_grpc_port_in_use_is_refused_before_anything_starts(launch):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = launch(["--grpc-port", str(port)])
        assert run.wait_exit() == 1
    assert f"port {port} on 127.0.0.1 is already in use" in run.text() and "--grpc-port" in run.text()
    assert run.events() == []


def test_master_port_in_use_is_refused_when_sharded(launch):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = launch(["--num-shard", "2", "--master-port", str(port)])
        assert run.wait_exit() == 1
    assert f"port {port} on localhost is already in use" in run.text() and "--master-port" in run.text()
    assert run.events() == []


def test_missing_model_is_one_clear_line_and_exit_1(launch, tmp_path):
    run = launch(model=tmp_path / "no-such-model")
    assert run.wait_exit() == 1
    text = run.text()
    assert f"Model not found: model directory {tmp_path / 'no-such-model'} does not exist" in text
    assert "Traceback" not in text
    assert run.events() == []


def test_stale_socket_is_removed_and_a_live_one_refused(launch, tmp_path):
    stale_dir = tmp_path / "stale"
    stale_dir.mkdir(mode=0o700)
    path = stale_dir / "shard-0"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))  # bound, never listening, then closed: a dead server's socket file
    run = launch(["--shard-uds-path", str(stale_dir / "shard")])
    run.wait_ready()
    assert f"Removed stale socket {path}" in run.text()
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait_exit() == 0
    assert not path.exists()

    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(path))
        live.listen()
        run = launch(["--shard-uds-path", str(stale_dir / "shard")])
        assert run.wait_exit() == 1
        assert f"{path} is in use by another running server" in run.text()
        assert path.exists()


def test_real_router_in_front_of_stand_in_shards_serves_and_drains(launch):
    import grpc
    from text_generation_server.pb.fmaas import generation_pb2 as pb
    from text_generation_server.pb.fmaas import generation_pb2_grpc

    run = launch(["--num-shard", "2"], real_router=True)
    run.wait_ready(timeout=120)
    with grpc.insecure_channel(f"127.0.0.1:{run.grpc_port}") as channel:
        reply = generation_pb2_grpc.GenerationServiceStub(channel).Generate(
            pb.BatchedGenerationRequest(
                requests=[pb.GenerationRequest(text="hello")],
                params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=3)),
            ),
            timeout=60,
        )
    assert reply.responses[0].generated_token_count == 3
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait_exit() == 0, run.text()
    run.assert_nothing_left()


# ---- command lines and addresses (no processes) ----------------------------------------------------------------


def test_shard_command_carries_quantize_dtype_and_switches():
    from text_generation_launcher.args import parse_args
    from text_generation_launcher.launch import Commands, shard_argv

    args = parse_args(["--quantize", "bitsandbytes-nf4", "--dtype", "bfloat16", "--trust-remote-code"], env={},
                      cuda_device_count=lambda: 0)
    argv = shard_argv(args, Path("/models/m"), Commands(server=("tgs",), router=("tgr",)))
    assert argv == ["tgs", "serve", "/models/m", "--uds-path", "/tmp/text-generation-server/shard", "--dtype", "bfloat16",
                    "--quantize", "bitsandbytes-nf4", "--trust-remote-code"]


def test_console_scripts_beside_the_interpreter_are_used():
    from text_generation_launcher.launch import default_commands

    commands = default_commands()
    bindir = Path(sys.executable).parent
    assert commands.server == (str(bindir / "text-generation-server"),)
    assert commands.router == (str(bindir / "text-generation-router"),)


def test_python_module_fallback_when_console_scripts_are_missing(monkeypatch, tmp_path):
    from text_generation_launcher import launch as launch_module

    monkeypatch.setattr(launch_module.sys, "executable", str(tmp_path / "python"))
    commands = launch_module.default_commands()
    assert commands.server == (str(tmp_path / "python"), "-m", "text_generation_server.cli")
    assert commands.router == (str(tmp_path / "python"), "-m", "text_generation_router.cli")


@pytest.mark.parametrize(
    "hostname, expected",
    [("0.0.0.0", "127.0.0.1:8033"), ("::", "[::1]:8033"), ("10.1.2.3", "10.1.2.3:8033"), ("fd00::1", "[fd00::1]:8033"),
     ("pod-name", "pod-name:8033")],
)
def test_readiness_is_checked_where_the_router_listens(hostname, expected):
    from text_generation_launcher.probes import local_address

    assert local_address(hostname, 8033) == expected


@pytest.mark.parametrize("named", [True, False], ids=["shard-names-the-request", "anonymous-failure"])
def test_a_request_the_shards_refuse_fails_alone_and_its_batch_mates_are_served(launch, tiny_llama, named):
    """Two stand-in shards refuse any prefill holding one token id, as a shard refuses a request it cannot
    run. Four calls queued behind a running stream share one prefill; only the call holding that id
    fails (INVALID_ARGUMENT when the shards name it, INTERNAL when they cannot tell), its three batch
    mates and the running stream are served, found by prefilling without it (named) or in halves."""
    import threading

    import grpc
    from text_generation_server.pb.fmaas import generation_pb2 as pb
    from text_generation_server.pb.fmaas import generation_pb2_grpc
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama))
    good = ["the cat sat", "a dog ran", "the sun is up"]
    bad = "zebra quiz"
    used = {i for text in good for i in tokenizer(text)["input_ids"]}
    poison = next(i for i in tokenizer(bad)["input_ids"] if i not in used)
    model = {"poison_id": poison, "poison_named": named, "step_delay": 0.05}
    run = launch(["--num-shard", "2"], env={"FAKE_MODEL": json.dumps(model)}, real_router=True)
    run.wait_ready(timeout=120)

    def params(n: int) -> pb.Parameters:
        return pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=n, min_new_tokens=n))

    results: dict[str, object] = {}
    with grpc.insecure_channel(f"127.0.0.1:{run.grpc_port}") as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        stream = stub.GenerateStream(pb.SingleGenerationRequest(request=pb.GenerationRequest(text="long story"),
                                                                params=params(60)), timeout=60)
        first = [next(stream), next(stream)]  # the stream is running: new calls wait for the next step
        barrier = threading.Barrier(4)

        def call(text: str) -> None:
            barrier.wait()
            try:
                results[text] = stub.Generate(pb.BatchedGenerationRequest(
                    requests=[pb.GenerationRequest(text=text)], params=params(5)), timeout=60)
            except grpc.RpcError as err:
                results[text] = err

        threads = [threading.Thread(target=call, args=(text,)) for text in [*good, bad]]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        streamed = first + list(stream)

    assert isinstance(results[bad], grpc.RpcError), results[bad]
    expected = grpc.StatusCode.INVALID_ARGUMENT if named else grpc.StatusCode.INTERNAL
    assert results[bad].code() == expected, results[bad]
    assert "cannot be run" in results[bad].details()
    for text in good:
        assert not isinstance(results[text], grpc.RpcError), (text, results[text])
        assert results[text].responses[0].generated_token_count == 5
    assert streamed[-1].generated_token_count == 60 and streamed[-1].stop_reason == pb.MAX_TOKENS

    prefills = [e for e in run.events() if e["event"] == "prefill" and e["who"] == "shard 0"]
    refused = [e["requests"] for e in prefills if e["refused"]]
    assert any(len(ids) == 4 for ids in refused), prefills  # the four shared one prefill, refused
    if named:
        assert len(refused) == 1, prefills  # the rest prefilled together without the named one
    else:
        assert len(refused) == 3, prefills  # 4 -> 2 -> 1: the halves holding the bad request
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait_exit() == 0, run.text()


@pytest.mark.parametrize("change,message", [
    ({"architectures": ["GPT2LMHeadModel"]}, "architecture 'GPT2LMHeadModel', which is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not built"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope type 'dynamic' is not built"),
    ({"architectures": ["FalconForCausalLM"], "model_type": "falcon", "alibi": True, "head_dim": None},
     "ALiBi position biases (alibi: true, the falcon-rw models) are not built"),
    ({"architectures": ["FalconForCausalLM"], "model_type": "falcon"},  # Falcon derives head_dim
     "transformers cannot read"),
], ids=["architecture", "activation", "rope", "falcon-alibi", "unreadable-config"])
def test_a_model_feature_not_served_is_refused_before_any_shard_starts(launch, tiny_llama, tmp_path, change, message):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    config = json.loads((model / "config.json").read_text())
    config.update(change)
    if change.get("head_dim", 0) is None:
        del config["head_dim"]
    if "rope_scaling" in change:
        config.pop("rope_parameters", None)  # transformers 5 reads the newer spelling first
    (model / "config.json").write_text(json.dumps(config))
    run = launch(model=model)
    assert run.wait_exit() == 1
    assert "Cannot start" in run.text() and message in run.text(), run.text()
    assert not [e for e in run.events() if e["who"].startswith("shard")], run.events()
