"""The router's public API end to end against an in-process fake shard (no torch model)."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from fake_shard import FakeModel, RouterHarness, make_tokenizer_dir
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from text_generation_server.pb.fmaas import generation_pb2 as pb
from transformers import AutoTokenizer

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return make_tokenizer_dir(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture
def harness(tmp_path, tokenizer_dir):
    """Factory: a started router + fake shards; everything is closed at the end of the test."""
    started: list[RouterHarness] = []

    def _make(model: FakeModel | None = None, *, start: bool = True, **router_args) -> RouterHarness:
        h = RouterHarness(tmp_path / f"h{len(started)}", tokenizer_dir, model or FakeModel(), **router_args)
        (tmp_path / f"h{len(started)}").mkdir()
        started.append(h)
        return h.start() if start else h

    yield _make
    for h in started:
        h.close()


def params(max_new_tokens: int = 5, **kw) -> pb.Parameters:
    stopping = kw.pop("stopping", {})
    return pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=max_new_tokens, **stopping), **kw)


def single(text: str, p: pb.Parameters | None = None) -> pb.SingleGenerationRequest:
    return pb.SingleGenerationRequest(model_id="anything", request=pb.GenerationRequest(text=text), params=p or params())


def batched(texts: list[str], p: pb.Parameters | None = None) -> pb.BatchedGenerationRequest:
    return pb.BatchedGenerationRequest(
        model_id="anything", requests=[pb.GenerationRequest(text=t) for t in texts], params=p or params()
    )


def health_status(h: RouterHarness, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(h.channel())
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# ---- Generate / GenerateStream -------------------------------------------------------------


def test_generate_runs_each_prompt_as_its_own_sequence_in_one_prefill(harness, hf_tokenizer):
    h = harness()
    texts = ["The capital of France is", "Hello", "def main():"]
    reply = h.stub().Generate(
        batched(texts, params(6, response=pb.ResponseOptions(generated_tokens=True, token_logprobs=True, token_ranks=True))),
        timeout=10,
    )
    assert len(reply.responses) == 3
    prefills = [req for method, req in h.shard.calls if method == "Prefill"]
    assert len(prefills) == 1 and len(prefills[0].batch.requests) == 3
    for text, resp, sent in zip(texts, reply.responses, prefills[0].batch.requests, strict=True):
        ids = hf_tokenizer(text).input_ids
        assert list(sent.input_ids) == ids
        assert resp.input_token_count == len(ids)
        assert resp.generated_token_count == 6
        assert resp.stop_reason == pb.MAX_TOKENS
        assert resp.seed == 0  # greedy
        # the text is the tokenizer's own decode of exactly the tokens reported
        token_ids = hf_tokenizer.convert_tokens_to_ids([t.text for t in resp.tokens])
        assert resp.text == hf_tokenizer.decode(token_ids, skip_special_tokens=True)
        assert all(t.rank == 1 and t.logprob < 0 for t in resp.tokens)


def test_stream_sends_input_count_first_then_one_message_per_token_then_the_reason(harness, hf_tokenizer):
    h = harness()
    messages = list(h.stub().GenerateStream(single("Hello world", params(7)), timeout=10))
    assert messages[0].input_token_count == len(hf_tokenizer("Hello world").input_ids)
    assert messages[0].generated_token_count == 0 and messages[0].text == ""
    steps = messages[1:]
    assert [m.generated_token_count for m in steps] == list(range(1, 8))
    assert all(m.stop_reason == pb.NOT_FINISHED for m in steps[:-1])
    assert steps[-1].stop_reason == pb.MAX_TOKENS
    unary = h.stub().Generate(batched(["Hello world"], params(7)), timeout=10).responses[0]
    assert "".join(m.text for m in messages) == unary.text


def test_stream_with_input_tokens_puts_them_in_the_first_message(harness, hf_tokenizer):
    h = harness()
    options = pb.ResponseOptions(input_tokens=True, generated_tokens=True, token_logprobs=True, top_n_tokens=2, input_text=True)
    messages = list(h.stub().GenerateStream(single("Hello world", params(3, response=options)), timeout=10))
    first = messages[0]
    ids = hf_tokenizer("Hello world").input_ids
    assert [t.text for t in first.input_tokens] == hf_tokenizer.convert_ids_to_tokens(ids)
    assert first.input_tokens[0].logprob != first.input_tokens[0].logprob  # NaN: the first input token has none
    assert first.text == "Hello world"  # input_text echoed
    assert all(len(m.tokens) == 1 and len(m.tokens[0].top_tokens) == 2 for m in messages[1:])
    sent = [req for method, req in h.shard.calls if method == "Prefill"][0].batch.requests[0]
    assert sent.prefill_logprobs and sent.top_n_tokens == 2


def test_unary_input_text_is_prepended_and_input_tokens_returned(harness):
    h = harness()
    options = pb.ResponseOptions(input_text=True, input_tokens=True, token_ranks=True)
    resp = h.stub().Generate(batched(["Hello"], params(3, response=options)), timeout=10).responses[0]
    plain = h.stub().Generate(batched(["Hello"], params(3)), timeout=10).responses[0]
    assert resp.text == "Hello" + plain.text
    assert len(resp.input_tokens) == resp.input_token_count
    assert len(resp.tokens) == 0  # generated_tokens not asked


def test_sampling_without_seed_gets_a_random_seed_reported_and_sent_to_shards(harness):
    h = harness()
    p = params(3, method=pb.SAMPLE, sampling=pb.SamplingParameters(temperature=0.7, top_k=5, top_p=0.9))
    replies = [h.stub().Generate(batched(["Hello"], p), timeout=10).responses[0] for _ in range(2)]
    sent = [req.batch.requests[0] for method, req in h.shard.calls if method == "Prefill"]
    assert all(r.seed != 0 for r in replies) and replies[0].seed != replies[1].seed
    assert [s.sampling.seed for s in sent] == [r.seed for r in replies]
    assert all(s.sampling.do_sample and abs(s.sampling.temperature - 0.7) < 1e-6 for s in sent)
    assert sent[0].sampling.top_k == 5 and abs(sent[0].sampling.top_p - 0.9) < 1e-6
    seeded = pb.Parameters(method=pb.SAMPLE, sampling=pb.SamplingParameters(seed=1234), stopping=pb.StoppingCriteria(max_new_tokens=3))
    assert h.stub().Generate(batched(["Hello"], seeded), timeout=10).responses[0].seed == 1234


def test_sample_with_temperature_zero_is_greedy(harness):
    h = harness()
    p = params(3, method=pb.SAMPLE, sampling=pb.SamplingParameters(temperature=0.0))
    resp = h.stub().Generate(batched(["Hello"], p), timeout=10).responses[0]
    sent = [req.batch.requests[0] for method, req in h.shard.calls if method == "Prefill"][0]
    assert not sent.sampling.do_sample and resp.seed == 0


def test_max_new_tokens_zero_means_the_default(harness):
    h = harness(default_max_new_tokens=9)
    resp = h.stub().Generate(batched(["Hello"], params(0)), timeout=10).responses[0]
    assert resp.generated_token_count == 9 and resp.stop_reason == pb.MAX_TOKENS


def test_eos_from_the_shard_is_eos_token_and_min_new_tokens_reaches_the_shard(harness):
    h = harness(FakeModel(eos_after=4))
    resp = h.stub().Generate(batched(["Hello"], params(10)), timeout=10).responses[0]
    assert resp.stop_reason == pb.EOS_TOKEN and resp.generated_token_count == 4
    resp = h.stub().Generate(batched(["Hello"], params(10, stopping={"min_new_tokens": 6})), timeout=10).responses[0]
    assert resp.stop_reason == pb.EOS_TOKEN and resp.generated_token_count == 6
    sent = [req.batch.requests[0] for method, req in h.shard.calls if method == "Prefill"][-1]
    assert sent.stopping.min_new_tokens == 6


def test_input_plus_max_new_tokens_beyond_max_total_stops_with_token_limit(harness, hf_tokenizer):
    h = harness(max_total_tokens=40, max_input_tokens=30)
    text = "The capital of France is Paris. " * 3
    n = len(hf_tokenizer(text).input_ids)
    assert 10 < n <= 30
    resp = h.stub().Generate(batched([text], params(30)), timeout=10).responses[0]
    assert resp.stop_reason == pb.TOKEN_LIMIT
    assert resp.input_token_count + resp.generated_token_count == 40


def test_truncate_input_tokens_keeps_the_last_tokens(harness, hf_tokenizer):
    h = harness(max_total_tokens=40, max_input_tokens=30)
    text = "word " * 100
    resp = h.stub().Generate(batched([text], pb.Parameters(truncate_input_tokens=12)), timeout=10).responses[0]
    assert resp.input_token_count == 12
    sent = [req.batch.requests[0] for method, req in h.shard.calls if method == "Prefill"][0]
    assert list(sent.input_ids) == hf_tokenizer(text).input_ids[-12:]


# ---- stop sequences, time limit, cancellation -----------------------------------------------


@pytest.fixture
def scripted(harness, hf_tokenizer):
    """A router whose fake model generates 'Hello world. The end. More text' (then repeats)."""
    script = hf_tokenizer("Hello world. The end. More text").input_ids
    return harness(FakeModel(script=script))


def stop_params(sequences: list[str], include: bool | None = None, max_new_tokens: int = 30) -> pb.Parameters:
    stopping = pb.StoppingCriteria(max_new_tokens=max_new_tokens, stop_sequences=sequences)
    if include is not None:
        stopping.include_stop_sequence = include
    return pb.Parameters(stopping=stopping)


def test_stop_sequence_across_tokens_ends_the_text_there(scripted):
    resp = scripted.stub().Generate(batched(["Go"], stop_params(["end."])), timeout=10).responses[0]
    assert resp.stop_reason == pb.STOP_SEQUENCE and resp.stop_sequence == "end."
    assert resp.text == "Hello world. The end."  # included by default, like TGIS
    resp = scripted.stub().Generate(batched(["Go"], stop_params(["e end", "world"], include=False)), timeout=10).responses[0]
    assert resp.text == "Hello " and resp.stop_sequence == "world"


def test_trailing_text_after_a_stop_sequence_inside_one_token_is_removed(scripted):
    # "ld" completes "wor|ld" and the stop "wo" ends inside token " w"+"or"; trailing "r" is dropped
    resp = scripted.stub().Generate(batched(["Go"], stop_params(["Hello wo"])), timeout=10).responses[0]
    assert resp.text == "Hello wo"


def test_stream_never_sends_text_past_an_excluded_stop_sequence(scripted):
    messages = list(scripted.stub().GenerateStream(single("Go", stop_params(["The end"], include=False)), timeout=10))
    assert "".join(m.text for m in messages) == "Hello world. "
    assert messages[-1].stop_reason == pb.STOP_SEQUENCE and messages[-1].stop_sequence == "The end"


def test_decode_steps_are_pipelined_and_a_request_the_router_stops_loses_only_its_extra_token(scripted, hf_tokenizer):
    """Step n + 1 goes to the shard before step n's token is handled, so a stop sequence found on
    step n's token costs one computed-and-dropped token, then the request leaves the shards."""
    h = scripted
    words = len(hf_tokenizer("Hello world").input_ids)
    resp = h.stub().Generate(batched(["Go"], stop_params(["world"])), timeout=10).responses[0]
    assert resp.stop_reason == pb.STOP_SEQUENCE and resp.text == "Hello world"
    assert resp.generated_token_count == words
    assert wait_for(lambda: h.shard.tokens_held() == 0)
    methods = h.shard.methods()
    # Prefill makes token 1, decode steps tokens 2..words, one more step runs ahead, and the
    # request is then cleared from the shard.
    assert methods.count("Decode") == words, " ".join(methods)
    assert methods[-1] == "ClearCache", " ".join(methods)


