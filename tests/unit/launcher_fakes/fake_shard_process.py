"""A stand-in for `text-generation-server serve`: serves the fake shard's internal API on its socket.

Invoked exactly as the launcher invokes the real shard (``serve PATH --uds-path U [...]``,
RANK/WORLD_SIZE in the environment). Behaviour for tests comes from FAKE_* variables:
FAKE_EVENTS (a file that gets one JSON line per event: start, ready, sigterm, exit),
FAKE_SHARD_DELAY (seconds before serving), FAKE_CRASH_RANK + FAKE_CRASH_AFTER (that rank
exits with code 3 that many seconds after start; before serving when smaller than the
delay), FAKE_IGNORE_SIGTERM=1 (SIGTERM is recorded but ignored), FAKE_MODEL (JSON of
FakeModel fields). Each Prefill is recorded as a "prefill" event with its request ids and
whether it was refused.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import grpc  # noqa: E402
from fake_shard import FakeModel, FakeShard  # noqa: E402
from text_generation_server.pb.generate.v1 import generate_pb2_grpc  # noqa: E402

NAME = f"shard {os.environ.get('RANK', '0')}"


class RecordingShard(FakeShard):
    async def Prefill(self, request, context):
        ids = [r.id for r in request.batch.requests]
        try:
            answer = await super().Prefill(request, context)
        except BaseException:
            record("prefill", requests=ids, refused=True)
            raise
        record("prefill", requests=ids, refused=False)
        return answer


def record(event: str, **extra) -> None:
    path = os.environ.get("FAKE_EVENTS")
    if path:
        line = json.dumps({"who": NAME, "event": event, "t": time.time(), "pid": os.getpid(), **extra})
        with open(path, "a") as f:
            f.write(line + "\n")


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("command")
    parser.add_argument("model")
    parser.add_argument("--uds-path", required=True)
    args, _ = parser.parse_known_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    env_seen = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS", "CUDA_MEMORY_FRACTION")}
    record("start", argv=sys.argv[1:], env=env_seen, pgid=os.getpgid(0))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_sigterm() -> None:
        record("sigterm")
        if os.environ.get("FAKE_IGNORE_SIGTERM") != "1":
            stop.set()

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    loop.add_signal_handler(signal.SIGINT, on_sigterm)

    crash_after = None
    if os.environ.get("FAKE_CRASH_RANK") == str(rank):
        crash_after = float(os.environ.get("FAKE_CRASH_AFTER", "0"))
    started = time.monotonic()
    delay = float(os.environ.get("FAKE_SHARD_DELAY", "0"))

    async def wait_or_crash(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not stop.is_set():
            if crash_after is not None and time.monotonic() - started >= crash_after:
                record("exit", code=3)
                os._exit(3)
            await asyncio.sleep(0.05)

    await wait_or_crash(delay)
    if stop.is_set():
        record("exit", code=0)
        return 0
    urls = [f"unix://{args.uds_path}-{r}" for r in range(world)]
    server = grpc.aio.server()
    generate_pb2_grpc.add_TextGenerationServiceServicer_to_server(
        RecordingShard(FakeModel(**json.loads(os.environ.get("FAKE_MODEL", "{}"))), rank, urls), server
    )
    server.add_insecure_port(urls[rank])
    await server.start()
    record("ready")
    while not stop.is_set():
        await wait_or_crash(3600 if crash_after is None else crash_after + 1)
    await server.stop(None)
    Path(f"{args.uds_path}-{rank}").unlink(missing_ok=True)
    record("exit", code=0)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
