"""Perplexity of a GPTQ checkpoint as transformers + GPTQModel 7.6.0 compute it (runs in the peer venv).

    peer/bin/python benchmarks/gptqmodel_perplexity.py CHECKPOINT windows.pt [--batch-size 4]

``windows.pt`` is a ``[n, seqlen]`` int64 tensor of token ids (written by
``benchmarks/quality.py``); every token but each window's first is scored,
as ``text_generation_server.quantize.perplexity`` does. Prints one JSON
object: perplexity, mean NLL, scored tokens, seconds, GPTQModel's dtype and
the kernel class it chose.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("windows")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F
    from gptqmodel import GPTQModel

    windows = torch.load(args.windows)
    model = GPTQModel.load(args.checkpoint, device="cpu")
    kernels = sorted({type(m).__name__ for m in model.model.modules() if hasattr(m, "qweight")})
    total, scored = 0.0, 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for batch in windows.split(args.batch_size):
            logits = model(input_ids=batch).logits
            nll = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(nll)
            scored += batch[:, 1:].numel()
    mean = total / scored
    print(json.dumps({
        "perplexity": math.exp(mean), "nll": mean, "tokens": scored, "windows": windows.shape[0],
        "seqlen": windows.shape[1], "seconds": time.perf_counter() - t0,
        "dtype": str(next(model.model.parameters()).dtype), "kernels": kernels,
    }), flush=True)


if __name__ == "__main__":
    main()
