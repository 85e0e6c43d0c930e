"""Start-up faults through the real launcher: each ends in a clear message and a non-zero exit, quickly.

Every row launches ``text-generation-launcher`` on a broken tiny checkpoint
(or a taken port, an unusable cache directory, a model larger than memory)
and checks: exit code != 0, within a bound that rules out a hang in a
collective, the log names what is wrong, and nothing is left behind (no
process still mentioning the launch's socket path, no socket file).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from .conftest import LAUNCHER, free_port, processes_mentioning

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# Seconds a failing launch may take in all (torch imports in every shard on a busy host); the
# process group's timeout is 120 s, so a hang in a collective would show.
FAIL_WITHIN = 100.0
# Seconds from the first error logged to the launcher's last line: the fault stops everything at once.
STOP_WITHIN = 15.0


@dataclass
class Outcome:
    code: int
    seconds: float
    log: str

    @property
    def error_to_exit(self) -> float:
        """Seconds between the first ERROR line and the last line of the log."""
        stamps = [
            (datetime.fromisoformat(line.split()[0]), " ERROR " in line)
            for line in self.log.splitlines()
            if line[:4].isdigit() and "T" in line[:11]
        ]
        first_error = next(t for t, is_error in stamps if is_error)
        return (stamps[-1][0] - first_error).total_seconds()


def launch_and_wait(tmp: Path, args: list[str], env: dict[str, str] | None = None) -> Outcome:
    uds = str(tmp / "sock" / "shard")
    (tmp / "sock").mkdir(mode=0o700, exist_ok=True)
    argv = [
        str(LAUNCHER),
        "--grpc-port", str(free_port()),
        "--port", str(free_port()),
        "--master-port", str(free_port()),
        "--shard-uds-path", uds,
        *args,
    ]
    started = time.monotonic()
    try:
        out = subprocess.run(
            argv, env={**os.environ, **(env or {})}, capture_output=True, timeout=FAIL_WITHIN * 3
        )
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"launcher still running after {FAIL_WITHIN * 3:.0f} s: {err.stdout!r}") from None
    seconds = time.monotonic() - started
    log = (out.stdout + out.stderr).decode(errors="replace")
    time.sleep(0.3)
    assert processes_mentioning(uds) == [], log
    assert list((tmp / "sock").iterdir()) == [], log
    return Outcome(out.returncode, seconds, log)


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_tensors(model: Path, change: Callable[[dict], None]) -> None:
    tensors = load_file(model / "model.safetensors")
    change(tensors)
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})


def missing_tensor(model: Path) -> None:
    edit_tensors(model, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))


def bad_shape(model: Path) -> None:
    def change(t: dict) -> None:
        t["model.layers.0.self_attn.o_proj.weight"] = t["model.layers.0.self_attn.o_proj.weight"][:, :48].clone()

    edit_tensors(model, change)


def corrupt_header(model: Path) -> None:
    path = model / "model.safetensors"
    data = bytearray(path.read_bytes())
    header_len = struct.unpack("<Q", data[:8])[0]
    data[8 : 8 + header_len] = b"#" * header_len
    path.write_bytes(bytes(data))


def truncated(model: Path) -> None:
    path = model / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def unsupported_architecture(model: Path) -> None:
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    config["model_type"] = "gpt2"
    (model / "config.json").write_text(json.dumps(config))


def no_tokenizer(model: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model / name).unlink(missing_ok=True)


def larger_than_memory(model: Path) -> None:
    """Add a 256 GiB tensor as a sparse file: a real checkpoint no host here can hold."""
    path = model / "model.safetensors"
    data = path.read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + header_len])
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    huge = 256 * 2**30
    header["model.extra.weight"] = {"dtype": "F32", "shape": [huge // 4], "data_offsets": [end, end + huge]}
    new_header = json.dumps(header).encode()
    new_header += b" " * (-len(new_header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(new_header)) + new_header + data[8 + header_len :])
        f.truncate(8 + len(new_header) + end + huge)


def memory_refusal(model: Path, shards: int) -> list[str]:
    """The refusal's own words and its per-shard figure, computed from the file itself.

    Every tensor of the tiny checkpoint (and the added one) is F32 and served
    in float32 on the CPU, so the weights take exactly the file's data bytes.
    """
    path = model / "model.safetensors"
    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(header_len))
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F32"}
    per_shard = -(-(path.stat().st_size - 8 - header_len) // shards)
    return [
        "model too large for memory:",
        f"each shard needs {per_shard / 2**30:.2f} GiB for its weights",
        f"in float32 over {shards} shards) but only",
        "is available to it",
    ]


def two_heads_two_kv_heads(model: Path) -> None:
    """2 query heads with a KV head each cannot go to 3 ranks: two would share one query head."""
    from tiny_model import build_tiny_llama

    build_tiny_llama(model, num_attention_heads=2, num_key_value_heads=2)


CHECKPOINT_FAULTS = [
    # (id, break the checkpoint, shards, words the log must contain, or a function of (model, shards) giving them)
    ("missing-tensor", missing_tensor, 2, ["missing 1 tensor", "model.layers.1.mlp.down_proj.weight"]),
    ("bad-shape", bad_shape, 2, ["model.layers.0.self_attn.o_proj.weight", "shape"]),
    ("corrupt-header", corrupt_header, 1, ["model.safetensors"]),
    ("truncated", truncated, 2, ["model.safetensors"]),
    ("unsupported-architecture", unsupported_architecture, 1, ["GPT2LMHeadModel", "LlamaForCausalLM"]),
    ("missing-tokenizer", no_tokenizer, 1, ["tokenizer"]),
    ("larger-than-memory", larger_than_memory, 2, memory_refusal),
    ("impossible-head-split", two_heads_two_kv_heads, 3,
     ["num_attention_heads=2", "num_key_value_heads=2", "world_size=3"]),
]


@pytest.mark.parametrize(
    "name, breaker, shards, needles", CHECKPOINT_FAULTS, ids=[row[0] for row in CHECKPOINT_FAULTS]
)
def test_broken_checkpoint_stops_the_launch_with_its_error(
    tiny_llama, tmp_path, name, breaker, shards, needles, record_property
):
    model = copy_model(tiny_llama, tmp_path / "model")
    breaker(model)
    args = ["--model-id", str(model)]
    if shards > 1:
        args += ["--sharded", "true", "--num-shard", str(shards)]
    result = launch_and_wait(tmp_path, args)
    assert result.code != 0, result.log
    assert result.seconds < FAIL_WITHIN, result.log
    assert result.error_to_exit < STOP_WITHIN, result.log[-3000:]
    if callable(needles):
        needles = needles(model, shards)
    for needle in needles:
        assert needle in result.log, (needle, result.log[-3000:])
    assert "Traceback" not in result.log, result.log[-3000:]
    assert "Ready:" not in result.log
    record_property(
        f"figures: start-up fault {name}",
        f"exit {result.code} after {result.seconds:.1f} s, {result.error_to_exit:.1f} s from the first error",
    )


def test_a_failing_shard_is_named_in_the_launchers_error(tiny_llama, tmp_path):
    model = copy_model(tiny_llama, tmp_path / "model")
    missing_tensor(model)
    result = launch_and_wait(tmp_path, ["--model-id", str(model), "--sharded", "true", "--num-shard", "2"])
    assert result.code == 1
    errors = [line for line in result.log.splitlines() if "ERROR" in line]
    assert any("shard-" in line and "down_proj" in line for line in errors), errors
    assert any("launcher" in line and "shard" in line and "start-up" in line for line in errors), errors


def test_a_kv_cache_larger_than_memory_stops_the_launch_at_warmup(tiny_llama, tmp_path):
    # Warmup sizes the cache before the router serves: the shortfall shows at start, with numbers.
    result = launch_and_wait(tmp_path, ["--model-id", str(tiny_llama), "--max-batch-total-tokens", "4000000000"])
    assert result.code != 0, result.log
    assert result.seconds < FAIL_WITHIN, result.log
    for needle in ("KV cache of", "GiB", "--max-batch-total-tokens"):
        assert needle in result.log, (needle, result.log[-3000:])
    assert "Traceback" not in result.log, result.log[-3000:]
    assert "Ready:" not in result.log


@pytest.mark.parametrize("flag", ["--grpc-port", "--master-port", "--port"])
def test_a_taken_port_is_refused_by_name_before_any_shard_starts(tiny_llama, tmp_path, flag):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = launch_and_wait(
            tmp_path, ["--model-id", str(tiny_llama), "--sharded", "true", "--num-shard", "2", flag, str(port)]
        )
    assert result.code == 1, result.log
    assert f"port {port}" in result.log and flag in result.log, result.log
    assert "Starting shard" not in result.log
    assert result.seconds < 20, result.log


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the launcher as another user, which needs root")
def test_a_cache_directory_the_service_user_cannot_write_is_named(tmp_path):
    import tempfile

    nobody = 65534
    try:
        subprocess.run([str(LAUNCHER), "--help"], user=nobody, capture_output=True, timeout=60, check=True)
    except (PermissionError, subprocess.CalledProcessError) as e:
        pytest.skip(f"an unprivileged user cannot run this checkout's launcher ({e})")
    # Other users must be able to reach everything but the cache (pytest's tmp dirs are 0700).
    root = Path(tempfile.mkdtemp(prefix="tgi-cache-perm-"))
    try:
        os.chmod(root, 0o755)
        cache, home, sockets = root / "cache", root / "home", root / "sock"
        cache.mkdir(mode=0o755)  # root's: nobody may read it, not write it
        home.mkdir()
        sockets.mkdir(mode=0o700)
        for d in (home, sockets):
            os.chown(d, nobody, nobody)
        argv = [str(LAUNCHER), "--grpc-port", str(free_port()), "--port", str(free_port()),
                "--master-port", str(free_port()), "--shard-uds-path", str(sockets / "shard")]
        env = {**os.environ, "HOME": str(home), "TEXT_GENERATION_CACHE": str(cache)}
        out = subprocess.run(argv, env=env, user=nobody, capture_output=True, timeout=FAIL_WITHIN * 3)
        log = (out.stdout + out.stderr).decode(errors="replace")
        assert out.returncode == 1, log
        assert str(cache) in log, log
        assert "Traceback" not in log, log
        assert "Starting shard" not in log
        assert list(cache.iterdir()) == []
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _refuses_new_files(directory: Path) -> bool:
    try:
        (directory / "tgi-probe").touch()
    except OSError:
        return True
    (directory / "tgi-probe").unlink()
    return False


@pytest.mark.skipif(
    not Path("/sys/kernel").is_dir() or not _refuses_new_files(Path("/sys/kernel")),
    reason="needs a directory that refuses new files even to root (sysfs)",
)
def test_an_existing_cache_directory_that_refuses_writes_is_named(tmp_path):
    # The directory exists and passes a permission check for root, yet creating a file in it
    # fails: the launcher must name it at start, not fail mid-conversion.
    cache = Path("/sys/kernel")
    result = launch_and_wait(tmp_path, [], env={"TEXT_GENERATION_CACHE": str(cache)})
    assert result.code == 1, result.log
    assert str(cache) in result.log, result.log
    assert "Traceback" not in result.log, result.log
    assert "Starting shard" not in result.log
    assert result.seconds < FAIL_WITHIN, result.log


def test_an_unusable_cache_directory_is_named_and_leaves_no_partial_checkpoint(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the cache directory should be")
    cache = blocker / "cache"
    result = launch_and_wait(tmp_path, [], env={"TEXT_GENERATION_CACHE": str(cache)})
    assert result.code == 1, result.log
    assert str(cache) in result.log, result.log
    assert "Starting shard" not in result.log
    assert blocker.read_text().startswith("a file")
