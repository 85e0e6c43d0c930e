"""`make bench` ratio arithmetic: per-round ratios, medians, targets, unavailable rows."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from bench_report import Contestant, floors, ratios, summary_text, write_json  # noqa: E402

META = {
    "started_at": "20260101T000000Z",
    "settings": {"threads": 2, "new_tokens": 8, "prompt_tokens": 4, "streams": 16, "ttft_prompt_tokens": 512,
                 "rounds": 3},
    "load_average": {"start": [1.0, 1.0, 1.0], "end": [2.0, 2.0, 2.0]},
    "host": {"cores": 2, "cpu_capability": "AVX2"},
}


def rows() -> list[Contestant]:
    ours = Contestant("ours_gptq", "ours GPTQ", True, "4bit", single_stream_tok_s=[100, 40, 90],
                      batched_tok_s=[300, 300, 300], ttft_s=[0.2, 0.5, 0.3],
                      grpc_per_token_ms=[11, 22, 10.5], shard_per_token_ms=[10, 20, 10],
                      http_per_token_ms=[11, 20, 21], http_ttft_s=[0.2, 0.55, 0.3])
    missing = Contestant("ours_fp32", "ours fp32", True, "fp32", why_unavailable="did not start")
    tf = Contestant("transformers", "transformers fp32", False, "fp32", single_stream_tok_s=[20, 10, 30],
                    batched_tok_s=[100, 200, 150], ttft_s=[1.0, 1.0, 0.5])
    lc = Contestant("llama_cpp", "llama.cpp Q4_1", False, "4bit", why_unavailable="not installed")
    return [ours, missing, tf, lc]


def test_ratios_are_taken_within_each_round_then_the_median():
    by_name = {r.name: r for r in ratios(rows(), 16, 512)}
    single = by_name["single-stream decode: ours GPTQ / transformers fp32"]
    assert single.values == [5.0, 4.0, 3.0] and single.value == 4.0 and single.met
    batched = by_name["16 streams total tok/s: ours GPTQ / transformers fp32 static batch"]
    assert batched.value == 2.0 and batched.met
    ttft = by_name["TTFT 512-token prompt: ours GPTQ / transformers fp32"]
    assert ttft.values == [0.2, 0.5, 0.6] and ttft.value == 0.5 and ttft.met
    overhead = by_name["server overhead (gRPC+router vs shard Decode): ours GPTQ"]
    assert overhead.values == pytest.approx([0.1, 0.1, 0.05]) and not overhead.met
    http = by_name["single-stream tok/s, HTTP / gRPC: ours GPTQ"]  # gRPC ms / HTTP ms
    assert http.values == pytest.approx([1.0, 1.1, 0.5]) and http.value == 1.0 and http.met
    http_ttft = by_name["TTFT 512-token prompt, HTTP / gRPC: ours GPTQ"]
    assert http_ttft.values == pytest.approx([1.0, 1.1, 1.0]) and http_ttft.met


def test_unavailable_rows_give_no_ratio_but_are_listed_with_their_reason():
    names = [r.name for r in ratios(rows(), 16, 512)]
    assert not any("ours fp32" in n or "llama.cpp" in n for n in names)
    text = summary_text(rows(), ratios(rows(), 16, 512), floors(rows()), META)
    assert "ours fp32                    unavailable: did not start" in text
    assert "llama.cpp Q4_1               unavailable: not installed" in text
    assert "load average (1, 5, 15 min): start [1.0, 1.0, 1.0], end [2.0, 2.0, 2.0]" in text


def test_floor_fraction_uses_the_weight_format_of_each_row():
    by_name = {f["name"]: f for f in floors(rows())}
    assert by_name["ours GPTQ"]["floor_tok_s"] == 640 and by_name["ours GPTQ"]["fraction_of_floor"] == 90 / 640
    assert by_name["transformers fp32"]["floor_tok_s"] == 80


def test_json_carries_every_contestant_ratio_and_the_load(tmp_path):
    path = tmp_path / "r.json"
    write_json(path, rows(), ratios(rows(), 16, 512), floors(rows()), META)
    doc = json.loads(path.read_text())
    assert set(doc["contestants"]) == {"ours_gptq", "ours_fp32", "transformers", "llama_cpp"}
    assert doc["contestants"]["ours_fp32"]["available"] is False
    assert doc["contestants"]["ours_gptq"]["median"]["single_stream_tok_s"] == 90
    assert doc["load_average"]["end"] == [2.0, 2.0, 2.0]
    assert all({"name", "value", "per_round", "target", "met"} <= set(r) for r in doc["ratios"])


def test_each_row_is_held_against_the_llama_cpp_peer_of_its_weight_format():
    """4-bit rows against llama.cpp's 4-bit GGUF, dense rows (float32, 16-bit) against its F16 one."""
    gptq = Contestant("ours_gptq", "ours GPTQ", True, "4bit", single_stream_tok_s=[100], batched_tok_s=[300])
    bf16 = Contestant("ours_bf16", "ours bf16", True, "16bit", single_stream_tok_s=[60], batched_tok_s=[400])
    q4 = Contestant("llama_cpp", "llama.cpp Q4_1", False, "4bit", single_stream_tok_s=[50], batched_tok_s=[200])
    f16 = Contestant("llama_cpp_f16", "llama.cpp F16", False, "16bit", single_stream_tok_s=[40],
                     batched_tok_s=[200])
    by_name = {r.name: r for r in ratios([gptq, bf16, q4, f16], 16, 512)}
    assert by_name["single-stream decode: ours GPTQ / llama.cpp Q4_1"].value == 2.0
    assert by_name["single-stream decode: ours bf16 / llama.cpp F16"].value == 1.5
    assert by_name["16 streams total tok/s: ours bf16 / llama.cpp F16 batched"].value == 2.0
    assert not any("ours bf16 / llama.cpp Q4_1" in n or "GPTQ / llama.cpp F16" in n for n in by_name)
    assert {f["name"]: f["floor_tok_s"] for f in floors([bf16])} == {"ours bf16": 160}
