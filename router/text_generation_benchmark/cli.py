"""``text-generation-benchmark``: sweep batch sizes and prompt/generation lengths against a target.

Targets: a running server through the public gRPC API (``--server HOST:PORT``,
the default ``localhost:8033``) or the shards directly through the internal
API (``--shard-uds-path PATH``, the prefix the launcher was given). Prints a
table of prefill latency, time to first token, inter-token latency and
throughput with percentiles; ``--json-output FILE`` also writes them as JSON.
Exit codes: 0 done, 1 the target failed or is unreachable, 2 bad flags.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from loguru import logger
from text_generation_server.utils.argtypes import non_negative_int, positive_int
from text_generation_server.utils.log import setup_logging
from tqdm import tqdm

from text_generation_benchmark.measure import RunMeasurement, Shape, TargetError, summarize
from text_generation_benchmark.report import document, table, write_json
from text_generation_benchmark.server_target import ServerTarget
from text_generation_benchmark.shard_target import ShardTarget

DEFAULT_SERVER = "localhost:8033"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="text-generation-benchmark",
        description="Latency and throughput of a text-generation server or its shards, "
        "over a sweep of batch sizes and prompt/generation lengths.",
    )
    target = parser.add_mutually_exclusive_group()
    target.add_argument(
        "--server",
        metavar="HOST:PORT",
        help=f"public gRPC address of a running server (default {DEFAULT_SERVER})",
    )
    target.add_argument(
        "--shard-uds-path",
        metavar="PATH",
        help="benchmark the shards directly over their unix sockets PATH-0, PATH-1, ... "
        "(the launcher's --shard-uds-path, e.g. /tmp/text-generation-server/shard)",
    )
    parser.add_argument("--batch-size", "-b", type=positive_int, nargs="+", action="extend",
                        help="requests sent together (repeatable; default 1 2 4 8)")
    parser.add_argument("--sequence-length", "-s", type=positive_int, nargs="+", action="extend",
                        help="prompt tokens per request (repeatable; default 10)")
    parser.add_argument("--decode-length", "-d", type=positive_int, nargs="+", action="extend",
                        help="generated tokens per request (repeatable; default 8)")
    parser.add_argument("--runs", "-r", type=positive_int, default=10, help="measured runs per point (default 10)")
    parser.add_argument("--warmups", "-w", type=non_negative_int, default=1,
                        help="unmeasured runs per point before the measured ones (default 1)")
    parser.add_argument("--json-output", type=Path, metavar="FILE", help="also write the results as JSON to FILE")
    parser.add_argument("--connect-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="how long to wait for the target to answer (default 10)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _shapes(args: argparse.Namespace) -> list[Shape]:
    batch = sorted(set(args.batch_size or [1, 2, 4, 8]))
    prompt = sorted(set(args.sequence_length or [10]))
    new = sorted(set(args.decode_length or [8]))
    return [Shape(b, p, n) for p, n, b in itertools.product(prompt, new, batch)]


def _load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


async def benchmark(args: argparse.Namespace) -> dict:
    """Run the sweep; print the table to stdout and return the JSON document."""
    if args.shard_uds_path:
        target: ServerTarget | ShardTarget = ShardTarget(args.shard_uds_path, connect_timeout=args.connect_timeout)
        where = f"shards at {args.shard_uds_path}-*"
    else:
        address = args.server or DEFAULT_SERVER
        target = ServerTarget(address, connect_timeout=args.connect_timeout)
        where = f"server {address}"
    shapes = _shapes(args)
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    load_start = _load_average()
    t0 = time.perf_counter()
    await target.connect()
    try:
        for shape in shapes:
            target.check(shape)
        logger.info(f"Benchmarking {where}: {len(shapes)} points, {args.warmups} warm-up + {args.runs} runs each; "
                    f"load average {load_start}")
        results = []
        total = len(shapes) * (args.warmups + args.runs)
        with tqdm(total=total, desc="benchmark", unit="run", file=sys.stderr, disable=args.no_progress) as bar:
            for shape in shapes:
                bar.set_postfix_str(f"batch {shape.batch_size}, prompt {shape.prompt_tokens}, new {shape.new_tokens}")
                runs: list[RunMeasurement] = []
                for i in range(args.warmups + args.runs):
                    run = await target.run(shape)
                    if i >= args.warmups:
                        runs.append(run)
                    bar.update(1)
                results.append((shape, summarize(runs)))
    finally:
        await target.close()
    load = {"start": load_start, "end": _load_average()}
    print(table(results))
    print(f"load average (1, 5, 15 min): start {load['start']}, end {load['end']}")
    return document(
        target=target.describe(),
        settings={"runs": args.runs, "warmups": args.warmups},
        results=results,
        load_average=load,
        started_at=started_at,
        duration_s=round(time.perf_counter() - t0, 3),
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging("benchmark")
    try:
        doc = asyncio.run(benchmark(args))
    except TargetError as err:
        logger.error(f"Benchmark failed: {err}")
        return 1
    except KeyboardInterrupt:
        logger.info("Interrupted")
        return 130
    if args.json_output:
        try:
            write_json(args.json_output, doc)
        except OSError as err:
            logger.error(f"Cannot write --json-output {args.json_output}: {err}")
            return 1
        logger.info(f"Wrote {args.json_output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
