"""The shard's gRPC servicer in-process on a unix socket, called through the generated stubs."""

from __future__ import annotations

import asyncio
import concurrent.futures
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from text_generation_server.distributed import init_distributed
from text_generation_server.engine import Generator
from text_generation_server.models import load_model
from text_generation_server.pb.generate.v1 import generate_pb2 as pb
from text_generation_server.pb.generate.v1 import generate_pb2_grpc
from text_generation_server.server import ShardServer, prepare_socket_path


class LoopThread:
    """An event loop on a daemon thread, so tests call the aio server with blocking stubs."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def short_dir():
    # Unix socket paths are limited to ~107 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="tgs-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def loop():
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="module")
def model(tiny_llama):
    dist = init_distributed(0, 1)
    return load_model(tiny_llama, dtype=torch.float32, device=torch.device("cpu"), dist=dist)


@pytest.fixture(scope="module")
def shard(model, loop, short_dir):
    generator = Generator(model, init_distributed(0, 1), block_size=16, model_id="tiny-llama")
    server = ShardServer(generator, uds_path=str(short_dir / "shard"), rank=0, world_size=2)
    loop.run(server.start())
    channel = grpc.insecure_channel(server.url)
    stub = generate_pb2_grpc.TextGenerationServiceStub(channel)
    yield stub, server, generator
    channel.close()
    loop.run(server.stop())


@pytest.fixture
def stub(shard):
    stub, _, _ = shard
    stub.ClearCache(pb.ClearCacheRequest())
    return stub


def request(rid: int, ids: list[int], n: int = 5, **kw) -> pb.Request:
    return pb.Request(id=rid, input_ids=ids, stopping=pb.StoppingParameters(max_new_tokens=n), **kw)


def test_info_health_and_service_discovery(stub, model):
    info = stub.Info(pb.InfoRequest())
    assert info.model_id == "tiny-llama" and info.architecture == "LlamaForCausalLM"
    assert info.vocab_size == model.vocab_size and info.block_size == 16
    assert info.dtype == "float32" and info.device_type == "cpu" and info.kernel
    stub.Health(pb.HealthRequest())
    urls = stub.ServiceDiscovery(pb.ServiceDiscoveryRequest()).urls
    assert [u.rsplit("-", 1)[-1] for u in urls] == ["0", "1"]
    assert all(u.startswith("unix://") for u in urls)


def test_warmup_prefill_decode_filter_and_clear_through_grpc(stub, shard, tiny_llama):
    from transformers import AutoModelForCausalLM

    _, _, generator = shard
    warm = stub.Warmup(
        pb.WarmupRequest(
            batch=pb.Batch(id=0, requests=[request(0, list(range(1, 60)), n=40)]),
            max_input_tokens=60,
            max_prefill_tokens=60,
            max_total_tokens=100,
            max_batch_total_tokens=512,
        )
    )
    assert (warm.max_supported_total_tokens, warm.num_blocks, warm.block_size) == (512, 32, 16)
    free = generator.allocator.num_free

    prompts = {1: [5, 9, 33, 100, 7], 2: [44, 45], 3: [7, 8, 9, 10, 11, 12]}
    reply = stub.Prefill(
        pb.PrefillRequest(
            batch=pb.Batch(id=1, requests=[request(r, ids, n=6) for r, ids in prompts.items()])
        )
    )
    out = {g.request_id: [g.token.id] for g in reply.generations}
    assert reply.batch.size == 3 and reply.timings.forward_ns > 0
    cached = reply.batch
    reply = stub.Decode(pb.DecodeRequest(batches=[cached]))
    for g in reply.generations:
        out[g.request_id].append(g.token.id)
    kept = stub.FilterBatch(pb.FilterBatchRequest(batch_id=1, request_ids=[1, 3])).batch
    assert list(kept.request_ids) == [1, 3]
    while kept.ByteSize() and kept.size:
        reply = stub.Decode(pb.DecodeRequest(batches=[kept]))
        for g in reply.generations:
            out[g.request_id].append(g.token.id)
        kept = reply.batch if reply.HasField("batch") else pb.CachedBatch()
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    for rid in (1, 3):
        ref = hf.generate(torch.tensor([prompts[rid]]), do_sample=False, max_new_tokens=6)
        assert out[rid] == ref[0, len(prompts[rid]) :].tolist()
    assert generator.allocator.num_free == free

    stub.Prefill(pb.PrefillRequest(batch=pb.Batch(id=5, requests=[request(9, [1, 2, 3])])))
    assert generator.allocator.num_free < free
    stub.ClearCache(pb.ClearCacheRequest(id=5))
    assert generator.allocator.num_free == free and generator.batches == {}


def test_every_batch_call_reports_the_kv_blocks_in_use(stub, shard):
    _, _, generator = shard
    total = generator.allocator.num_usable
    # 20 + 3 tokens: two 16-token blocks each after the prefill.
    reply = stub.Prefill(pb.PrefillRequest(batch=pb.Batch(id=7, requests=[request(1, list(range(1, 21))), request(2, list(range(1, 21)))])))
    assert (reply.kv_cache.blocks_used, reply.kv_cache.blocks_total) == (4, total)
    reply = stub.Decode(pb.DecodeRequest(batches=[reply.batch]))
    assert reply.kv_cache.blocks_used == total - generator.allocator.num_free == 4
    filtered = stub.FilterBatch(pb.FilterBatchRequest(batch_id=7, request_ids=[2]))
    assert filtered.kv_cache.blocks_used == 2
    cleared = stub.ClearCache(pb.ClearCacheRequest())
    assert (cleared.kv_cache.blocks_used, cleared.kv_cache.blocks_total) == (0, total)


def test_unknown_batch_id_is_not_found_and_the_shard_keeps_serving(stub):
    for call in (
        lambda: stub.Decode(pb.DecodeRequest(batches=[pb.CachedBatch(id=77)])),
        lambda: stub.FilterBatch(pb.FilterBatchRequest(batch_id=77, request_ids=[1])),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "batch 77 not found" in err.value.details()
    stub.ClearCache(pb.ClearCacheRequest(id=77))  # dropping an unknown batch is a no-op
    stub.Health(pb.HealthRequest())


def test_prefill_beyond_the_kv_cache_is_resource_exhausted_with_token_numbers(stub, shard):
    _, _, generator = shard
    capacity = generator.cache.capacity_tokens
    big = request(1, [3] * (capacity + 1))
    with pytest.raises(grpc.RpcError) as err:
        stub.Prefill(pb.PrefillRequest(batch=pb.Batch(id=1, requests=[big])))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "KV cache full" in err.value.details() and f"{capacity} tokens" in err.value.details()
    assert generator.allocator.num_free == generator.allocator.num_usable


def test_invalid_request_is_invalid_argument(stub):
    with pytest.raises(grpc.RpcError) as err:
        stub.Prefill(pb.PrefillRequest(batch=pb.Batch(id=1, requests=[request(1, [])])))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no input_ids" in err.value.details()


def test_unexpected_error_is_internal_with_the_message(stub, shard, monkeypatch):
    _, _, generator = shard

    def broken(batches, chunk_tokens=0):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(generator, "decode", broken)
    with pytest.raises(grpc.RpcError) as err:
        stub.Decode(pb.DecodeRequest(batches=[pb.CachedBatch(id=1)]))
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "RuntimeError: kernel exploded" in err.value.details()
    stub.Health(pb.HealthRequest())


def test_health_answers_while_a_long_model_call_runs(stub, shard, monkeypatch):
    _, server, generator = shard
    release = threading.Event()
    original = generator.prefill

    def slow_prefill(batch, chunk_tokens=0):
        release.wait(30)
        return original(batch, chunk_tokens)

    monkeypatch.setattr(generator, "prefill", slow_prefill)
    future = stub.Prefill.future(
        pb.PrefillRequest(batch=pb.Batch(id=3, requests=[request(1, [4, 5])]))
    )
    try:
        for _ in range(100):
            if server.worker.pending:
                break
            threading.Event().wait(0.05)
        assert server.worker.pending
        stub.Health(pb.HealthRequest(), timeout=20)
        stub.Info(pb.InfoRequest(), timeout=20)
        assert not future.done()
    finally:
        release.set()
    assert future.result(timeout=30).batch.id == 3


def test_stale_socket_file_is_replaced_and_a_live_one_refused(short_dir):
    stale = short_dir / "stale-0"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # the file stays, nobody listens: what a killed shard leaves behind
    prepare_socket_path(stale)
    assert not stale.exists()

    live = short_dir / "live-0"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(live))
    listener.listen()
    try:
        with pytest.raises(OSError, match="in use by another running server"):
            prepare_socket_path(live)
    finally:
        listener.close()

    plain = short_dir / "plain-0"
    plain.write_text("not a socket")
    with pytest.raises(OSError, match="not a socket"):
        prepare_socket_path(plain)


def test_a_call_whose_rpc_is_cancelled_still_runs_so_ranks_stay_in_lockstep(stub, shard):
    _, server, generator = shard
    release = threading.Event()
    # Hold the worker so the Prefill waits in its queue while it is cancelled.
    server.worker._queue.put((concurrent.futures.Future(), release.wait, (30,)))
    pending = stub.Prefill.future(
        pb.PrefillRequest(batch=pb.Batch(id=21, requests=[request(1, [4, 5, 6])]))
    )
    time.sleep(0.5)
    pending.cancel()
    time.sleep(0.5)
    release.set()
    deadline = time.monotonic() + 30
    while 21 not in generator.batches and time.monotonic() < deadline:
        time.sleep(0.05)
    assert 21 in generator.batches