def test_stop_sequence_is_dropped_from_the_shards_with_filter_batch(scripted):
    """The router stops a request the shard would continue: its KV must be freed."""
    h = scripted
    h.model.step_delay = 0.01
    stub = h.stub()
    long_call = stub.Generate.future(batched(["Go"], params(150)), timeout=20)
    assert wait_for(lambda: h.shard.tokens_held() > 0)
    short = stub.Generate(batched(["Go"], stop_params(["world"])), timeout=20).responses[0]
    assert short.stop_reason == pb.STOP_SEQUENCE
    h.model.step_delay = 0.0005
    assert long_call.result().responses[0].generated_token_count == 150
    prefills = [req.batch.requests for method, req in h.shard.calls if method == "Prefill"]
    long_id, short_id = prefills[0][0].id, prefills[1][0].id
    filters = [list(req.request_ids) for method, req in h.shard.calls if method == "FilterBatch"]
    assert [long_id] in filters and all(short_id not in f for f in filters)
    assert wait_for(lambda: h.shard.tokens_held() == 0)


def test_time_limit_stops_generation_with_time_limit(harness):
    h = harness(FakeModel(step_delay=0.02))
    start = time.monotonic()
    resp = h.stub().Generate(batched(["Hello"], params(500, stopping={"time_limit_millis": 150})), timeout=20).responses[0]
    assert resp.stop_reason == pb.TIME_LIMIT
    assert 1 <= resp.generated_token_count < 100
    assert time.monotonic() - start < 5
    assert wait_for(lambda: h.shard.tokens_held() == 0)


