"""End to end through the real processes: launcher -> router -> shard, on a tiny random model."""

from __future__ import annotations

import math
import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from transformers import AutoModelForCausalLM, AutoTokenizer

from .conftest import ServerProcess, processes_mentioning

pytestmark = pytest.mark.e2e

PROMPTS = ["The capital of France is", "Once upon a time there", "def main():"]


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("tiny-server"), ["--model-id", str(tiny_llama)]).start()
    yield srv
    assert srv.stop() == 0, srv.log_tail()


def stub(server):
    from text_generation_server.pb.fmaas import generation_pb2_grpc

    return generation_pb2_grpc.GenerationServiceStub(grpc.insecure_channel(server.address))


def greedy(max_new_tokens: int, **stopping) -> dict:
    return {
        "method": "GREEDY",
        "stopping": {"maxNewTokens": max_new_tokens, **stopping},
        "response": {"generatedTokens": True, "tokenLogprobs": True, "tokenRanks": True},
    }


def test_health_serving_and_reflection_lists_the_service(server):
    assert server.health() == health_pb2.HealthCheckResponse.SERVING
    assert server.health("fmaas.GenerationService") == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(server.address) as channel:
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in answers[0].list_services_response.service}
    assert "fmaas.GenerationService" in names
    assert "grpc.health.v1.Health" in names


def test_greedy_matches_transformers_through_published_tgis_stubs(server, tiny_llama):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    calls = [
        {"method": "Generate", "request": {"modelId": "any-name", "requests": [{"text": p} for p in PROMPTS], "params": greedy(24)}},
    ]
    [result] = server.tgis(calls)
    assert result["ok"], result
    responses = result["response"]["responses"]
    assert len(responses) == len(PROMPTS)
    for prompt, resp in zip(PROMPTS, responses, strict=True):
        ids = tok(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist()
        assert resp["inputTokenCount"] == ids.shape[1]
        assert resp["generatedTokenCount"] == len(out), (resp, out)
        assert resp.get("text", "") == tok.decode(out, skip_special_tokens=True)
        expected_reason = "EOS_TOKEN" if out[-1] == tok.eos_token_id else "MAX_TOKENS"
        assert resp["stopReason"] == expected_reason
        # logprobs are real log-probabilities of the chosen tokens, greedy picks rank 1
        for info in resp["tokens"]:
            assert info["rank"] == 1
            assert info["logprob"] <= 0 and math.isfinite(info["logprob"])


def test_eight_concurrent_streams_all_complete(server):
    from text_generation_server.pb.fmaas import generation_pb2 as pb

    client = stub(server)
    results: dict[int, list] = {}

    def run(i: int) -> None:
        req = pb.SingleGenerationRequest(
            model_id="m",
            request=pb.GenerationRequest(text=f"Stream number {i} says"),
            params=pb.Parameters(
                method=pb.SAMPLE,
                sampling=pb.SamplingParameters(temperature=0.8, seed=i + 1),
                stopping=pb.StoppingCriteria(max_new_tokens=20, min_new_tokens=20),
            ),
        )
        results[i] = list(client.GenerateStream(req, timeout=300))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == list(range(8))
    for msgs in results.values():
        assert msgs[0].input_token_count > 0
        assert msgs[-1].stop_reason == pb.MAX_TOKENS
        assert msgs[-1].generated_token_count == 20
        assert msgs[-1].seed != 0


def test_request_sent_mid_stream_starts_before_the_first_finishes(server):
    """Continuous batching: a late request joins the running batch at the next step."""
    from text_generation_server.pb.fmaas import generation_pb2 as pb

    client = stub(server)

    def request(text: str, n: int):
        return pb.SingleGenerationRequest(
            request=pb.GenerationRequest(text=text),
            params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=n, min_new_tokens=n)),
        )

    long_stream = client.GenerateStream(request("A long story", 200), timeout=300)
    events: list[tuple[str, float]] = []
    seen_first = 0
    late_thread = None
    for msg in long_stream:
        if msg.generated_token_count > 0:
            seen_first += 1
        if seen_first == 3 and late_thread is None:

            def late() -> None:
                for m in client.GenerateStream(request("Short one", 5), timeout=300):
                    if m.generated_token_count > 0:
                        events.append(("late-first-token", time.monotonic()))
                        return

            late_thread = threading.Thread(target=late)
            late_thread.start()
        if msg.stop_reason != pb.NOT_FINISHED:
            events.append(("long-finished", time.monotonic()))
    late_thread.join()
    order = [name for name, _ in sorted(events, key=lambda e: e[1])]
    assert order == ["late-first-token", "long-finished"], events


