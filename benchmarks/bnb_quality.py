"""Perplexity of the default model under --quantize bitsandbytes / -nf4 / -fp4.

Each mode is scored twice on the same held-out windows (KJV New Testament,
as benchmarks/quality.py fetches it): through our own model code, loaded with
``load_model(..., quantize=mode)`` as a shard loads it, and through
transformers with bitsandbytes (``BitsAndBytesConfig``) on the same
checkpoint, the reference a user would compare against. Unquantized runs of
both give the baseline. The perplexity tool is the one the GPTQ benchmark
uses (``text_generation_server.quantize.perplexity.perplexity``).

    .venv/bin/python benchmarks/bnb_quality.py [--eval-windows 128] [--seqlen 512]
        [--modes bitsandbytes,bitsandbytes-nf4,bitsandbytes-fp4] [--skip-peer] [--out FILE]

transformers' bitsandbytes integration needs ``accelerate``; when the venv
lacks it, install it beside the venv, not into it:
``pip install --no-deps --target .cache/bnb-peer accelerate psutil pyyaml``
(this script puts .cache/bnb-peer on sys.path). Each pass is ~65k tokens
through the model; the whole run takes tens of minutes on a small CPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "server"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(ROOT / ".cache" / "bnb-peer"))

from quality import kjv_texts  # noqa: E402
from text_generation_server.quantize.data import Text, eval_windows, tokenize  # noqa: E402
from text_generation_server.quantize.perplexity import perplexity  # noqa: E402

MODES = ("bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4")


class ServedModel:
    """Our sharded model behind the call ``perplexity()`` makes: ``model(input_ids=...).logits``.

    Every window is one prefill of its own sequence; the KV cache holds one
    block of ``seqlen`` slots per window of a batch.
    """

    def __init__(self, model, seqlen: int, batch_size: int) -> None:
        self.model = model
        self.seqlen = seqlen
        shape = (batch_size + 1, seqlen, model.num_kv_heads, model.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=model.dtype), torch.zeros(shape, dtype=model.dtype))
            for _ in range(model.num_layers)
        ]

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        from text_generation_server.layers.attention import AttentionMetadata

        batch, seqlen = input_ids.shape
        blocks = torch.arange(1, batch + 1)
        positions = torch.arange(seqlen).repeat(batch)
        attn = AttentionMetadata(
            slot_mapping=(blocks.repeat_interleave(seqlen) * self.seqlen + positions),
            block_tables=blocks.unsqueeze(1),
            context_lens=torch.full((batch,), seqlen, dtype=torch.int64),
            query_lens=[seqlen] * batch,
        )
        hidden = self.model(input_ids.reshape(-1), positions, self.kv_caches, attn)
        logits = self.model.compute_logits(hidden)
        return SimpleNamespace(logits=logits.view(batch, seqlen, -1))


def ours(path: Path, mode: str | None, dtype: torch.dtype, seqlen: int, batch_size: int):
    from text_generation_server.distributed import init_distributed
    from text_generation_server.models import load_model

    model = load_model(
        path, dtype=dtype, device=torch.device("cpu"), dist=init_distributed(0, 1), quantize=mode
    )
    return ServedModel(model, seqlen, batch_size), model.kernel


def peer(path: Path, mode: str | None, dtype: torch.dtype):
    """transformers' own model, quantized at load by its bitsandbytes integration."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = None
    if mode == "bitsandbytes":
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
    elif mode is not None:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=mode.removeprefix("bitsandbytes-"),
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=False,
        )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=config)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="default")
    parser.add_argument("--eval-windows", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--skip-peer", action="store_true", help="only our model code")
    parser.add_argument("--skip-unquantized", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON summary here")
    args = parser.parse_args()

    from text_generation_server.model_source import resolve_model
    from text_generation_server.utils.log import setup_logging
    from transformers import AutoTokenizer

    setup_logging("bnb-quality")
    # bitsandbytes' int8 matmul warns on every call that float32 inputs are cast to float16.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    dtype = getattr(torch, args.dtype)
    path = resolve_model(None if args.model == "default" else args.model)
    _, nt = kjv_texts()
    tokenizer = AutoTokenizer.from_pretrained(path)
    windows = eval_windows(
        tokenize(tokenizer, Text(nt.read_text(), str(nt))), args.eval_windows, args.seqlen
    )
    print(
        f"model {path}; held-out {nt.name}: {windows.shape[0]} windows of {args.seqlen}; "
        f"dtype {args.dtype}; cpu {torch.backends.cpu.get_cpu_capability()}, "
        f"{torch.get_num_threads()} threads",
        flush=True,
    )
    modes: list[str | None] = [] if args.skip_unquantized else [None]
    modes += [m for m in args.modes.split(",") if m]
    runs: list[dict] = []
    for mode in modes:
        label = mode or "unquantized"
        entry: dict = {"mode": label}
        t0 = time.perf_counter()
        model, kernel = ours(path, mode, dtype, args.seqlen, args.batch_size)
        load_s = time.perf_counter() - t0
        result = perplexity(model, windows, args.batch_size)
        entry["ours"] = {**result.as_dict(), "kernel": kernel, "load_seconds": load_s}
        print(
            f"{label:<18} ours         ppl {result.perplexity:8.3f}  ({result.seconds:.0f} s; {kernel})",
            flush=True,
        )
        del model
        gc.collect()
        if not args.skip_peer:
            result = perplexity(peer(path, mode, dtype), windows, args.batch_size)
            entry["transformers"] = result.as_dict()
            ratio = entry["ours"]["perplexity"] / result.perplexity
            entry["ours_over_transformers"] = ratio
            print(f"{label:<18} transformers ppl {result.perplexity:8.3f}  ({result.seconds:.0f} s)  "
                  f"ours/transformers {ratio:.4f}", flush=True)  # fmt: skip
            gc.collect()
        runs.append(entry)
    base = next((r for r in runs if r["mode"] == "unquantized"), None)
    if base is not None:
        for r in runs:
            r["ours_vs_unquantized"] = r["ours"]["perplexity"] / base["ours"]["perplexity"] - 1
    summary = {
        "model": str(path),
        "windows": int(windows.shape[0]),
        "seqlen": args.seqlen,
        "dtype": args.dtype,
        "runs": runs,
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