def test_time_limit_passing_while_queued_ends_the_request_without_tokens(harness):
    h = harness(FakeModel(step_delay=0.01), max_batch_size=1)
    stub = h.stub()
    running = stub.Generate.future(batched(["first"], params(60)), timeout=20)
    assert wait_for(lambda: h.shard.tokens_held() > 0)
    queued = params(5, stopping={"time_limit_millis": 50})
    resp = stub.Generate(batched(["second"], queued), timeout=20).responses[0]
    assert resp.stop_reason == pb.TIME_LIMIT and resp.generated_token_count == 0 and resp.text == ""
    messages = list(stub.GenerateStream(single("third", queued), timeout=20))
    assert messages[0].input_token_count > 0
    assert messages[-1].stop_reason == pb.TIME_LIMIT and messages[-1].generated_token_count == 0
    assert running.result().responses[0].generated_token_count == 60
    assert len([m for m in h.shard.methods() if m == "Prefill"]) == 1


def test_cancelled_stream_is_filtered_out_of_the_running_batch(harness, hf_tokenizer):
    h = harness(FakeModel(step_delay=0.01))
    stub = h.stub()
    keep = stub.Generate.future(batched(["Keep me"], params(150)), timeout=30)
    stream = stub.GenerateStream(single("Cancel me", params(500)), timeout=20)
    for count, _ in enumerate(stream):
        if count == 3:
            break
    stream.cancel()
    assert wait_for(lambda: "FilterBatch" in h.shard.methods())
    h.model.step_delay = 0.0005
    kept = keep.result()
    assert kept.responses[0].generated_token_count == 150
    ids = {}
    for method, req in h.shard.calls:
        if method == "Prefill":
            for r in req.batch.requests:
                ids[hf_tokenizer.decode(list(r.input_ids))] = r.id
    filters = [list(req.request_ids) for method, req in h.shard.calls if method == "FilterBatch"]
    assert filters, h.shard.methods()
    assert all(ids["Cancel me"] not in keep_ids for keep_ids in filters)
    assert [ids["Keep me"]] in filters
    assert wait_for(lambda: h.metric("tgi_request_failure_total", err="cancelled", api="grpc") == 1)
    assert wait_for(lambda: h.shard.tokens_held() == 0)


