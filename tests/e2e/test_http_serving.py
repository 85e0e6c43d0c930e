"""The HTTP API of a real launch (tiny random Llama): the README's lines as written, HTTP against gRPC.

One launcher serves the module. The README's `curl` lines and its Python
block run verbatim with only the port changed; every route gives the same
greedy tokens, text and logprobs as the gRPC API for the same request (both
go to the same shards, so they must agree exactly, not within a tolerance).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import grpc
import pytest
import requests
from readme_text import code_blocks, sections
from text_generation_server.pb.fmaas import generation_pb2 as pb
from text_generation_server.pb.fmaas import generation_pb2_grpc
from transformers import AutoTokenizer

from .conftest import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("http-server"), ["--model-id", str(tiny_llama)]).start()
    yield srv
    assert srv.stop() == 0, srv.log_tail()


def base(server) -> str:
    return f"http://127.0.0.1:{server.http_port}"


def grpc_generate(server, text: str, max_new: int, *, prompt_tokens: bool = False) -> pb.GenerationResponse:
    with grpc.insecure_channel(server.address) as channel:
        return generation_pb2_grpc.GenerationServiceStub(channel).Generate(
            pb.BatchedGenerationRequest(
                requests=[pb.GenerationRequest(text=text)],
                params=pb.Parameters(
                    stopping=pb.StoppingCriteria(max_new_tokens=max_new),
                    response=pb.ResponseOptions(generated_tokens=True, token_logprobs=True,
                                                input_tokens=prompt_tokens),
                ),
            ),
            timeout=120,
        ).responses[0]


def readme_http_section() -> str:
    return sections()["HTTP API"]


def test_readme_curl_lines_run_as_written(server):
    blocks = code_blocks(readme_http_section(), "sh")
    lines = [line for line in blocks[0].replace("\\\n", " ").splitlines() if line.strip()]
    assert len(lines) == 3 and all(line.startswith("curl localhost:3000/") for line in lines)
    outputs = []
    for line in lines:
        command = line.replace("localhost:3000", f"127.0.0.1:{server.http_port}")
        done = subprocess.run(["bash", "-c", command + " --fail-with-body -sS"], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, (command, done.stdout, done.stderr)
        outputs.append(done.stdout)
    generated = json.loads(outputs[0])["generated_text"]
    assert generated == grpc_generate(server, "The capital of France is", 20).text
    events = [json.loads(line[5:]) for line in outputs[1].splitlines() if line.startswith("data:")]
    assert len(events) == events[-1]["details"]["generated_tokens"] and events[-1]["generated_text"] == generated
    chat = json.loads(outputs[2])
    assert chat["object"] == "chat.completion" and chat["usage"]["completion_tokens"] <= 20


def test_readme_python_block_runs_as_written(server, tiny_llama):
    [block] = code_blocks(readme_http_section(), "python")
    program = block.replace("localhost:3000", f"127.0.0.1:{server.http_port}")
    # huggingface_hub refuses every URL, local ones too, under HF_HUB_OFFLINE.
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is deep learning?"}], tokenize=False,
                                     add_generation_prompt=True)
    chat = requests.post(f"{base(server)}/v1/completions", json={
        "prompt": prompt, "max_tokens": 20, "temperature": 0}, timeout=120).json()
    expected = grpc_generate(server, "The capital of France is", 20).text + "\n"
    assert done.stdout.startswith(expected)
    # The chat's answer is the completion of its template's prompt (the tiny tokenizer adds no BOS).
    assert done.stdout[len(expected):] == chat["choices"][0]["text"] + "\n"


def test_every_route_gives_grpcs_tokens_and_logprobs(server):
    text = "def main():"
    reference = grpc_generate(server, text, 8, prompt_tokens=True)
    details = requests.post(f"{base(server)}/generate", json={"inputs": text, "parameters": {
        "max_new_tokens": 8, "details": True, "decoder_input_details": True}}, timeout=120).json()
    assert details["generated_text"] == reference.text
    assert [t["logprob"] for t in details["details"]["tokens"]] == pytest.approx(
        [t.logprob for t in reference.tokens], abs=0)
    assert [t["logprob"] for t in details["details"]["prefill"][1:]] == pytest.approx(
        [t.logprob for t in reference.input_tokens[1:]], abs=0)
    stream = requests.post(f"{base(server)}/generate_stream", json={"inputs": text, "parameters": {
        "max_new_tokens": 8}}, stream=True, timeout=120)
    events = [json.loads(line[5:]) for line in stream.iter_lines() if line.startswith(b"data:")]
    assert events[-1]["generated_text"] == reference.text
    assert [e["token"]["logprob"] for e in events] == pytest.approx([t.logprob for t in reference.tokens], abs=0)
    completion = requests.post(f"{base(server)}/v1/completions", json={
        "prompt": text, "max_tokens": 8, "temperature": 0, "logprobs": 0}, timeout=120).json()
    assert completion["choices"][0]["text"] == reference.text
    assert completion["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(
        [t.logprob for t in reference.tokens], abs=0)


def test_openai_sdk_streams_a_chat_and_the_metrics_count_each_api(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{base(server)}/v1", api_key="-")
    messages = [{"role": "user", "content": "hello"}]
    whole = client.chat.completions.create(model="m", messages=messages, max_tokens=6, temperature=0)
    chunks = list(client.chat.completions.create(model="m", messages=messages, max_tokens=6, temperature=0,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    metrics = requests.get(f"{base(server)}/metrics", timeout=10).text
    for api in ("http", "openai", "grpc"):
        assert f'api="{api}"' in metrics, api


SYSTEM_PROMPT = (
    "You are a careful assistant for a railway company. Answer questions about timetables, tickets, "
    "delays and refunds briefly and politely, and say when you do not know."
)


def metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_a_shared_system_prompt_is_served_from_the_prefix_cache_with_the_same_answer(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{base(server)}/v1", api_key="-")
    before = requests.get(f"{base(server)}/metrics", timeout=10).text

    def ask(question: str):
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
        return client.chat.completions.create(model="m", messages=messages, max_tokens=8, temperature=0,
                                              logprobs=True)

    first = ask("When does the last train leave?")
    again = ask("When does the last train leave?")
    other = ask("Can I get a refund?")
    assert first.usage.prompt_tokens > 48
    # The repeated chat reuses every full block but the one holding its last token; the other
    # question shares the system prompt's blocks.
    assert again.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 16
    assert 16 <= other.usage.prompt_tokens_details.cached_tokens < other.usage.prompt_tokens
    assert again.choices[0].message.content == first.choices[0].message.content
    assert [t.logprob for t in again.choices[0].logprobs.content] == pytest.approx(
        [t.logprob for t in first.choices[0].logprobs.content], abs=1e-4)
    after = requests.get(f"{base(server)}/metrics", timeout=10).text
    reused = metric(after, "tgi_prefix_cache_reused_tokens_total") - metric(before, "tgi_prefix_cache_reused_tokens_total")
    assert reused == again.usage.prompt_tokens_details.cached_tokens + other.usage.prompt_tokens_details.cached_tokens
    assert metric(after, "tgi_prefix_cache_hits_total") - metric(before, "tgi_prefix_cache_hits_total") >= 2
    assert 0 < metric(after, "tgi_prefix_cache_hit_ratio") < 1


def test_chunked_prefill_and_speculation_answer_as_a_whole_prefill_and_plain_greedy(server, tiny_llama, tmp_path):
    """A launch with --max-batch-prefill-tokens 16 (prompts of 50+ tokens arrive in chunks) and
    --speculate 3 gives the default launch's tokens."""
    text = SYSTEM_PROMPT + " Which platform?"
    reference = grpc_generate(server, text, 40, prompt_tokens=True)
    assert len(reference.input_tokens) > 3 * 16
    chunked = ServerProcess(tmp_path, ["--model-id", str(tiny_llama), "--max-batch-prefill-tokens", "16",
                                       "--prefix-caching", "false", "--speculate", "3"]).start()
    try:
        got = grpc_generate(chunked, text, 40, prompt_tokens=True)
        stream = requests.post(f"http://127.0.0.1:{chunked.http_port}/generate", json={"inputs": text, "parameters": {
            "max_new_tokens": 40, "details": True}}, timeout=120).json()
    finally:
        assert chunked.stop() == 0, chunked.log_tail()
    assert "speculative decoding of up to 3 n-gram tokens per step" in chunked.log_tail(400)
    assert [t.text for t in got.tokens] == [t.text for t in reference.tokens]
    assert [t.logprob for t in got.tokens] == pytest.approx([t.logprob for t in reference.tokens], abs=1e-4)
    assert [t.logprob for t in got.input_tokens[1:]] == pytest.approx(
        [t.logprob for t in reference.input_tokens[1:]], abs=1e-4)
    assert stream["generated_text"] == reference.text
