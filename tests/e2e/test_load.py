"""Production serving on the default model through the real launcher: load, cancellation, overload.

One server for the module (start-up and warmup are the slow part), launched
with --json-output, --max-concurrent-requests 64 and --stream-write-timeout 10.
Every test starts and
ends with the server idle, read from /metrics: nothing queued or running and
no KV cache block in use on the shard.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request

import grpc
import pytest

from .conftest import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

MAX_CONCURRENT = 64
MAX_TOTAL = 256
STREAM_TIMEOUT_S = 600
# Long enough that all 64 stalled streams are open together before the first is cancelled.
STREAM_WRITE_TIMEOUT_S = 10


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(
        tmp_path_factory.mktemp("load"),
        [
            "--json-output",
            # float32: a batch and a lone request then compute alike (same_as_alone's near-tie bound)
            "--dtype", "float32",
            "--max-concurrent-requests", str(MAX_CONCURRENT),
            "--max-total-tokens", str(MAX_TOTAL),
            "--stream-write-timeout", str(STREAM_WRITE_TIMEOUT_S),
        ],
    ).start(timeout=900)
    yield srv
    assert srv.stop() == 0, srv.log_tail()


@pytest.fixture(scope="module")
def pb():
    from text_generation_server.pb.fmaas import generation_pb2

    return generation_pb2


@pytest.fixture(scope="module")
def stub(server):
    from text_generation_server.pb.fmaas import generation_pb2_grpc

    channel = grpc.insecure_channel(server.address)
    yield generation_pb2_grpc.GenerationServiceStub(channel)
    channel.close()


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def metrics(server: ServerProcess) -> dict[str, float]:
    """Every sample of /metrics as ``name{labels}`` -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            samples[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return samples


def wait_idle(server: ServerProcess, timeout: float = 60.0) -> dict[str, float]:
    """Wait until nothing is queued, running or holding KV blocks; returns those metrics."""
    keys = ("tgi_queue_size", "tgi_batch_current_size", "tgi_requests_in_flight", "tgi_kv_cache_blocks_used")
    deadline = time.monotonic() + timeout
    while True:
        sample = metrics(server)
        state = {k: sample.get(k) for k in keys}
        if all(v == 0 for v in state.values()):
            return sample
        if time.monotonic() > deadline:
            raise AssertionError(f"server not idle after {timeout} s: {state}")
        time.sleep(0.2)


def error_records(server: ServerProcess) -> list[str]:
    """The messages of the ERROR records the launch logged so far (--json-output: one JSON per line)."""
    found = []
    for line in server.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            record = json.loads(line)["record"]
            if record["level"]["name"] in ("ERROR", "CRITICAL"):
                found.append(record["message"])
    return found


def delta(before: dict[str, float], after: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def stream_request(pb, text: str, *, max_new: int, min_new: int = 0, **kw):
    stopping = pb.StoppingCriteria(
        max_new_tokens=max_new, min_new_tokens=min_new,
        stop_sequences=kw.pop("stop_sequences", []), time_limit_millis=kw.pop("time_limit_millis", 0),
    )
    if "include_stop_sequence" in kw:
        stopping.include_stop_sequence = kw.pop("include_stop_sequence")
    return pb.SingleGenerationRequest(
        model_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        request=pb.GenerationRequest(text=text),
        params=pb.Parameters(stopping=stopping, **kw),
    )


def run_concurrently(jobs: dict[int, callable]) -> dict[int, object]:
    """Run each job on its own thread, all started together; returns results (or the exception raised)."""
    results: dict[int, object] = {}
    start = threading.Barrier(len(jobs))

    def run(key, job):
        start.wait()
        try:
            results[key] = job()
        except Exception as err:  # reported per job by the caller
            results[key] = err

    threads = [threading.Thread(target=run, args=item) for item in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(STREAM_TIMEOUT_S)
    return results


def test_server_starts_idle_with_a_kv_cache_sized_for_the_cpu(server):
    sample = wait_idle(server)
    total = sample["tgi_kv_cache_blocks_total"]
    # 16k tokens in 16-token blocks on CPU: far below the host memory share, above two full sequences.
    assert 2 * MAX_TOTAL / 16 <= total <= 16384 / 16, total


def test_64_concurrent_streams_of_mixed_lengths_all_complete_with_the_right_stop_reason(
    server, stub, pb, record_property
):
    before = wait_idle(server)
    # The room a long prompt leaves under max_total_tokens, counted by the server's own tokenizer.
    long_prompt = "The history of the lighthouse keepers on the northern coast is long. " * 14
    n_long = stub.Tokenize(pb.BatchedTokenizeRequest(requests=[pb.TokenizeRequest(text=long_prompt)])).responses[0].token_count
    assert MAX_TOTAL - 80 < n_long < MAX_TOTAL - 20, n_long

    expected: dict[int, str] = {}
    requests = {}
    for i in range(64):
        kind = i % 4
        if kind == 0:  # sampled, runs exactly to max_new_tokens
            n = 4 + (i * 7) % 37
            requests[i] = stream_request(
                pb, f"Story {i}: " + "once upon a time " * (1 + i % 6), max_new=n, min_new=n,
                method=pb.SAMPLE, sampling=pb.SamplingParameters(temperature=0.9, top_k=40, seed=1000 + i),
            )
            expected[i] = "MAX_TOKENS"
        elif kind == 1:  # greedy, ends at a stop sequence spanning tokens
            requests[i] = stream_request(
                pb, "The capital of France is", max_new=30, stop_sequences=["Paris"], include_stop_sequence=i % 8 == 1,
            )
            expected[i] = "STOP_SEQUENCE"
        elif kind == 2:  # input + max_new beyond max_total_tokens: cut, ends with TOKEN_LIMIT
            requests[i] = stream_request(pb, long_prompt, max_new=1000, min_new=MAX_TOTAL - n_long)
            expected[i] = "TOKEN_LIMIT"
        else:  # a time limit far shorter than the generation
            requests[i] = stream_request(pb, f"Count to a thousand, {i}:", max_new=200, min_new=200, time_limit_millis=300)
            expected[i] = "TIME_LIMIT"

    def job(i):
        metadata = (("x-correlation-id", f"load-{i}"),)
        return list(stub.GenerateStream(requests[i], timeout=STREAM_TIMEOUT_S, metadata=metadata))

    results = run_concurrently({i: (lambda i=i: job(i)) for i in requests})
    failures = {i: r for i, r in results.items() if not isinstance(r, list)}
    assert not failures, failures
    reasons: dict[str, int] = {}
    generated = 0
    for i, messages in sorted(results.items()):
        first, last = messages[0], messages[-1]
        reason = pb.StopReason.Name(last.stop_reason)
        assert reason == expected[i], (i, reason, last)
        reasons[reason] = reasons.get(reason, 0) + 1
        assert first.input_token_count > 0 and first.generated_token_count == 0
        # one message per token, none lost, only the last one finished
        tokens = [m.generated_token_count for m in messages[1:]]
        assert tokens == list(range(1, len(tokens) + 1)) or (reason == "TIME_LIMIT" and tokens[:-1] == list(range(1, len(tokens)))), (i, tokens)
        assert all(m.stop_reason == pb.NOT_FINISHED for m in messages[:-1])
        text = "".join(m.text for m in messages)
        if reason == "MAX_TOKENS":
            assert last.generated_token_count == requests[i].params.stopping.max_new_tokens
        elif reason == "TOKEN_LIMIT":
            assert last.generated_token_count == MAX_TOTAL - n_long
        elif reason == "STOP_SEQUENCE":
            assert last.stop_sequence == "Paris"
            assert text.endswith("Paris") == requests[i].params.stopping.include_stop_sequence, text
            assert "Paris" in text or not requests[i].params.stopping.include_stop_sequence
        generated += last.generated_token_count

    after = wait_idle(server)
    assert delta(before, after, 'tgi_request_count_total{api="grpc",kind="stream"}') == 64
    for reason, count in reasons.items():
        assert delta(before, after, f'tgi_request_success_total{{api="grpc",kind="stream",stop_reason="{reason}"}}') == count
    assert delta(before, after, "tgi_generated_tokens_total") == generated
    assert delta(before, after, "tgi_request_first_token_duration_count") == sum(
        1 for messages in results.values() if messages[-1].generated_token_count > 0
    )
    assert delta(before, after, "tgi_request_inter_token_duration_count") == sum(
        max(0, messages[-1].generated_token_count - 1) for messages in results.values()
    )
    assert after["tgi_kv_cache_blocks_used"] == 0

    # --json-output: every line is a JSON record, and each request's correlation id is a field of its records.
    records = [json.loads(line)["record"] for line in server.log_path.read_text().splitlines() if line.strip()]
    tagged = {r["extra"].get("correlation_id") for r in records if r["extra"].get("component") == "router"}
    assert {f"load-{i}" for i in range(64)} <= tagged
    record_property(
        "figures: 64 concurrent streams",
        f"{len(results)} completed, 0 failed, {generated} tokens; stop reasons {dict(sorted(reasons.items()))}; "
        f"KV blocks in use afterwards {after['tgi_kv_cache_blocks_used']:.0f}",
    )


def test_16_streams_cancelled_midway_free_their_kv_and_leave_the_others_unaffected(server, stub, pb):
    def witness(i: int):
        return stream_request(
            pb, ["Write a haiku about rain.", "def add(a, b):", "Water boils at", "Name three colors:"][i],
            max_new=20, min_new=20, response=pb.ResponseOptions(generated_tokens=True, token_logprobs=True, top_n_tokens=2),
        )

    wait_idle(server)
    # The witnesses alone first: what they generate when nothing else runs.
    alone = run_concurrently({i: (lambda i=i: list(stub.GenerateStream(witness(i), timeout=STREAM_TIMEOUT_S))) for i in range(4)})
    before = wait_idle(server)

    cancelled_after: dict[int, int] = {}

    def victim(i: int):
        call = stub.GenerateStream(stream_request(pb, f"Tell me a very long tale number {i}.", max_new=200, min_new=200), timeout=STREAM_TIMEOUT_S)
        wanted = 1 + i % 5
        seen = 0
        try:
            for message in call:
                if message.generated_token_count > 0:
                    seen += 1
                if seen >= wanted:
                    cancelled_after[i] = message.generated_token_count
                    call.cancel()
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                raise
        return seen

    jobs = {("victim", i): (lambda i=i: victim(i)) for i in range(16)}
    jobs.update({("witness", i): (lambda i=i: list(stub.GenerateStream(witness(i), timeout=STREAM_TIMEOUT_S))) for i in range(4)})
    results = run_concurrently(jobs)
    failures = {k: r for k, r in results.items() if isinstance(r, Exception)}
    assert not failures, failures
    assert sorted(cancelled_after) == list(range(16))
    assert all(n < 200 for n in cancelled_after.values())

    after = wait_idle(server)
    assert after["tgi_batch_current_size"] == 0 and after["tgi_kv_cache_blocks_used"] == 0
    assert delta(before, after, 'tgi_request_failure_total{api="grpc",err="cancelled"}') == 16
    for i in range(4):
        messages = results[("witness", i)]
        assert messages[-1].stop_reason == pb.MAX_TOKENS and messages[-1].generated_token_count == 20
        same_as_alone(alone[i], messages)


def same_as_alone(alone: list, together: list) -> None:
    """Token for token the same, except after a near-tie (top-2 logprobs within 1e-3) the batch may flip."""
    a = [m.tokens[0] for m in alone[1:]]
    b = [m.tokens[0] for m in together[1:]]
    for k, (x, y) in enumerate(zip(a, b, strict=True)):
        if x.text != y.text:
            top = sorted((t.logprob for t in x.top_tokens), reverse=True)
            assert len(top) == 2 and top[0] - top[1] < 1e-3, (k, x, y)
            return


def test_requests_above_max_concurrent_requests_get_resource_exhausted_while_accepted_ones_complete(server, stub, pb):
    before = wait_idle(server)
    accepted: dict[int, object] = {}

    def long_stream(i: int) -> None:
        try:
            accepted[i] = list(stub.GenerateStream(stream_request(pb, f"Essay {i}: the sea", max_new=40, min_new=40), timeout=STREAM_TIMEOUT_S))
        except grpc.RpcError as err:
            accepted[i] = err

    threads = [threading.Thread(target=long_stream, args=(i,)) for i in range(MAX_CONCURRENT)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while metrics(server).get("tgi_requests_in_flight") != MAX_CONCURRENT:
        assert time.monotonic() < deadline, metrics(server)
        time.sleep(0.05)

    refused = []
    for _ in range(4):
        with pytest.raises(grpc.RpcError) as err:
            list(stub.GenerateStream(stream_request(pb, "one more", max_new=5), timeout=30))
        refused.append(err.value)
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text="one more")]), timeout=30)
        refused.append(err.value)
    still_running = metrics(server)["tgi_requests_in_flight"]
    for t in threads:
        t.join(STREAM_TIMEOUT_S)

    assert all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in refused), [(e.code(), e.details()) for e in refused]
    assert all("--max-concurrent-requests" in e.details() for e in refused)
    assert still_running > 0  # refused while the accepted ones were still generating
    errors = {i: r for i, r in accepted.items() if not isinstance(r, list)}
    assert not errors, errors
    assert len(accepted) == MAX_CONCURRENT
    assert all(m[-1].stop_reason == pb.MAX_TOKENS and m[-1].generated_token_count == 40 for m in accepted.values())
    after = wait_idle(server)
    assert delta(before, after, 'tgi_request_failure_total{api="grpc",err="conc_limit"}') == len(refused)
    assert delta(before, after, 'tgi_request_success_total{api="grpc",kind="stream",stop_reason="MAX_TOKENS"}') == MAX_CONCURRENT


