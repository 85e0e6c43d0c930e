"""The HTTP API (TGI's routes and the OpenAI-compatible ones) against an in-process fake shard.

Driven with the clients TGI users have: HF's `text-generation` client,
huggingface_hub's InferenceClient and the openai SDK, plus plain HTTP for the
error shapes. The shard is the fake of fake_shard.py (a formula, no torch), so
every expected token is known exactly; the real model is exercised over HTTP
by tests/e2e/test_http_serving.py.
"""

from __future__ import annotations

import http.client
import json
import socket
import time

import pytest
import requests
from fake_shard import FakeModel, RouterHarness, make_tokenizer_dir
from text_generation_server.pb.fmaas import generation_pb2 as pb
from transformers import AutoTokenizer

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return make_tokenizer_dir(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tokenizer_dir):
    """One router for the tests that change nothing about it."""
    tmp = tmp_path_factory.mktemp("shared")
    h = RouterHarness(tmp, tokenizer_dir, FakeModel()).start()
    yield h
    h.close()


@pytest.fixture
def harness(tmp_path, tokenizer_dir):
    started: list[RouterHarness] = []

    def _make(model: FakeModel | None = None, *, start: bool = True, **router_args) -> RouterHarness:
        path = tmp_path / f"h{len(started)}"
        path.mkdir()
        h = RouterHarness(path, tokenizer_dir, model or FakeModel(), **router_args)
        started.append(h)
        return h.start() if start else h

    yield _make
    for h in started:
        h.close()


def url(h: RouterHarness, path: str = "") -> str:
    return f"http://127.0.0.1:{h.router.http_port}{path}"


def grpc_greedy(h: RouterHarness, text: str, max_new: int) -> pb.GenerationResponse:
    request = pb.BatchedGenerationRequest(
        requests=[pb.GenerationRequest(text=text)],
        params=pb.Parameters(
            stopping=pb.StoppingCriteria(max_new_tokens=max_new), response=pb.ResponseOptions(generated_tokens=True)
        ),
    )
    return h.stub().Generate(request, timeout=10).responses[0]


