"""Perplexity of the default model served in float32, bfloat16 and float16 (--dtype).

The 16-bit forms keep their weights (and KV cache) in 16 bits. Their decode steps, and steps of
at most 16 new tokens per sequence, run through the native layers with float32 activations;
longer prefills run through the modules in the model's dtype. So each form is measured twice on
the same held-out windows: prefilled in chunks of 16 (every token as a decode step would compute
it) and in one whole prefill (as a long prompt is computed).
"""

from __future__ import annotations

import sys
import time

import torch
from kv_cache_quality import default_model_windows, window_parser, window_perplexity

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    opts = window_parser(__doc__.splitlines()[0], 16).parse_args(argv)

    from text_generation_server.engine import Generator
    from text_generation_server.models import load_model

    checkpoint, windows, dist = default_model_windows(opts)
    print(f"Default model, {opts.windows} windows x {opts.seqlen} tokens of python-docs (held out):")
    base: dict[str, float] = {}  # float32's perplexity per measurement
    for name, dtype in DTYPES.items():
        model = load_model(checkpoint, dtype=dtype, device=torch.device("cpu"), dist=dist)
        gen = Generator(model, dist, num_blocks=opts.seqlen // 16 + 4)
        figures = []
        for label, chunk in (("decode path (chunks of 16)", 16), ("whole prefill", opts.seqlen)):
            start = time.perf_counter()
            ppl = window_perplexity(gen, windows, chunk)
            base.setdefault(label, ppl)
            figures.append(f"{label} {ppl:.4f} ({100 * (ppl / base[label] - 1):+.2f}%, "
                           f"{time.perf_counter() - start:.0f} s)")
        print(f"  {name:9s} {model.plan.name:17s} " + "; ".join(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