def test_streams_whose_clients_stop_reading_are_cancelled_and_free_their_slots_and_kv(server, pb, record_property):
    """64 clients open a stream, read its first message and stop reading, on a connection whose
    flow-control window holds about one kilobyte. They fill --max-concurrent-requests, so a new call
    is refused; after --stream-write-timeout each is cancelled (KV freed, slot returned, counted as
    stalled) and serving resumes."""
    from text_generation_server.pb.fmaas import generation_pb2_grpc

    before = wait_idle(server)
    errors_before = error_records(server)
    stalled_channel = grpc.insecure_channel(
        server.address, options=[("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
    )
    stalled_stub = generation_pb2_grpc.GenerationServiceStub(stalled_channel)
    detailed = pb.ResponseOptions(generated_tokens=True, token_logprobs=True, token_ranks=True, top_n_tokens=5)
    calls = []
    try:
        started = time.monotonic()
        for i in range(MAX_CONCURRENT):
            call = stalled_stub.GenerateStream(
                stream_request(pb, f"Story {i}: once upon a time", max_new=200, min_new=200, response=detailed),
                timeout=STREAM_TIMEOUT_S,
            )
            next(call)  # the first message, then this client reads no more
            calls.append(call)
        opened = time.monotonic() - started
        in_flight = metrics(server)["tgi_requests_in_flight"]
        with pytest.raises(grpc.RpcError) as refused:
            with grpc.insecure_channel(server.address) as channel:
                generation_pb2_grpc.GenerationServiceStub(channel).Generate(
                    pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text="anyone there?")]), timeout=30
                )
        held = time.monotonic() - started
        assert opened < STREAM_WRITE_TIMEOUT_S, opened  # else a stream may have been cancelled already
        assert in_flight == MAX_CONCURRENT
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()

        after = wait_idle(server, timeout=STREAM_WRITE_TIMEOUT_S + 120)
        freed = time.monotonic() - started
        assert delta(before, after, 'tgi_request_failure_total{api="grpc",err="stalled"}') == MAX_CONCURRENT
        assert delta(before, after, 'tgi_request_failure_total{api="grpc",err="cancelled"}') == 0
        with grpc.insecure_channel(server.address) as channel:
            reply = generation_pb2_grpc.GenerationServiceStub(channel).Generate(
                pb.BatchedGenerationRequest(
                    requests=[pb.GenerationRequest(text="served again?")],
                    params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=4, min_new_tokens=4)),
                ),
                timeout=60,
            )
        assert reply.responses[0].generated_token_count == 4
    finally:
        for call in calls:
            call.cancel()
        stalled_channel.close()
    time.sleep(1)
    # Cut-off clients are expected: nothing about them is logged as an error.
    assert error_records(server)[len(errors_before):] == []
    figures = (
        f"{MAX_CONCURRENT} stalled streams opened in {opened:.1f} s and held every slot (a new Generate "
        f"refused RESOURCE_EXHAUSTED at {held:.1f} s); all cancelled as stalled, KV blocks and in-flight "
        f"back to 0 at {freed:.1f} s (--stream-write-timeout {STREAM_WRITE_TIMEOUT_S}); a Generate then served"
    )
    print(f"figures: {figures}")
    record_property("figures: stalled readers", figures)
