"""Perplexity of the default model served with its KV cache in float32 and in bfloat16 (--kv-cache-dtype).

Each held-out window is prefilled through the engine in chunks (``--chunk`` tokens), so every token's
attention reads its context's keys and values back from the cache in the dtype under test, and the
perplexity comes from the prompt logprobs the server returns. Same windows, same engine, one run.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch


def held_out_windows(checkpoint, count: int, seqlen: int) -> list[list[int]]:
    """``count`` windows of ``seqlen`` tokens spread over python-docs' held-out text."""
    from text_generation_server.quantize.data import load_text
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)
    ids = tokenizer(load_text("python-docs", "eval").text)["input_ids"]
    stride = len(ids) // count
    return [ids[i * stride : i * stride + seqlen] for i in range(count)]


def window_perplexity(gen, windows: list[list[int]], chunk: int) -> float:
    """Perplexity of ``windows`` from the prompt logprobs the engine returns, each prefilled in
    chunks of ``chunk`` tokens (so every token attends to its context through the cache)."""
    from text_generation_server.pb.generate.v1 import generate_pb2 as pb

    nll, count = 0.0, 0
    for w, window in enumerate(windows):
        request = pb.Request(id=w + 1, input_ids=window, prefill_logprobs=True,
                             stopping=pb.StoppingParameters(max_new_tokens=1))
        generations, cached, _ = gen.prefill(pb.Batch(id=w + 1, requests=[request]), chunk)
        while not generations:
            generations, cached, _ = gen.decode([cached], chunk)
        lps = [t.logprob for t in generations[0].prefill_tokens[1:]]
        nll -= sum(lps)
        count += len(lps)
        gen.clear_cache(None)
    return math.exp(nll / count)


def window_parser(description: str, windows: int) -> argparse.ArgumentParser:
    """The options every held-out-window measurement takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--windows", type=int, default=windows, help=f"held-out windows (default {windows})")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--threads", type=int, default=2)
    return p


def default_model_windows(opts: argparse.Namespace):
    """Quiet logs, the threads, the default model's checkpoint, its held-out windows and one rank."""
    from loguru import logger
    from text_generation_server.distributed import init_distributed
    from text_generation_server.model_source import resolve_model

    logger.remove()
    torch.set_num_threads(opts.threads)
    checkpoint = resolve_model(None, None)
    return checkpoint, held_out_windows(checkpoint, opts.windows, opts.seqlen), init_distributed(0, 1)


def main(argv: list[str] | None = None) -> int:
    p = window_parser(__doc__.splitlines()[0], 32)
    p.add_argument("--chunk", type=int, default=32, help="prefill chunk in tokens (default 32)")
    opts = p.parse_args(argv)

    from text_generation_server.engine import Generator
    from text_generation_server.models import load_model

    checkpoint, windows, dist = default_model_windows(opts)
    model = load_model(checkpoint, dtype=torch.float32, device=torch.device("cpu"), dist=dist)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        gen = Generator(model, dist, kv_dtype=dtype, num_blocks=opts.seqlen // 16 + 4)
        start = time.perf_counter()
        ppl = window_perplexity(gen, windows, opts.chunk)
        results[dtype] = (ppl, time.perf_counter() - start, gen.cache.nbytes)
    base = results[torch.float32][0]
    print(f"Default model fp32, KV cache dtype, {opts.windows} windows x {opts.seqlen} tokens of python-docs "
          f"(held out), prefill chunks of {opts.chunk}:")
    for dtype, (ppl, seconds, nbytes) in results.items():
        print(f"  {str(dtype).removeprefix('torch.'):9s} perplexity {ppl:.4f} ({100 * (ppl / base - 1):+.3f}%), "
              f"{nbytes / (opts.seqlen // 16 + 3) / 16 / 1024:.1f} KiB per token, {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
