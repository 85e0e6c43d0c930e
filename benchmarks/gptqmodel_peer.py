"""GPTQModel as a peer: quantize the same calibration windows, or load our
checkpoint and generate. Runs in a separate virtualenv holding
`gptqmodel==7.6.0` and `optimum` (installing them into the project venv may
replace torch), e.g.

    peer/bin/python benchmarks/gptqmodel_peer.py quantize MODEL_DIR OUT windows.pt --group-size 64
    peer/bin/python benchmarks/gptqmodel_peer.py generate CHECKPOINT "The capital of France is"

`windows.pt` is a [nsamples, seqlen] int64 tensor of token ids (written by
`benchmarks/quality.py --save-windows`). `generate` prints a JSON object with
the greedy token ids per prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")


def quantize(args) -> None:
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig

    windows = torch.load(args.windows)
    calibration = [{"input_ids": w.unsqueeze(0), "attention_mask": torch.ones(1, w.numel(), dtype=torch.long)}
                   for w in windows]
    extra = {"desc_act": True} if args.desc_act else {}  # otherwise GPTQModel's own defaults
    config = QuantizeConfig(bits=args.bits, group_size=args.group_size, **extra)
    t0, c0 = time.perf_counter(), time.process_time()
    model = GPTQModel.load(args.model, config, device="cpu")
    model.quantize(calibration, batch_size=1)
    model.save(args.out)
    print(json.dumps({
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


def generate(args) -> None:
    import torch
    from gptqmodel import GPTQModel
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    model = GPTQModel.load(args.checkpoint, device="cpu", dtype=getattr(torch, args.dtype))
    out = {}
    for prompt in args.prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                                 do_sample=False)
        out[prompt] = gen[0, ids.shape[1]:].tolist()
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1].float()
        top = torch.topk(logits, 5)
        out[prompt + " [top5]"] = [[int(i), round(float(v), 4)] for v, i in zip(top.values, top.indices, strict=True)]
    print(json.dumps({"dtype": args.dtype, "tokens": out}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize")
    q.add_argument("model")
    q.add_argument("out")
    q.add_argument("windows")
    q.add_argument("--bits", type=int, default=4)
    q.add_argument("--group-size", type=int, default=64)
    q.add_argument("--desc-act", action="store_true")
    q.set_defaults(func=quantize)
    g = sub.add_parser("generate")
    g.add_argument("checkpoint")
    g.add_argument("prompts", nargs="+")
    g.add_argument("--max-new-tokens", type=int, default=16)
    g.add_argument("--dtype", default="float32", help="compute dtype (GPTQModel picks bfloat16 on CPU by default)")
    g.set_defaults(func=generate)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
