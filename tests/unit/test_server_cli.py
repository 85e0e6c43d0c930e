"""``text-generation-server``: flags, environment, clear start-up errors, clean shutdown."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import pytest
import torch
from text_generation_server import cli
from text_generation_server.pb.generate.v1 import generate_pb2 as pb
from text_generation_server.pb.generate.v1 import generate_pb2_grpc

SERVER = Path(sys.executable).parent / "text-generation-server"


def run(args: list[str], env: dict[str, str] | None = None, timeout: float = 120):
    return subprocess.run(
        [str(SERVER), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def assert_clean_failure(result, *needles: str) -> None:
    assert result.returncode == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def short_dir():
    path = Path(tempfile.mkdtemp(prefix="tgs-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_serve_a_missing_model_directory_exits_1_naming_the_path():
    result = run(["serve", "/nonexistent", "--uds-path", "/tmp/tgs-never"])
    assert_clean_failure(result, "/nonexistent")
    assert not Path("/tmp/tgs-never-0").exists()


def test_serve_an_unsupported_architecture_exits_1_naming_it(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    save_file({"wte.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    result = run(["serve", str(tmp_path), "--uds-path", str(tmp_path / "s")])
    assert_clean_failure(result, "GPT2LMHeadModel", "LlamaForCausalLM")


@pytest.mark.parametrize(
    "env,needle",
    [
        ({"RANK": "abc"}, "RANK='abc' is not an integer"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 must be below WORLD_SIZE=2"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be >= 1"),
        ({"MASTER_PORT": "70000"}, "MASTER_PORT=70000"),
    ],
)
def test_bad_shard_environment_is_named(env, needle):
    with pytest.raises(cli.ShardStartError, match=needle.replace("(", r"\(")):
        cli.ShardEnv.from_environ(env)


def test_shard_environment_defaults():
    assert cli.ShardEnv.from_environ({}) == cli.ShardEnv(0, 1, "localhost", 29500)
    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"}
    assert cli.ShardEnv.from_environ(env) == cli.ShardEnv(1, 2, "10.0.0.1", 1234)


def test_bad_environment_fails_the_process_cleanly():
    result = run(["serve", "/nonexistent"], env={"RANK": "abc"})
    assert_clean_failure(result, "RANK='abc'")


def test_unknown_dtype_is_an_argparse_error_listing_the_choices():
    result = run(["serve", "/x", "--dtype", "int8"])
    assert result.returncode == 2
    assert "auto" in result.stderr and "bfloat16" in result.stderr


def test_download_weights_of_a_missing_directory_exits_1():
    result = run(["download-weights", "/nonexistent/model"])
    assert_clean_failure(result, "/nonexistent/model")


def test_download_weights_converts_pickle_weights_only_with_trust_remote_code(tiny_llama, tmp_path):
    from safetensors.torch import load_file

    ckpt = tmp_path / "binonly"
    shutil.copytree(tiny_llama, ckpt)
    state = load_file(str(ckpt / "model.safetensors"))
    torch.save(state, ckpt / "pytorch_model.bin")
    (ckpt / "model.safetensors").unlink()

    refused = run(["download-weights", str(ckpt)])
    assert_clean_failure(refused, "pickle", "unpickling", "--trust-remote-code")
    assert not (ckpt / "model.safetensors").exists()

    done = run(["download-weights", str(ckpt), "--trust-remote-code"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(ckpt)
    converted = load_file(str(ckpt / "model.safetensors"))
    assert converted.keys() == state.keys()


@pytest.mark.parametrize("kernels_run", [True, False], ids=["native", "no-kernels"])
@pytest.mark.parametrize("bf16", [True, False], ids=["bf16-cpu", "avx2-cpu"])
def test_auto_dtype_on_cpu_keeps_16_bit_checkpoints_where_the_native_kernels_run(monkeypatch, kernels_run, bf16):
    """A dense 16-bit checkpoint keeps its dtype (the native layers read its weights as they are);
    the built-in model takes its fastest form; quantized and float32 checkpoints, and every model
    where the kernels do not run, compute in float32; explicit choices are kept."""
    from text_generation_server import kernels

    monkeypatch.setattr(cli, "host_has_bf16_instructions", lambda: bf16)
    monkeypatch.setattr(kernels, "cpu_ops_status", lambda: kernels.KernelStatus(kernels_run, "test"))
    cpu = torch.device("cpu")
    half = {"bfloat16": torch.bfloat16, "float16": torch.float16}
    for checkpoint in ("bfloat16", "float16"):
        want = half[checkpoint] if kernels_run else torch.float32
        assert cli.resolve_dtype("auto", cpu, checkpoint) == want
        assert cli.resolve_dtype("auto", cpu, checkpoint, quantized=True) == torch.float32
    assert cli.resolve_dtype("auto", cpu, "float32") == torch.float32
    assert cli.resolve_dtype("auto", cpu) == torch.float32
    fastest = (torch.bfloat16 if bf16 else torch.float16) if kernels_run else torch.float32
    assert cli.resolve_dtype("auto", cpu, "float32", default_model=True) == fastest
    assert cli.resolve_dtype("bfloat16", cpu, "float32") == torch.bfloat16
    assert cli.resolve_dtype("float32", cpu, "bfloat16", default_model=True) == torch.float32


def test_a_checkpoint_with_its_own_quantization_settings_counts_as_quantized(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq", "bits": 4}}))
    assert cli.checkpoint_is_quantized(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    assert not cli.checkpoint_is_quantized(tmp_path)


@pytest.fixture
def fake_gpus(monkeypatch):
    """CUDA as the shard sees it: two GPUs, bf16 support switchable."""
    caps = {"bf16": True}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: caps["bf16"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Test GPU")
    return caps


@pytest.mark.parametrize("checkpoint,bf16,want", [
    ("bfloat16", True, torch.bfloat16),
    ("bfloat16", False, torch.float16),  # a GPU without bf16 (V100, T4) runs float16
    ("float16", True, torch.float16),
    ("float32", True, torch.float16),
    (None, True, torch.float16),
])  # fmt: skip
def test_auto_dtype_on_cuda_follows_the_checkpoint_where_the_gpu_can(fake_gpus, checkpoint, bf16, want):
    fake_gpus["bf16"] = bf16
    assert cli.resolve_dtype("auto", torch.device("cuda", 0), checkpoint) == want


def test_bfloat16_on_a_gpu_without_it_is_refused(fake_gpus):
    fake_gpus["bf16"] = False
    with pytest.raises(cli.ShardStartError, match="--dtype bfloat16: Test GPU .* has no bfloat16 support; use float16"):
        cli.resolve_dtype("bfloat16", torch.device("cuda", 1))


def test_each_shard_takes_the_gpu_its_local_rank_names_and_an_absent_one_is_refused(fake_gpus):
    env = cli.ShardEnv(1, 2, "localhost", 29500)
    assert cli.choose_device(env, {"LOCAL_RANK": "1"}) == torch.device("cuda", 1)
    assert cli.choose_device(env, {}) == torch.device("cuda", 1)  # RANK where LOCAL_RANK is unset
    with pytest.raises(cli.ShardStartError, match=r"shard 1 is to run on GPU 2 \(LOCAL_RANK\), but 2 GPU\(s\) are "
                                                  r"visible \(CUDA_VISIBLE_DEVICES=0,1\); use at most 2 shard"):
        cli.choose_device(env, {"LOCAL_RANK": "2", "CUDA_VISIBLE_DEVICES": "0,1"})
    with pytest.raises(cli.ShardStartError, match="LOCAL_RANK='gpu1' must be a GPU index"):
        cli.choose_device(env, {"LOCAL_RANK": "gpu1"})


def test_the_model_worker_thread_makes_the_shards_gpu_current(monkeypatch):
    """CUDA's current device is per thread: the thread that loads and runs the model sets it."""
    import threading

    from text_generation_server.server import ModelWorker

    seen = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen.append((threading.current_thread().name, d)))
    worker = ModelWorker(torch.device("cuda", 1))
    assert worker.call(lambda: threading.current_thread().name) == "model-worker"
    assert seen == [("model-worker", torch.device("cuda", 1))]
    ModelWorker(torch.device("cpu")).call(lambda: None)
    assert len(seen) == 1