def sse_events(response: requests.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith(b"data:"):
            data = line[len(b"data:"):].strip()
            events.append(data.decode() if data == b"[DONE]" else json.loads(data))
    return events


# ---- TGI's routes through HF's text-generation client ----------------------------------------


def test_text_generation_client_generate_matches_grpc_with_every_detail(shared, hf_tokenizer):
    from text_generation import Client

    client = Client(url(shared), timeout=10)
    answer = client.generate(
        "Hello world", max_new_tokens=6, decoder_input_details=True, top_n_tokens=2
    )
    reference = grpc_greedy(shared, "Hello world", 6)
    assert answer.generated_text == reference.text
    details = answer.details
    assert details.finish_reason == "length" and details.generated_tokens == 6 and details.seed is None
    ids = hf_tokenizer("Hello world").input_ids
    assert [t.id for t in details.prefill] == ids
    assert details.prefill[0].logprob is None  # the first prompt token has no logprob
    assert all(t.logprob is not None and t.logprob < 0 for t in details.prefill[1:])
    assert [t.id for t in details.tokens] == hf_tokenizer.convert_tokens_to_ids([t.text for t in reference.tokens])
    assert hf_tokenizer.decode([t.id for t in details.tokens]) == answer.generated_text
    assert all(not t.special for t in details.tokens)
    # top_n_tokens: n per generated token, the chosen (greedy) token first
    assert len(details.top_tokens) == 6
    for chosen, top in zip(details.tokens, details.top_tokens, strict=True):
        assert len(top) == 2 and top[0].id == chosen.id


def test_text_generation_client_stream_ends_with_generated_text_and_details(shared):
    from text_generation import Client

    client = Client(url(shared), timeout=10)
    events = list(client.generate_stream("Hello world", max_new_tokens=5))
    assert len(events) == 5
    assert all(e.details is None and e.generated_text is None for e in events[:-1])
    last = events[-1]
    assert last.details.finish_reason == "length" and last.details.generated_tokens == 5
    assert last.generated_text == "".join(e.token.text for e in events) == grpc_greedy(shared, "Hello world", 5).text
    plain = requests.post(url(shared, "/generate_stream"), json={"inputs": "Hello world", "parameters": {
        "max_new_tokens": 2}}, stream=True, timeout=10)
    last_plain = sse_events(plain)[-1]
    assert last_plain["details"] is None and last_plain["generated_text"] is not None  # details only when asked


def test_sampling_parameters_seed_and_stop_sequences(shared, hf_tokenizer):
    from text_generation import Client

    client = Client(url(shared), timeout=10)
    a = client.generate("Hello", max_new_tokens=5, do_sample=True, seed=7, temperature=0.7, top_k=20)
    b = client.generate("Hello", max_new_tokens=5, temperature=0.7, top_k=20, seed=7)  # a warper implies sampling
    assert a.details.seed == 7 and a.generated_text == b.generated_text
    random_seed = client.generate("Hello", max_new_tokens=2, top_p=0.9)
    assert random_seed.details.seed is not None and random_seed.details.seed > 0
    # stop: the text ends at (and keeps) the first stop sequence that appears
    full = client.generate("Hello", max_new_tokens=8).generated_text
    stop = full[3:5]
    stopped = client.generate("Hello", max_new_tokens=8, stop_sequences=[stop])
    assert stopped.details.finish_reason == "stop_sequence"
    assert stopped.generated_text == full[: full.index(stop) + len(stop)]
    # return_full_text puts the prompt first; truncate keeps the last tokens of the prompt
    assert client.generate("Hello", max_new_tokens=3, return_full_text=True).generated_text.startswith("Hello")
    truncated = client.generate("Hello world again", max_new_tokens=1, truncate=2, decoder_input_details=True)
    assert len(truncated.details.prefill) == 2


def test_best_of_returns_the_most_likely_sequence_and_the_others(shared):
    answer = requests.post(url(shared, "/generate"), json={
        "inputs": "Hello", "parameters": {"max_new_tokens": 4, "best_of": 2, "do_sample": True, "details": True},
    }, timeout=10).json()
    details = answer["details"]
    others = details["best_of_sequences"]
    assert len(others) == 1
    best = sum(t["logprob"] for t in details["tokens"])
    assert all(best >= sum(t["logprob"] for t in o["tokens"]) for o in others)
    refused = requests.post(url(shared, "/generate"), json={
        "inputs": "Hello", "parameters": {"best_of": 2}}, timeout=10)
    assert refused.status_code == 422 and "sampling" in refused.json()["error"]
    too_many = requests.post(url(shared, "/generate"), json={
        "inputs": "Hello", "parameters": {"best_of": 3, "do_sample": True}}, timeout=10)
    assert too_many.status_code == 422 and "--max-best-of" in too_many.json()["error"]


def test_compat_route_serves_both_and_huggingface_hub_reads_them(shared):
    from huggingface_hub import InferenceClient

    client = InferenceClient(model=url(shared))
    reference = grpc_greedy(shared, "Hello world", 4).text
    assert client.text_generation("Hello world", max_new_tokens=4) == reference
    detailed = client.text_generation("Hello world", max_new_tokens=4, details=True)
    assert detailed.generated_text == reference and detailed.details.generated_tokens == 4
    streamed = list(client.text_generation("Hello world", max_new_tokens=4, stream=True, details=True))
    assert streamed[-1].generated_text == reference
    assert streamed[-1].details.finish_reason == "length"
    plain = list(client.text_generation("Hello world", max_new_tokens=4, stream=True))
    assert "".join(plain) == reference
    # SageMaker endpoints call /invocations, the same route as TGI's
    sagemaker = requests.post(url(shared, "/invocations"), json={"inputs": "Hello world", "parameters": {
        "max_new_tokens": 4}}, timeout=10).json()
    assert sagemaker == [{"generated_text": reference}]


def test_info_tokenize_models_and_openapi(shared, hf_tokenizer):
    info = requests.get(url(shared, "/info"), timeout=10).json()
    assert info["model_id"] == "fake-model" and info["max_total_tokens"] == 256
    assert info["max_input_tokens"] == 255 and info["max_best_of"] == 2 and info["max_client_batch_size"] == 4
    tokens = requests.post(url(shared, "/tokenize"), json={"inputs": "Hello world"}, timeout=10).json()
    assert [t["id"] for t in tokens] == hf_tokenizer("Hello world").input_ids
    assert "".join(t["text"] for t in tokens) == "Hello world"
    assert all("Hello world"[t["start"]:t["stop"]] == t["text"] for t in tokens)
    models = requests.get(url(shared, "/v1/models"), timeout=10).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "fake-model"
    document = requests.get(url(shared, "/api-doc/openapi.json"), timeout=10).json()
    for path in ("/generate", "/generate_stream", "/", "/invocations", "/tokenize", "/info", "/health", "/metrics",
                 "/v1/chat/completions", "/v1/completions", "/v1/models"):
        assert path in document["paths"], path
    docs = requests.get(url(shared, "/docs"), timeout=10)
    assert docs.status_code == 200 and "/api-doc/openapi.json" in docs.text


# ---- OpenAI-compatible routes through the openai SDK and huggingface_hub -----------------------


def test_openai_chat_renders_the_models_template_and_answers(shared, hf_tokenizer):
    from openai import OpenAI

    client = OpenAI(base_url=url(shared, "/v1"), api_key="-")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"}]
    before = len(shared.shard.calls)
    reply = client.chat.completions.create(model="tgi", messages=messages, max_tokens=5, temperature=0,
                                           logprobs=True, top_logprobs=2)
    prompt = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected_ids = hf_tokenizer(prompt, add_special_tokens=False).input_ids
    [prefill] = [req for method, req in shared.shard.calls[before:] if method == "Prefill"]
    assert list(prefill.batch.requests[0].input_ids) == expected_ids
    choice = reply.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert reply.usage.prompt_tokens == len(expected_ids) and reply.usage.completion_tokens == 5
    assert reply.usage.total_tokens == len(expected_ids) + 5
    assert reply.object == "chat.completion" and reply.model == "fake-model"
    content = choice.logprobs.content
    assert len(content) == 5
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == c.logprob for c in content)

    stream = client.chat.completions.create(model="tgi", messages=messages, max_tokens=5, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finished = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finished == ["length"]
    assert chunks[-1].usage.completion_tokens == 5 and not chunks[-1].choices


def test_openai_completions_single_list_stream_and_echo(shared):
    from openai import OpenAI

    client = OpenAI(base_url=url(shared, "/v1"), api_key="-")
    reference = grpc_greedy(shared, "Hello world", 4).text
    one = client.completions.create(model="m", prompt="Hello world", max_tokens=4, temperature=0)
    assert one.choices[0].text == reference and one.choices[0].finish_reason == "length"
    assert one.usage.completion_tokens == 4
    many = client.completions.create(model="m", prompt=["Hello world", "Hello"], max_tokens=4, temperature=0,
                                     logprobs=1, echo=True)
    assert [c.index for c in many.choices] == [0, 1]
    assert many.choices[0].text == "Hello world" + reference
    assert len(many.choices[0].logprobs.tokens) == 4 and many.choices[0].logprobs.text_offset[0] == len("Hello world")
    streamed = client.completions.create(model="m", prompt=["Hello world", "Hello"], max_tokens=4, temperature=0,
                                         stream=True)
    texts = {0: "", 1: ""}
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts[0] == reference
    assert texts[1] == grpc_greedy(shared, "Hello", 4).text
    # OpenAI's default of 16 tokens
    assert client.completions.create(model="m", prompt="Hello", temperature=0).usage.completion_tokens == 16


def test_huggingface_hub_chat_completion_plain_and_streamed(shared):
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=url(shared, "/v1"))
    messages = [{"role": "user", "content": "Hello world"}]
    reply = client.chat_completion(messages, max_tokens=4, temperature=0)
    text = reply.choices[0].message.content
    streamed = "".join(
        c.choices[0].delta.content or "" for c in client.chat_completion(messages, max_tokens=4, temperature=0,
                                                                          stream=True)
    )
    assert streamed == text and reply.usage.completion_tokens == 4