@pytest.mark.parametrize(
    "params, field",
    [
        ({"stopping": {"maxNewTokens": 100000}}, "max_new_tokens"),
        ({"stopping": {"maxNewTokens": 5, "minNewTokens": 10}}, "min_new_tokens"),
        ({"stopping": {"stopSequences": ["a", "b", "c", "d", "e", "f", "g"]}}, "stop_sequences"),
        ({"method": "SAMPLE", "sampling": {"temperature": -1.0}}, "temperature"),
        ({"method": "SAMPLE", "sampling": {"temperature": "NaN"}}, "temperature"),
        ({"method": "SAMPLE", "sampling": {"topP": 1.5}}, "top_p"),
    ],
)
def test_bad_request_is_invalid_argument_and_server_keeps_serving(server, params, field):
    [bad, good] = server.tgis(
        [
            {"method": "Generate", "request": {"requests": [{"text": "hello"}], "params": params}},
            {"method": "Generate", "request": {"requests": [{"text": "hello"}], "params": greedy(2)}},
        ]
    )
    assert not bad["ok"] and bad["code"] == "INVALID_ARGUMENT", bad
    assert field in bad["details"], bad
    assert good["ok"], good


def test_empty_text_and_too_long_input_are_rejected(server):
    long_text = "word " * 1000
    [empty, too_long, truncated] = server.tgis(
        [
            {"method": "Generate", "request": {"requests": [{"text": ""}], "params": greedy(2)}},
            {"method": "Generate", "request": {"requests": [{"text": long_text}], "params": greedy(2)}},
            {"method": "Generate", "request": {"requests": [{"text": long_text}], "params": {**greedy(2), "truncateInputTokens": 20}}},
        ]
    )
    assert empty["code"] == "INVALID_ARGUMENT", empty
    assert too_long["code"] == "INVALID_ARGUMENT" and "input" in too_long["details"].lower(), too_long
    assert truncated["ok"], truncated
    assert truncated["response"]["responses"][0]["inputTokenCount"] == 20


def test_tokenize_and_model_info(server, tiny_llama):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    [tokenized, info] = server.tgis(
        [
            {"method": "Tokenize", "request": {"requests": [{"text": "café 東京"}], "returnTokens": True, "returnOffsets": True}},
            {"method": "ModelInfo", "request": {"modelId": "whatever"}},
        ]
    )
    assert tokenized["ok"], tokenized
    resp = tokenized["response"]["responses"][0]
    enc = tok("café 東京", return_offsets_mapping=True)
    assert resp["tokenCount"] == len(enc.input_ids)
    assert resp["tokens"] == tok.convert_ids_to_tokens(enc.input_ids)
    assert [(o.get("start", 0), o.get("end", 0)) for o in resp["offsets"]] == [tuple(o) for o in enc.offset_mapping]
    assert info["ok"] and info["response"].get("modelKind", "DECODER_ONLY") == "DECODER_ONLY"
    assert int(info["response"]["maxSequenceLength"]) > 0


def test_sigterm_stops_everything_and_leaves_no_socket(tiny_llama, tmp_path):
    srv = ServerProcess(tmp_path, ["--model-id", str(tiny_llama)]).start()
    assert srv.stop() == 0, srv.log_tail()
    assert not list(tmp_path.glob("shard*")), list(tmp_path.iterdir())
    time.sleep(0.5)
    assert processes_mentioning(srv.uds_path) == []


def test_a_dead_shard_stops_the_launch_with_nonzero_exit(tiny_llama, tmp_path):
    import os
    import signal

    srv = ServerProcess(tmp_path, ["--model-id", str(tiny_llama)]).start()
    [shard_pid] = [p for p in processes_mentioning(srv.uds_path) if b"\0serve\0" in open(f"/proc/{p}/cmdline", "rb").read()]
    os.kill(shard_pid, signal.SIGKILL)
    rc = srv.proc.wait(timeout=60)
    assert rc != 0, srv.log_tail()
    time.sleep(0.5)
    assert processes_mentioning(srv.uds_path) == []


def test_two_shards_give_the_same_greedy_text_as_transformers(tiny_llama_tied, tmp_path):
    """--sharded true --num-shard 2 on a 6-head / 3-KV-head model (an uneven GQA split)."""
    tok = AutoTokenizer.from_pretrained(tiny_llama_tied)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_tied, dtype=torch.float32)
    srv = ServerProcess(tmp_path, ["--model-id", str(tiny_llama_tied), "--sharded", "true", "--num-shard", "2"]).start()
    try:
        [result] = srv.tgis(
            [{"method": "Generate", "request": {"requests": [{"text": p} for p in PROMPTS], "params": greedy(16)}}]
        )
    finally:
        assert srv.stop() == 0, srv.log_tail()
    assert result["ok"], result
    for prompt, resp in zip(PROMPTS, result["response"]["responses"], strict=True):
        ids = tok(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:].tolist()
        assert resp.get("text", "") == tok.decode(out, skip_special_tokens=True)
    assert not list(tmp_path.glob("shard-*"))
