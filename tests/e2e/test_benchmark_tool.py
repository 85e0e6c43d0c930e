"""`text-generation-benchmark` against a tiny-model server: output format only, never a speed."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ServerProcess, free_port

pytestmark = pytest.mark.e2e

BENCHMARK = Path(sys.executable).parent / "text-generation-benchmark"
METRIC_KEYS = {
    "prefill_latency_ms",
    "ttft_ms",
    "inter_token_latency_ms",
    "prefill_tokens_per_s",
    "decode_tokens_per_s",
    "total_tokens_per_s",
}
SWEEP = ["-b", "1", "2", "-s", "8", "-d", "4", "-r", "2", "-w", "1"]


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("bench-server"), ["--model-id", str(tiny_llama)]).start()
    yield srv
    assert srv.stop() == 0, srv.log_tail()


def run_tool(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BENCHMARK), *args], capture_output=True, text=True, timeout=timeout)


def table_rows(stdout: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in stdout.splitlines() if line.startswith("| ")]


def check_document(doc: dict, kind: str) -> None:
    assert doc["tool"] == "text-generation-benchmark"
    assert doc["target"]["kind"] == kind
    assert doc["settings"] == {"runs": 2, "warmups": 1}
    assert len(doc["load_average"]["start"]) == 3 and len(doc["load_average"]["end"]) == 3
    assert set(doc["units"]) == METRIC_KEYS
    shapes = [(r["batch_size"], r["prompt_tokens"], r["new_tokens"]) for r in doc["results"]]
    assert shapes == [(1, 8, 4), (2, 8, 4)]
    for result in doc["results"]:
        metrics = result["metrics"]
        assert set(metrics) == METRIC_KEYS
        batch = result["batch_size"]
        # one value per run, per request, or per token gap of each request
        assert metrics["prefill_latency_ms"]["n"] == 2
        assert metrics["ttft_ms"]["n"] == 2 * batch
        assert metrics["inter_token_latency_ms"]["n"] == 2 * batch * 3
        for summary in metrics.values():
            assert set(summary) == {"n", "mean", "min", "max", "p50", "p90", "p99"}
            assert 0 < summary["min"] <= summary["p50"] <= summary["p90"] <= summary["p99"] <= summary["max"]
            assert summary["min"] <= summary["mean"] <= summary["max"]


def test_server_sweep_prints_a_table_and_writes_json_with_percentiles(server, tmp_path):
    out = tmp_path / "server.json"
    result = run_tool("--server", server.address, *SWEEP, "--json-output", str(out))
    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout)
    assert rows[0] == ["batch", "prompt", "new", "metric", "unit", "mean", "p50", "p90", "p99"]
    body = rows[1:]
    assert len(body) == 2 * 6
    assert {r[3] for r in body} == {
        "prefill latency",
        "time to first token",
        "inter-token latency",
        "prefill throughput",
        "decode throughput",
        "generated tokens/s",
    }
    assert {(r[0], r[1], r[2]) for r in body} == {("1", "8", "4"), ("2", "8", "4")}
    assert "load average" in result.stdout
    assert "100%" in result.stderr  # the progress bar reached the end
    check_document(json.loads(out.read_text()), "server")


def test_shard_sweep_reports_the_model_behind_the_socket(server, tmp_path):
    out = tmp_path / "shard.json"
    result = run_tool("--shard-uds-path", server.uds_path, *SWEEP, "--json-output", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert len(table_rows(result.stdout)) == 1 + 2 * 6
    doc = json.loads(out.read_text())
    check_document(doc, "shard")
    assert doc["target"]["world_size"] == 1
    assert doc["target"]["dtype"] == "float32"


def test_server_keeps_serving_after_a_shard_benchmark(server):
    """The tool clears only its own batches, so the router's traffic is unaffected."""
    assert run_tool("--shard-uds-path", server.uds_path, "-b", "2", "-s", "4", "-d", "2", "-r", "1",
                    "--no-progress").returncode == 0
    [answer] = server.tgis([{"method": "Generate", "request": {"requests": [{"text": "hello"}],
                                                               "params": {"stopping": {"maxNewTokens": 3}}}}])
    assert answer["ok"], answer


def test_unreachable_server_fails_fast_with_one_clear_line():
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = run_tool("--server", address, "--connect-timeout", "2", "--no-progress", timeout=60)
    assert result.returncode == 1
    assert time.monotonic() - started < 30
    assert address in result.stderr and "text-generation-launcher" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_shard_socket_names_the_path(tmp_path):
    result = run_tool("--shard-uds-path", str(tmp_path / "nowhere"), "--connect-timeout", "1", timeout=60)
    assert result.returncode == 1
    assert str(tmp_path / "nowhere") + "-0" in result.stderr
    assert "Traceback" not in result.stderr


def test_shape_beyond_the_server_limit_is_refused_before_running(server):
    result = run_tool("--server", server.address, "-s", "100000", "-d", "4", "--no-progress")
    assert result.returncode == 1
    assert "max sequence length" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("flags", [["-b", "0"], ["--runs", "x"], ["--server", "a:1", "--shard-uds-path", "/tmp/x"]])
def test_bad_flags_exit_2(flags):
    result = run_tool(*flags, timeout=60)
    assert result.returncode == 2
    assert "usage: text-generation-benchmark" in result.stderr