def test_openai_parameters_the_server_cannot_honour_are_refused_by_name(shared):
    def post(body):
        return requests.post(url(shared, "/v1/chat/completions"), json={
            "messages": [{"role": "user", "content": "hi"}], **body}, timeout=10)

    for body, name in [({"n": 2}, "`n`"), ({"presence_penalty": 0.5}, "presence_penalty"),
                       ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
                       ({"top_logprobs": 2}, "logprobs"), ({"temperature": 3}, "temperature"),
                       ({"response_format": {"type": "json_object"}}, "response_format"),
                       ({"messages": [{"role": "tool", "content": "x"}]}, "unknown role tool"),
                       ({"logprobs": True, "top_logprobs": 9}, "top_n_tokens must be <= 5")]:
        answer = post(body)
        assert answer.status_code == 422, body
        assert answer.json()["error_type"] == "validation" and name in answer.json()["error"], answer.json()
    image = post({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})
    assert image.status_code == 422 and "image_url" in image.json()["error"]
    too_many = requests.post(url(shared, "/v1/completions"), json={"prompt": ["a"] * 5}, timeout=10)
    assert too_many.status_code == 422 and "--max-client-batch-size" in too_many.json()["error"]


# ---- errors, limits, security -------------------------------------------------------------------


def test_errors_are_tgi_json_with_tgi_statuses(shared):
    generate = url(shared, "/generate")
    cases = [
        ({"inputs": "Hello", "parameters": {"temperature": 0}}, "temperature"),
        ({"inputs": "Hello", "parameters": {"top_p": 1.5}}, "top_p"),
        ({"inputs": "Hello", "parameters": {"max_new_tokens": 5000}}, "max_new_tokens must be <= 1024"),
        ({"inputs": "Hello", "parameters": {"top_n_tokens": 9}}, "top_n_tokens must be <= 5"),
        ({"inputs": "Hello", "parameters": {"stop": ["a"] * 7}}, "stop_sequences"),
        ({"inputs": "Hello", "parameters": {"watermark": True}}, "watermark"),
        ({"inputs": "Hello", "parameters": {"grammar": {"type": "json", "value": {}}}}, "grammar"),
        ({"inputs": "Hello", "parameters": {"frequency_penalty": 0.3}}, "frequency_penalty"),
        ({"inputs": "x " * 300, "parameters": {}}, "max_input_tokens is 255"),
        ({"inputs": ""}, "must not be empty"),
        ({"parameters": {}}, "inputs"),
        ({"inputs": 5}, "inputs"),
    ]
    for body, needle in cases:
        answer = requests.post(generate, json=body, timeout=10)
        assert answer.status_code == 422, (body, answer.text)
        assert answer.json()["error_type"] == "validation" and needle in answer.json()["error"], answer.json()
    bad_json = requests.post(generate, data=b'{"inputs": ', headers={"Content-Type": "application/json"}, timeout=10)
    assert bad_json.status_code == 422 and "not valid JSON" in bad_json.json()["error"]
    form = requests.post(generate, data=b'{"inputs": "x"}', headers={"Content-Type": "text/plain"}, timeout=10)
    assert form.status_code == 422 and "application/json" in form.json()["error"]
    missing = requests.get(url(shared, "/nope"), timeout=10)
    assert missing.status_code == 404 and missing.json()["error_type"] == "not_found"
    wrong_method = requests.get(generate, timeout=10)
    assert wrong_method.status_code == 405 and "GET" in wrong_method.json()["error"]