def test_checkpoint_dtype_reads_either_spelling(tmp_path):
    import json as _json

    (tmp_path / "config.json").write_text(_json.dumps({"torch_dtype": "bfloat16"}))
    assert cli.checkpoint_dtype(tmp_path) == "bfloat16"
    (tmp_path / "config.json").write_text(_json.dumps({"dtype": "float16", "torch_dtype": "bfloat16"}))
    assert cli.checkpoint_dtype(tmp_path) == "float16"
    assert cli.checkpoint_dtype(tmp_path / "missing") is None


def test_threads_are_split_between_shards_unless_omp_num_threads_is_set(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        cores = len(os.sched_getaffinity(0))
        assert cli.configure_threads(2) == max(1, cores // 2)
        assert torch.get_num_threads() == max(1, cores // 2)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert cli.configure_threads(2) == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_extra_command_modules_register_their_subcommands(tmp_path, monkeypatch):
    (tmp_path / "fake_quantize_cli.py").write_text(
        "def register(commands):\n"
        "    p = commands.add_parser('quantize')\n"
        "    p.add_argument('model')\n"
        "    p.set_defaults(func=lambda args: 7)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "broken_tool_cli.py").write_text("raise RuntimeError('tool is broken')\n")
    monkeypatch.setattr(
        cli, "EXTRA_COMMANDS", ("fake_quantize_cli", "no_such_module_here", "broken_tool_cli")
    )
    assert cli.main(["quantize", "m"]) == 7


def test_the_quantize_tool_is_wired_in_when_installed():
    help_text = cli.build_parser().format_help()
    assert "serve" in help_text and "download-weights" in help_text
    if importlib.util.find_spec("text_generation_server.quantize.cli") is not None:
        assert "quantize" in help_text


def wait_for_health(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        if Path(url.removeprefix("unix://")).exists():
            with grpc.insecure_channel(url) as channel:
                try:
                    generate_pb2_grpc.TextGenerationServiceStub(channel).Health(
                        pb.HealthRequest(), timeout=5
                    )
                    return
                except grpc.RpcError:
                    pass
        time.sleep(0.2)
    raise AssertionError("shard did not become healthy")


@pytest.mark.slow  # two shard processes load torch and the model
def test_serve_logs_its_stages_refuses_a_taken_socket_and_stops_cleanly_on_sigterm(
    tiny_llama, short_dir
):
    uds = str(short_dir / "shard")
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1"}
    proc = subprocess.Popen(
        [str(SERVER), "serve", str(tiny_llama), "--uds-path", uds],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        wait_for_health(f"unix://{uds}-0", proc)
        with grpc.insecure_channel(f"unix://{uds}-0") as channel:
            info = generate_pb2_grpc.TextGenerationServiceStub(channel).Info(pb.InfoRequest())
        assert info.architecture == "LlamaForCausalLM"

        second = run(["serve", str(tiny_llama), "--uds-path", uds])
        assert_clean_failure(second, f"{uds}-0", "in use")
        wait_for_health(f"unix://{uds}-0", proc, timeout=10)  # the refused one left it alone

        proc.send_signal(signal.SIGTERM)
        _, log = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log
    assert not Path(f"{uds}-0").exists()
    for stage in (
        "Loading model",
        "dtype float32",
        "kernel",
        "tp plan",
        f"Serving on unix://{uds}-0",
    ):
        assert stage in log, log
    assert "Received SIGTERM" in log and "Traceback" not in log


def test_master_port_in_use_exits_1_naming_the_port(tiny_llama, short_dir):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        result = run(
            ["serve", str(tiny_llama), "--uds-path", str(short_dir / "s"), "--sharded"],
            env={
                "RANK": "0",
                "WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            },
        )
    finally:
        taken.close()
    assert_clean_failure(result, f"master port {port}", "already in use")
    assert not (short_dir / "s-0").exists()
