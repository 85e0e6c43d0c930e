"""Profile one rank's decode step on the default model (or --model DIR), in process, no gRPC.

Prints where a decode step's time goes: the wall time of Generator.decode,
the model forward alone, and the top operators (torch.profiler) or Python
functions (--python, cProfile). Used to pick the engine's fast paths; numbers
on a shared host are only comparable within one run.

    .venv/bin/python benchmarks/profile_decode.py --batch 1 --steps 64
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from pathlib import Path

import torch


def build(model_dir: Path | None, threads: int, quantize: str | None, dtype: str = "float32"):
    from text_generation_server.distributed import init_distributed
    from text_generation_server.engine import Generator
    from text_generation_server.model_source import resolve_model
    from text_generation_server.models import load_model

    torch.set_num_threads(threads)
    path = resolve_model(str(model_dir) if model_dir else None, None)
    dist = init_distributed(0, 1)
    model = load_model(path, dtype=getattr(torch, dtype), device=torch.device("cpu"), dist=dist, quantize=quantize)
    return Generator(model, dist)


def batch_pb(batch: int, prompt: int, new_tokens: int, vocab: int, batch_id: int):
    from text_generation_server.pb.generate.v1 import generate_pb2 as pb

    g = torch.Generator().manual_seed(batch_id)
    return pb.Batch(
        id=batch_id,
        requests=[
            pb.Request(
                id=batch_id * 1000 + i,
                input_ids=torch.randint(256, vocab, (prompt,), generator=g).tolist(),
                sampling=pb.SamplingParameters(do_sample=False),
                stopping=pb.StoppingParameters(max_new_tokens=new_tokens, ignore_eos_token=True),
            )
            for i in range(batch)
        ],
    )


def decode_steps(gen, batch: int, prompt: int, steps: int, batch_id: int) -> list[float]:
    """Wall seconds of each Generator.decode call for ``steps`` steps."""
    _, cached, _ = gen.prefill(batch_pb(batch, prompt, steps + 2, int(gen.model.vocab_size), batch_id))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        _, cached, _ = gen.decode([cached])
        times.append(time.perf_counter() - t0)
    gen.clear_cache(None)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="checkpoint directory (default: the built-in default model)")
    p.add_argument("--quantize")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--python", action="store_true", help="cProfile Python functions instead of torch operators")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    from text_generation_server.utils.log import setup_logging

    setup_logging("profile", level="WARNING")

    gen = build(args.model, args.threads, args.quantize, args.dtype)
    decode_steps(gen, args.batch, args.prompt, 8, 1)  # warm-up
    times = sorted(decode_steps(gen, args.batch, args.prompt, args.steps, 2))
    median = times[len(times) // 2]
    print(f"decode step (batch {args.batch}): median {median * 1e3:.2f} ms, "
          f"min {times[0] * 1e3:.2f} ms -> {args.batch / median:.1f} tok/s")
    if args.python:
        prof = cProfile.Profile()
        prof.enable()
        decode_steps(gen, args.batch, args.prompt, args.steps, 3)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        decode_steps(gen, args.batch, args.prompt, args.steps, 3)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