def test_a_passed_grpc_deadline_ends_the_request_and_frees_its_kv(harness):
    h = harness(FakeModel(step_delay=0.01))
    stub = h.stub()
    other = stub.Generate.future(batched(["Other"], params(80)), timeout=30)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.GenerateStream(single("Too slow", params(500)), timeout=0.4))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(batched(["Too slow"], params(500)), timeout=0.4)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_for(lambda: h.metric("tgi_request_failure_total", err="cancelled", api="grpc") == 2)
    h.model.step_delay = 0.0005
    assert other.result().responses[0].generated_token_count == 80
    assert wait_for(lambda: h.shard.tokens_held() == 0 and h.metric("tgi_kv_cache_blocks_used") == 0)


def test_cancelled_unary_call_frees_its_kv(harness):
    h = harness(FakeModel(step_delay=0.01))
    call = h.stub().Generate.future(batched(["Cancel me"], params(500)), timeout=20)
    assert wait_for(lambda: h.shard.tokens_held() > 0)
    call.cancel()
    assert wait_for(lambda: h.shard.tokens_held() == 0)
    assert "ClearCache" in h.shard.methods()[4:]  # the only request of its batch: the batch is dropped


# ---- continuous batching and admission ------------------------------------------------------


def test_request_sent_mid_stream_gets_tokens_before_the_first_stream_finishes(harness):
    h = harness(FakeModel(step_delay=0.01))
    stub = h.stub()
    events: list[str] = []
    late_thread = None
    for msg in stub.GenerateStream(single("A long story", params(200)), timeout=30):
        if msg.generated_token_count == 3 and late_thread is None:

            def late() -> None:
                for m in stub.GenerateStream(single("Short", params(3)), timeout=20):
                    if m.generated_token_count == 1:
                        events.append("late-first-token")
                        h.model.step_delay = 0.0005  # the point is made; let the long one finish fast

            late_thread = threading.Thread(target=late)
            late_thread.start()
        if msg.stop_reason != pb.NOT_FINISHED:
            events.append("long-finished")
    late_thread.join()
    assert events == ["late-first-token", "long-finished"]
    decode_sizes = [sum(len(b.request_ids) for b in req.batches) for m, req in h.shard.calls if m == "Decode"]
    assert 2 in decode_sizes  # the late request was decoded together with the long one


def test_waiting_requests_fewer_than_the_served_ratio_wait_for_max_waiting_tokens_steps(harness):
    """TGI admission: with 4 running and ratio 1.0, one waiting request waits max_waiting_tokens steps."""
    h = harness(FakeModel(step_delay=0.005), waiting_served_ratio=1.0, max_waiting_tokens=6)
    stub = h.stub()
    running = stub.Generate.future(batched(["a", "b", "c", "d"], params(150)), timeout=30)
    assert wait_for(lambda: h.shard.tokens_held() > 0)
    late = stub.Generate(batched(["late"], params(3)), timeout=20)
    assert late.responses[0].generated_token_count == 3
    h.model.step_delay = 0.0005
    running.result()
    methods = h.shard.methods()
    first, second = [i for i, m in enumerate(methods) if m == "Prefill"][:2]
    assert methods[first:second].count("Decode") >= 5
    sizes = [sum(len(b.request_ids) for b in req.batches) for m, req in h.shard.calls if m == "Decode"]
    assert 5 in sizes  # admitted while the four were still running


def test_batch_token_budget_holds_requests_back_until_others_finish(harness):
    # each request needs 16 + 48 = 64 tokens of budget (block 16); the budget fits two
    h = harness(FakeModel(step_delay=0.005), max_batch_total_tokens=128, max_total_tokens=100, max_input_tokens=50)
    texts = ["Hello world, this is it"] * 4
    reply = h.stub().Generate(batched(texts, params(48)), timeout=20)
    assert all(r.generated_token_count == 48 for r in reply.responses)
    running = [sum(len(b.request_ids) for b in req.batches) for m, req in h.shard.calls if m == "Decode"]
    assert max(running) == 2
    prefill_sizes = [len(req.batch.requests) for m, req in h.shard.calls if m == "Prefill"]
    assert sum(prefill_sizes) == 4


def test_max_batch_size_limits_the_running_batch(harness):
    h = harness(FakeModel(step_delay=0.002), max_batch_size=2)
    reply = h.stub().Generate(batched(["a", "b", "c", "d", "e"], params(5)), timeout=20)
    assert len(reply.responses) == 5
    running = [sum(len(b.request_ids) for b in req.batches) for m, req in h.shard.calls if m == "Decode"]
    assert max(running) <= 2


def test_prefill_refused_for_kv_memory_is_retried_after_others_finish_not_dropped(harness, hf_tokenizer):
    # The shard holds 60 tokens but claims 10000: the router over-admits and must recover.
    model = FakeModel(step_delay=0.02, kv_capacity=60, reported_capacity=10_000)
    h = harness(model)
    stub = h.stub()
    first = stub.Generate.future(batched(["Hello"], params(45)), timeout=20)
    assert wait_for(lambda: h.shard.tokens_held() > 15)
    big_text = "The capital of France is Paris. " * 5
    assert 40 <= len(hf_tokenizer(big_text).input_ids) <= 55
    second = stub.Generate(batched([big_text], params(5)), timeout=20).responses[0]
    assert first.result().responses[0].generated_token_count == 45
    assert second.generated_token_count == 5 and second.stop_reason == pb.MAX_TOKENS
    big_prefills = [m for m, req in h.shard.calls if m == "Prefill" and len(req.batch.requests[0].input_ids) > 30]
    assert len(big_prefills) >= 2  # refused at least once, then admitted