def test_a_body_over_the_payload_limit_is_refused_before_it_is_parsed(harness):
    h = harness(payload_limit=1000)
    big = "x" * 2000
    answer = requests.post(url(h, "/generate"), json={"inputs": big}, timeout=10)
    assert answer.status_code == 422 and "--payload-limit" in answer.json()["error"]
    huge = json.dumps({"inputs": "y" * (2 << 20)}).encode()
    over = requests.post(url(h, "/generate"), data=huge, headers={"Content-Type": "application/json"}, timeout=10)
    assert over.status_code == 413 and "--payload-limit" in over.json()["error"]

    def chunks():  # no Content-Length: counted while read
        for _ in range(40):
            yield b"z" * 65536

    chunked = requests.post(url(h, "/generate"), data=chunks(), headers={"Content-Type": "application/json"},
                            timeout=10)
    assert chunked.status_code == 413


def test_overloaded_and_not_ready_answers(harness):
    slow = harness(FakeModel(step_delay=0.05), max_concurrent_requests=1)
    with requests.Session() as session:
        first = session.post(url(slow, "/generate_stream"), json={"inputs": "Hello", "parameters": {
            "max_new_tokens": 40}}, stream=True, timeout=10)
        assert first.status_code == 200
        refused = requests.post(url(slow, "/generate"), json={"inputs": "Hi"}, timeout=10)
        assert refused.status_code == 429 and refused.json()["error_type"] == "overloaded"
        assert "--max-concurrent-requests" in refused.json()["error"]
        first.close()
    assert slow.metric("tgi_request_failure_total", err="conc_limit", api="http") == 1

    cold = harness(start=False)
    cold.loop.run(cold.group.start())
    from text_generation_router.server import Router

    cold.router = cold.loop.call(Router, cold.args)
    # Ports open before the shards are warm: 503 from /health and the generation routes.
    cold.loop.run(_start_ports_only(cold.router))
    assert requests.get(url(cold, "/health"), timeout=10).status_code == 503
    answer = requests.post(url(cold, "/generate"), json={"inputs": "Hi"}, timeout=10)
    assert answer.status_code == 503 and "warming up" in answer.json()["error"]


