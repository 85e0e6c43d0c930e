"""A stand-in for `text-generation-router`: grpc.health.v1 SERVING on --grpc-port.

FAKE_EVENTS as for the fake shard; FAKE_ROUTER_DELAY (seconds before SERVING),
FAKE_ROUTER_DRAIN (seconds it takes to stop after SIGTERM; a second SIGTERM
stops it at once), FAKE_ROUTER_CRASH_AFTER (exit code 4 that many seconds after SERVING).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


def record(event: str, **extra) -> None:
    path = os.environ.get("FAKE_EVENTS")
    if path:
        line = json.dumps({"who": "router", "event": event, "t": time.time(), "pid": os.getpid(), **extra})
        with open(path, "a") as f:
            f.write(line + "\n")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--hostname", default="0.0.0.0")
    args, _ = parser.parse_known_args()
    record("start", argv=sys.argv[1:])

    signals = []
    stop = threading.Event()

    def on_signal(signum, frame) -> None:
        signals.append(signum)
        record("sigterm", n=len(signals))
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    time.sleep(float(os.environ.get("FAKE_ROUTER_DELAY", "0")))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"{args.hostname}:{args.grpc_port}")
    server.start()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    record("ready")

    crash_after = os.environ.get("FAKE_ROUTER_CRASH_AFTER")
    deadline = time.monotonic() + float(crash_after) if crash_after else None
    while not stop.wait(0.05):
        if deadline is not None and time.monotonic() >= deadline:
            record("exit", code=4)
            return 4
    drain_until = time.monotonic() + float(os.environ.get("FAKE_ROUTER_DRAIN", "0"))
    while time.monotonic() < drain_until and len(signals) < 2:
        time.sleep(0.05)
    server.stop(None)
    record("exit", code=0, signals=len(signals))
    return 0


if __name__ == "__main__":
    sys.exit(main())