def test_a_request_that_can_never_fit_the_kv_cache_fails_with_resource_exhausted(harness):
    model = FakeModel(kv_capacity=20, reported_capacity=10_000)
    h = harness(model)
    with pytest.raises(grpc.RpcError) as err:
        h.stub().Generate(batched(["The capital of France is Paris. " * 5], params(5)), timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "KV cache" in err.value.details()
    assert h.stub().Generate(batched(["Hi"], params(2)), timeout=10).responses[0].generated_token_count == 2


def test_more_concurrent_requests_than_allowed_is_resource_exhausted(harness):
    h = harness(FakeModel(step_delay=0.02), max_concurrent_requests=2)
    stub = h.stub()
    running = stub.Generate.future(batched(["a", "b"], params(50)), timeout=20)
    assert wait_for(lambda: h.shard.tokens_held() > 0)
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(batched(["c"], params(2)), timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-concurrent-requests" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        list(stub.GenerateStream(single("d"), timeout=10))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    h.model.step_delay = 0.0005
    assert running.result().responses[0].generated_token_count == 50
    assert stub.Generate(batched(["e"], params(2)), timeout=10).responses[0].generated_token_count == 2


# ---- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_params, field",
    [
        (params(100_000), "max_new_tokens"),
        (params(5, stopping={"min_new_tokens": 10}), "min_new_tokens"),
        (pb.Parameters(stopping=pb.StoppingCriteria(stop_sequences=list("abcdefg"))), "stop_sequences"),
        (pb.Parameters(stopping=pb.StoppingCriteria(stop_sequences=["a", ""])), "stop_sequences"),
        (pb.Parameters(method=pb.SAMPLE, sampling=pb.SamplingParameters(temperature=-1.0)), "temperature"),
        (pb.Parameters(method=pb.SAMPLE, sampling=pb.SamplingParameters(temperature=float("nan"))), "temperature"),
        (pb.Parameters(method=pb.SAMPLE, sampling=pb.SamplingParameters(top_p=1.5)), "top_p"),
        (pb.Parameters(method=pb.SAMPLE, sampling=pb.SamplingParameters(top_p=-0.5)), "top_p"),
        (pb.Parameters(method=pb.SAMPLE, sampling=pb.SamplingParameters(typical_p=2.0)), "typical_p"),
        (pb.Parameters(decoding=pb.DecodingParameters(repetition_penalty=-1.0)), "repetition_penalty"),
        (pb.Parameters(response=pb.ResponseOptions(generated_tokens=True, top_n_tokens=6)), "top_n_tokens"),
        (pb.Parameters(response=pb.ResponseOptions(token_logprobs=True)), "generated_tokens"),
    ],
)
def test_bad_parameters_are_invalid_argument_naming_the_field_and_the_server_keeps_serving(harness, request_params, field):
    h = harness()
    stub = h.stub()
    for call in (lambda: stub.Generate(batched(["hello"], request_params), timeout=10),
                 lambda: list(stub.GenerateStream(single("hello", request_params), timeout=10))):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in err.value.details()
    assert stub.Generate(batched(["hello"], params(2)), timeout=10).responses[0].generated_token_count == 2
    assert health_status(h) == health_pb2.HealthCheckResponse.SERVING


def test_empty_text_and_too_long_input_are_invalid_argument(harness, hf_tokenizer):
    h = harness(max_total_tokens=40, max_input_tokens=30)
    stub = h.stub()
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(batched(["ok", ""]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "requests[1].text" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(batched(["word " * 100]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_input_tokens is 30" in err.value.details() and "truncate_input_tokens" in err.value.details()
    text = next(t for t in ("word " * k for k in range(1, 30)) if len(hf_tokenizer(t).input_ids) > 20)
    assert len(hf_tokenizer(text).input_ids) <= 30
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(batched([text], params(20, stopping={"min_new_tokens": 20})), timeout=10)
    assert "min_new_tokens" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        list(stub.GenerateStream(pb.SingleGenerationRequest(), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert h.metric("tgi_request_failure_total", err="validation", api="grpc") >= 3
    assert not [m for m in h.shard.methods() if m == "Prefill"]


def test_empty_generate_returns_no_responses(harness):
    h = harness()
    assert len(h.stub().Generate(pb.BatchedGenerationRequest(), timeout=10).responses) == 0


# ---- Tokenize / ModelInfo -----------------------------------------------------------------------


def test_tokenize_returns_counts_tokens_and_offsets_like_the_tokenizer(harness, hf_tokenizer):
    h = harness()
    text = "café 東京 🙂"
    reply = h.stub().Tokenize(
        pb.BatchedTokenizeRequest(requests=[pb.TokenizeRequest(text=text), pb.TokenizeRequest(text="Hello")],
                                  return_tokens=True, return_offsets=True),
        timeout=10,
    )
    enc = hf_tokenizer(text, return_offsets_mapping=True)
    first = reply.responses[0]
    assert first.token_count == len(enc.input_ids)
    assert list(first.tokens) == hf_tokenizer.convert_ids_to_tokens(enc.input_ids)
    assert [(o.start, o.end) for o in first.offsets] == [tuple(o) for o in enc.offset_mapping]
    assert reply.responses[1].token_count == len(hf_tokenizer("Hello").input_ids)
    counted = h.stub().Tokenize(pb.BatchedTokenizeRequest(requests=[pb.TokenizeRequest(text=text)]), timeout=10)
    assert counted.responses[0].token_count == first.token_count and not counted.responses[0].tokens
    truncated = h.stub().Tokenize(
        pb.BatchedTokenizeRequest(requests=[pb.TokenizeRequest(text=text)], return_tokens=True, truncate_input_tokens=3),
        timeout=10,
    )
    assert truncated.responses[0].token_count == 3
    assert list(truncated.responses[0].tokens) == hf_tokenizer.convert_ids_to_tokens(enc.input_ids[-3:])


def test_model_info_reports_decoder_only_and_the_limits(harness):
    h = harness(max_new_tokens=77)
    info = h.stub().ModelInfo(pb.ModelInfoRequest(model_id="whatever-name"), timeout=10)
    assert info.model_kind == pb.ModelInfoResponse.DECODER_ONLY
    assert info.max_sequence_length == 256  # min(fake max_position_embeddings 256, 4096)
    assert info.max_new_tokens == 77


# ---- health, reflection, HTTP ---------------------------------------------------------------------


def test_health_is_not_serving_until_warmup_then_serving(harness):
    import asyncio

    h = harness(start=False)
    from text_generation_router.server import Router

    h.router = h.loop.call(Router, h.args)
    starting = asyncio.run_coroutine_threadsafe(h.router.start(), h.loop.loop)
    assert wait_for(lambda: h.router.grpc_port is not None and h.router.http_port is not None)
    assert health_status(h) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert health_status(h, "fmaas.GenerationService") == health_pb2.HealthCheckResponse.NOT_SERVING
    assert h.http_get("/health")[0] == 503
    with pytest.raises(grpc.RpcError) as err:
        h.stub().Generate(batched(["hi"]), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    h.loop.run(h.group.start())  # the shards come up; the router finds them and warms up
    starting.result(timeout=20)
    assert h.shard.methods()[:4] == ["ServiceDiscovery", "Info", "ClearCache", "Warmup"]
    warm = h.shard.warmups[0]
    assert sum(len(r.input_ids) for r in warm.batch.requests) == warm.max_prefill_tokens == 255 + 50
    assert max(len(r.input_ids) for r in warm.batch.requests) == warm.max_input_tokens == 255
    assert health_status(h) == health_pb2.HealthCheckResponse.SERVING
    assert health_status(h, "fmaas.GenerationService") == health_pb2.HealthCheckResponse.SERVING
    assert h.http_get("/health") == (200, "")  # TGI answers an empty 200


def test_a_second_router_on_a_taken_grpc_port_is_refused_and_the_first_keeps_serving(harness):
    """gRPC's default SO_REUSEPORT would let both listen and split the connections between them."""
    from text_generation_router.server import BindError

    first = harness()
    port = first.router.grpc_port
    with pytest.raises(BindError, match=rf"cannot listen for gRPC on \S+:{port}"):
        harness(grpc_port=port)
    assert health_status(first) == health_pb2.HealthCheckResponse.SERVING
    assert len(first.stub().Generate(batched(["hi"]), timeout=10).responses) == 1


def test_reflection_lists_generation_health_and_reflection_services(harness):
    h = harness()
    stub = reflection_pb2_grpc.ServerReflectionStub(h.channel())
    answers = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
    names = {s.name for s in answers[0].list_services_response.service}
    assert {"fmaas.GenerationService", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


def test_metrics_endpoint_exposes_request_token_queue_and_batch_metrics(harness):
    h = harness()
    h.stub().Generate(batched(["Hello", "World"], params(4)), timeout=10)
    status, body = h.http_get("/metrics")
    assert status == 200
    for name in (
        'tgi_request_count_total{api="grpc",kind="batch"} 1.0',
        'tgi_request_success_total{api="grpc",kind="batch",stop_reason="MAX_TOKENS"} 2.0',
        "tgi_generated_tokens_total 8.0",
        "tgi_queue_size 0.0",
        "tgi_batch_current_size 0.0",
        "tgi_request_duration_bucket",
        'tgi_batch_inference_duration_count{method="decode"} 3.0',
    ):
        assert name in body, name
    assert h.http_get("/nope")[0] == 404


def test_metrics_have_tgis_names_for_latency_tokens_and_kind(harness):
    h = harness(FakeModel(step_delay=0.002))
    stub = h.stub()
    stub.Generate(batched(["Hello"], params(4)), timeout=10)
    list(stub.GenerateStream(single("Hello", params(3)), timeout=10))
    assert h.metric("tgi_request_success_total", kind="single", stop_reason="MAX_TOKENS", api="grpc") == 1
    assert h.metric("tgi_request_success_total", kind="stream", stop_reason="MAX_TOKENS", api="grpc") == 1
    assert h.metric("tgi_request_first_token_duration_count") == 2
    # Time between tokens: 3 gaps + 2 gaps, and one mean time per token per prompt.
    assert h.metric("tgi_request_inter_token_duration_count") == 5
    assert h.metric("tgi_request_mean_time_per_token_duration_count") == 2
    assert h.metric("tgi_request_inference_duration_count") == 2
    assert h.metric("tgi_request_validation_duration_count") == 2
    assert h.metric("tgi_request_max_new_tokens_sum") == 7
    assert h.metric("tgi_request_total_tokens_count") == 2
    assert h.metric("tgi_batch_inference_success_total", method="prefill") == 2


def test_kv_blocks_in_use_follow_the_shards_and_return_to_zero_after_a_cancel(harness):
    h = harness(FakeModel(step_delay=0.01, kv_capacity=1600, block_size=16))
    assert h.metric("tgi_kv_cache_blocks_total") == 100  # known from start-up, before any request
    stream = h.stub().GenerateStream(single("Cancel me", params(500)), timeout=20)
    for count, _ in enumerate(stream):
        if count == 40:
            break
    used = h.metric("tgi_kv_cache_blocks_used")
    assert used >= 2  # at least 40 generated tokens: more than two 16-token blocks
    assert h.metric("tgi_kv_cache_blocks_total") == 100
    stream.cancel()
    assert wait_for(lambda: h.metric("tgi_kv_cache_blocks_used") == 0 and h.shard.tokens_held() == 0)
    assert h.metric("tgi_batch_current_size") == 0


def test_x_correlation_id_is_in_the_log_lines_of_its_request(harness):
    from loguru import logger

    lines: list[str] = []
    tagged: list[str] = []

    def sink(message) -> None:
        lines.append(str(message))
        tagged.append(message.record["extra"].get("correlation_id", ""))

    sink = logger.add(sink, level="INFO", format="{message}")
    try:
        h = harness()
        metadata = (("x-correlation-id", "req-7f3a"),)
        h.stub().Generate(batched(["Hello"], params(2)), timeout=10, metadata=metadata)
        list(h.stub().GenerateStream(single("Hello", params(2)), timeout=10, metadata=(("x-correlation-id", "str-1"),)))
        with pytest.raises(grpc.RpcError):
            h.stub().Generate(batched([""], params(2)), timeout=10, metadata=(("x-correlation-id", "bad-9"),))
    finally:
        logger.remove(sink)
    assert any("req-7f3a" in line and "finished" in line for line in lines), lines
    assert any("str-1" in line and "finished" in line for line in lines), lines
    assert any("bad-9" in line and "Rejected" in line for line in lines), lines
    # A field of its own in --json-output records, for served and rejected requests alike.
    assert {"req-7f3a", "str-1", "bad-9"} <= set(tagged)
    rejected = [cid for line, cid in zip(lines, tagged, strict=True) if "Rejected" in line]
    assert rejected == ["bad-9"], list(zip(lines, tagged, strict=True))


def test_x_correlation_id_is_a_field_of_the_overloaded_log_line(harness):
    from loguru import logger

    records: list[tuple[str, str]] = []
    sink = logger.add(
        lambda m: records.append((m.record["message"], m.record["extra"].get("correlation_id", ""))),
        level="WARNING",
    )
    try:
        h = harness(FakeModel(step_delay=0.02), max_concurrent_requests=1)
        stub = h.stub()
        running = stub.Generate.future(batched(["a"], params(40)), timeout=20)
        assert wait_for(lambda: h.shard.tokens_held() > 0)
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(batched(["b"], params(2)), timeout=10, metadata=(("x-correlation-id", "busy-3"),))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        h.model.step_delay = 0.0005
        running.result()
    finally:
        logger.remove(sink)
    overloaded = [(message, cid) for message, cid in records if "overloaded" in message]
    assert len(overloaded) == 1, records
    message, cid = overloaded[0]
    assert cid == "busy-3" and "x-correlation-id busy-3" in message, overloaded


@pytest.mark.parametrize(
    "router_args, expected",
    [
        ({}, "max_batch_total_tokens 100000 (from the KV cache capacity)"),
        ({"max_batch_total_tokens": 5000}, "max_batch_total_tokens 5000 (from --max-batch-total-tokens)"),
    ],
)
def test_start_up_log_states_max_batch_total_tokens_and_where_it_came_from(harness, router_args, expected):
    from loguru import logger

    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="INFO")
    try:
        harness(FakeModel(kv_capacity=100_000), **router_args)
    finally:
        logger.remove(sink)
    warmup = [line for line in lines if line.startswith("Warmup done")]
    assert len(warmup) == 1, lines
    assert "KV capacity 100000 tokens" in warmup[0] and expected in warmup[0], warmup[0]


# ---- shard failures -----------------------------------------------------------------------------


def test_rpcs_go_to_every_shard_in_the_same_order(harness):
    h = harness(world_size=2)
    h.stub().Generate(batched(["Hello", "World"], params(4)), timeout=10)
    rank0, rank1 = (shard.methods() for shard in h.group.shards)
    assert rank0[0] == "ServiceDiscovery"  # asked of rank 0 only, to learn the others
    assert rank0[1:] == rank1
    assert rank0.count("Decode") == 3


def test_shard_error_on_a_batch_fails_those_requests_and_the_server_keeps_serving(harness):
    h = harness(world_size=2)
    for shard in h.group.shards:
        shard.fail_next["Decode"] = (grpc.StatusCode.INTERNAL, "boom in decode")
    with pytest.raises(grpc.RpcError) as err:
        h.stub().Generate(batched(["Hello"], params(4)), timeout=10)
    assert err.value.code() == grpc.StatusCode.INTERNAL and "boom in decode" in err.value.details()
    assert h.stub().Generate(batched(["Hello"], params(4)), timeout=10).responses[0].generated_token_count == 4
    assert health_status(h) == health_pb2.HealthCheckResponse.SERVING


def test_shards_out_of_step_is_fatal_health_not_serving(harness):
    h = harness(world_size=2)
    h.group.shards[1].fail_next["Decode"] = (grpc.StatusCode.INTERNAL, "only rank 1 failed")
    with pytest.raises(grpc.RpcError) as err:
        h.stub().Generate(batched(["Hello"], params(4)), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "out of step" in err.value.details()
    assert h.router.fatal.is_set()
    assert wait_for(lambda: health_status(h) == health_pb2.HealthCheckResponse.NOT_SERVING)
    with pytest.raises(grpc.RpcError) as err:
        h.stub().Generate(batched(["Hello"], params(4)), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_dead_shard_during_a_stream_fails_it_and_the_router_reports_not_serving(harness):
    h = harness(FakeModel(step_delay=0.02))
    stream = h.stub().GenerateStream(single("Hello", params(500)), timeout=20)
    next(stream)
    next(stream)
    h.loop.run(h.group.kill(0))
    with pytest.raises(grpc.RpcError) as err:
        list(stream)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert h.router.fatal.is_set()
    assert wait_for(lambda: h.http_get("/health")[0] == 503)


def test_dead_shard_while_idle_is_noticed_without_a_request(harness):
    h = harness()
    h.loop.run(h.group.kill(0))
    assert wait_for(lambda: h.router.fatal.is_set(), timeout=15)
    assert health_status(h) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert "unreachable" in h.router.fatal_message or "UNAVAILABLE" in h.router.fatal_message


# ---- draining ----------------------------------------------------------------------------------------


def test_drain_finishes_in_flight_requests_and_refuses_new_ones(harness):
    h = harness(FakeModel(step_delay=0.01))
    stub = h.stub()
    running = stub.Generate.future(batched(["Hello"], params(40)), timeout=20)
    assert wait_for(lambda: h.shard.tokens_held() > 0)
    import asyncio

    draining = asyncio.run_coroutine_threadsafe(h.router.drain(10.0), h.loop.loop)
    assert wait_for(lambda: h.router.state.draining)
    assert health_status(h) == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(batched(["new"], params(2)), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in err.value.details()
    assert running.result().responses[0].generated_token_count == 40
    draining.result(timeout=20)


def test_drain_cancels_what_is_left_after_the_grace_period(harness):
    h = harness(FakeModel(step_delay=0.01))
    stream = h.stub().GenerateStream(single("Hello", params(1000)), timeout=30)
    next(stream)
    import asyncio

    start = time.monotonic()
    draining = asyncio.run_coroutine_threadsafe(h.router.drain(0.3), h.loop.loop)
    messages = list(stream)
    assert messages[-1].stop_reason == pb.CANCELLED
    draining.result(timeout=20)
    assert time.monotonic() - start < 10


# ---- payload limit and Tokenize admission ------------------------------------------------------


def test_a_call_over_the_payload_limit_is_refused_before_tokenizing_naming_the_flag(harness):
    h = harness(payload_limit=1000)
    calls = {
        "Generate": lambda: h.stub().Generate(batched(["x" * 600, "y" * 600]), timeout=10),
        # 501 characters, 1002 UTF-8 bytes: bytes are what count.
        "GenerateStream": lambda: list(h.stub().GenerateStream(single("é" * 501), timeout=10)),
        "Tokenize": lambda: h.stub().Tokenize(
            pb.BatchedTokenizeRequest(requests=[pb.TokenizeRequest(text="z" * 500_000)]), timeout=10
        ),
    }
    for name, call in calls.items():
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert "--payload-limit allows 1000 bytes per call" in err.value.details(), (name, err.value.details())
    # Beyond the limit plus the 1 MiB a message may carry besides, gRPC refuses it unread.
    with pytest.raises(grpc.RpcError) as err:
        h.stub().Tokenize(pb.BatchedTokenizeRequest(requests=[pb.TokenizeRequest(text="z" * 2_000_000)]), timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
    ok = h.stub().Tokenize(pb.BatchedTokenizeRequest(requests=[pb.TokenizeRequest(text="x " * 499)]), timeout=10)
    assert ok.responses[0].token_count > 0
    assert len(h.stub().Generate(batched(["hi"]), timeout=10).responses) == 1  # still serving


def test_tokenize_is_admitted_against_max_concurrent_requests(harness):
    h = harness(max_concurrent_requests=2)
    items = [pb.TokenizeRequest(text=f"text {i}") for i in range(3)]
    with pytest.raises(grpc.RpcError) as err:
        h.stub().Tokenize(pb.BatchedTokenizeRequest(requests=items), timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-concurrent-requests" in err.value.details()
    assert len(h.stub().Tokenize(pb.BatchedTokenizeRequest(requests=items[:2]), timeout=10).responses) == 2