async def _start_ports_only(router) -> None:
    """The part of Router.start before the shards are asked anything."""
    from text_generation_router.http import HttpServer, HttpSettings, build_app
    from text_generation_router.serving import ServingState
    from text_generation_router.tokenization import Tokenizer

    router.tokenizer = Tokenizer.load(router.args.tokenizer)
    router.state = ServingState(tokenizer=router.tokenizer, metrics=router.metrics)
    app = build_app(router.state, HttpSettings(), is_serving=lambda: False)
    router._http = HttpServer("127.0.0.1", 0, app)
    await router._http.start()
    router.http_port = router._http.port


def test_a_generation_failure_is_424(harness):
    h = harness(FakeModel(poison_id=5, poison_named=True))
    poisoned = h.router.tokenizer.decode([5])
    answer = requests.post(url(h, "/generate"), json={"inputs": "Hello" + poisoned}, timeout=10)
    assert answer.status_code in (422, 424), answer.text
    assert answer.json()["error_type"] in ("validation", "generation")
    h.group.shards[0].fail_next["Prefill"] = (__import__("grpc").StatusCode.INTERNAL, "device lost")
    failed = requests.post(url(h, "/generate"), json={"inputs": "Hello"}, timeout=10)
    assert failed.status_code in (424, 503) and failed.json()["error_type"] in ("generation", "unavailable")


def test_api_key_guards_every_route_but_health_and_metrics(harness):
    from openai import AuthenticationError, OpenAI

    h = harness(api_key="s3cret")
    assert requests.get(url(h, "/health"), timeout=10).status_code == 200
    assert requests.get(url(h, "/metrics"), timeout=10).status_code == 200
    for method, path in [("post", "/generate"), ("get", "/info"), ("get", "/v1/models"), ("get", "/docs"),
                         ("post", "/v1/chat/completions")]:
        answer = getattr(requests, method)(url(h, path), json={"inputs": "Hi"}, timeout=10)
        assert answer.status_code == 401, path
        assert answer.json()["error_type"] == "authentication" and answer.headers["WWW-Authenticate"] == "Bearer"
    wrong = requests.post(url(h, "/generate"), json={"inputs": "Hi"}, headers={"Authorization": "Bearer nope"},
                          timeout=10)
    assert wrong.status_code == 401 and "wrong" in wrong.json()["error"]
    right = requests.post(url(h, "/generate"), json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}},
                          headers={"Authorization": "Bearer s3cret"}, timeout=10)
    assert right.status_code == 200
    assert OpenAI(base_url=url(h, "/v1"), api_key="s3cret").models.list().data[0].id == "fake-model"
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=url(h, "/v1"), api_key="other").models.list()


def test_cors_answers_allowed_origins_only(harness):
    h = harness(cors_allow_origin=("https://app.example",))
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"}
    allowed = requests.options(url(h, "/generate"), headers=preflight, timeout=10)
    assert allowed.status_code == 200
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://app.example"
    other = requests.options(url(h, "/generate"), headers={**preflight, "Origin": "https://evil.example"}, timeout=10)
    assert other.status_code == 400 and "Access-Control-Allow-Origin" not in other.headers
    answer = requests.post(url(h, "/generate"), json={"inputs": "Hi", "parameters": {"max_new_tokens": 1}},
                           headers={"Origin": "https://app.example"}, timeout=10)
    assert answer.headers["Access-Control-Allow-Origin"] == "https://app.example"


def _send_and_close(port: int, path: str, body: dict) -> None:
    """Send a request, wait for the response to start (or not), then drop the connection."""
    payload = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload
        )
        time.sleep(0.3)


@pytest.mark.parametrize("path", ["/generate", "/generate_stream", "/v1/chat/completions"])
def test_a_closed_connection_cancels_the_generation_and_frees_its_kv(harness, path):
    h = harness(FakeModel(step_delay=0.02))
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 500}}
    if path.startswith("/v1"):
        body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 200, "stream": True}
    _send_and_close(h.router.http_port, path, body)
    api = "openai" if path.startswith("/v1") else "http"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and h.metric("tgi_request_failure_total", err="cancelled", api=api) < 1:
        time.sleep(0.02)
    assert h.metric("tgi_request_failure_total", err="cancelled", api=api) == 1
    while time.monotonic() < deadline and (h.shard.tokens_held() or h.router.state.in_flight):
        time.sleep(0.02)
    assert h.shard.tokens_held() == 0 and h.router.state.in_flight == 0
    # stopped long before its 200-500 tokens
    assert h.metric("tgi_generated_tokens_total") < 150


def test_metrics_label_the_api_of_each_request(harness):
    h = harness()
    requests.post(url(h, "/generate"), json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}}, timeout=10)
    requests.post(url(h, "/v1/completions"), json={"prompt": "Hi", "max_tokens": 2}, timeout=10)
    grpc_greedy(h, "Hi", 2)
    requests.post(url(h, "/generate"), json={"inputs": ""}, timeout=10)
    h.group.shards[0].fail_next["Prefill"] = (__import__("grpc").StatusCode.INTERNAL, "device lost")
    failed = requests.post(url(h, "/generate"), json={"inputs": "Hi"}, headers={"x-correlation-id": "abc-1"},
                           timeout=10)
    assert failed.status_code in (424, 503)
    assert h.metric("tgi_request_count_total", kind="single", api="http") == 3  # the refused ones too
    for api in ("openai", "grpc"):
        assert h.metric("tgi_request_count_total", kind="single", api=api) == 1, api
    for api in ("http", "openai", "grpc"):
        assert h.metric("tgi_request_success_total", kind="single", stop_reason="MAX_TOKENS", api=api) == 1, api
    assert h.metric("tgi_request_failure_total", err="validation", api="http") == 1
    # a failed generation is counted once, by the scheduler
    generate = h.metric("tgi_request_failure_total", err="generate", api="http")
    unavailable = h.metric("tgi_request_failure_total", err="unavailable", api="http")
    assert generate + unavailable == 1


def test_http_and_grpc_share_admission(harness):
    """A gRPC stream holds the only slot: HTTP is refused, and the other way round."""
    h = harness(FakeModel(step_delay=0.05), max_concurrent_requests=1)
    request = pb.SingleGenerationRequest(
        request=pb.GenerationRequest(text="Hello"),
        params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=30)),
    )
    stream = h.stub().GenerateStream(request, timeout=10)
    next(stream)
    assert requests.post(url(h, "/generate"), json={"inputs": "Hi"}, timeout=10).status_code == 429
    stream.cancel()
    deadline = time.monotonic() + 5
    while h.router.state.in_flight and time.monotonic() < deadline:
        time.sleep(0.02)
    connection = http.client.HTTPConnection("127.0.0.1", h.router.http_port, timeout=10)
    connection.request("POST", "/generate_stream", json.dumps({"inputs": "Hi", "parameters": {"max_new_tokens": 30}}),
                       {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    response.readline()
    import grpc

    with pytest.raises(grpc.RpcError) as refused:
        h.stub().Generate(pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text="x")]), timeout=10)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    connection.close()


def test_stream_events_carry_a_tgi_error_when_generation_fails_midway(harness):
    h = harness(FakeModel(step_delay=0.02))
    with requests.post(url(h, "/generate_stream"), json={"inputs": "Hello", "parameters": {"max_new_tokens": 50}},
                       stream=True, timeout=10) as answer:
        lines = answer.iter_lines()
        first = next(line for line in lines if line)
        assert json.loads(first[5:])["index"] == 1
        h.group.shards[0].fail_next["Decode"] = (__import__("grpc").StatusCode.INTERNAL, "device lost")
        events = [json.loads(line[5:]) for line in lines if line]
    assert "error" in events[-1] and events[-1]["error_type"] in ("generation", "unavailable")


def test_a_client_that_stops_reading_its_stream_is_cancelled_after_the_write_timeout(harness):
    """As GenerateStream over gRPC: an SSE reader that takes nothing for --stream-write-timeout
    has its generation cancelled (KV freed, admission returned, counted as stalled)."""
    # About 600 bytes per event, 30 000 events: more than the kernel's largest send buffer (4 MiB
    # by default) and uvicorn's 64 KiB can hold, so the writes must block.
    h = harness(FakeModel(max_position_embeddings=32768, kv_capacity=10_000_000), stream_write_timeout=0.5,
                max_new_tokens=30000, max_total_tokens=32768)
    body = json.dumps({"inputs": "Hello", "parameters": {"max_new_tokens": 30000, "top_n_tokens": 5}}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)  # before connecting: a small window
    sock.connect(("127.0.0.1", h.router.http_port))
    try:
        sock.sendall(b"POST /generate_stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not h.metric("tgi_request_failure_total", err="stalled", api="http"):
            time.sleep(0.05)
        assert h.metric("tgi_request_failure_total", err="stalled", api="http") == 1
        while time.monotonic() < deadline and (h.router.state.in_flight or h.shard.tokens_held()):
            time.sleep(0.05)
        assert h.router.state.in_flight == 0 and h.shard.tokens_held() == 0
        assert h.metric("tgi_generated_tokens_total") < 30000
    finally:
        sock.close()


def test_requests_the_server_cancels_while_draining_get_503_or_an_error_event(harness):
    import threading

    h = harness(FakeModel(step_delay=0.02))
    answers = {}

    def unary():
        answers["unary"] = requests.post(url(h, "/generate"), json={"inputs": "Hi", "parameters": {
            "max_new_tokens": 500}}, timeout=20)

    thread = threading.Thread(target=unary)
    thread.start()
    stream = requests.post(url(h, "/generate_stream"), json={"inputs": "Hello", "parameters": {
        "max_new_tokens": 500}}, stream=True, timeout=20)
    lines = stream.iter_lines()
    assert json.loads(next(line for line in lines if line)[5:])["index"] == 1
    h.loop.call(h.router.scheduler.cancel_all)
    thread.join(20)
    assert answers["unary"].status_code == 503 and "shutting down" in answers["unary"].json()["error"]
    last = json.loads([line for line in lines if line][-1][5:])
    assert last["error_type"] == "unavailable" and "shutting down" in last["error"]


def test_a_body_that_never_arrives_is_408_and_connections_are_bounded(harness, monkeypatch):
    from text_generation_router.http import app as http_app

    monkeypatch.setattr(http_app, "BODY_READ_TIMEOUT_S", 0.5)
    h = harness(max_connections=3)
    with socket.create_connection(("127.0.0.1", h.router.http_port), timeout=10) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"inputs\"")
        answer = b""
        while chunk := sock.recv(65536):  # the server closes the connection after its answer
            answer += chunk
        answer = answer.decode()
    assert answer.startswith("HTTP/1.1 408") and "did not arrive" in answer
    # --max-connections bounds the HTTP port too: idle connections beyond it are answered 503
    idle = [socket.create_connection(("127.0.0.1", h.router.http_port), timeout=10) for _ in range(3)]
    try:
        time.sleep(0.3)
        assert requests.get(url(h, "/health"), timeout=10).status_code == 503
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and requests.get(url(h, "/health"), timeout=10).status_code != 200:
        time.sleep(0.1)
    assert requests.get(url(h, "/health"), timeout=10).status_code == 200
