"""Perplexity of the default model: float32 vs round-to-nearest vs our GPTQ.

Held-out text is the KJV New Testament (public domain), calibration text the
Old Testament, both from Debian's `bible-kjv-text` package, fetched with
`apt-get download` into .cache/kjv (never committed). Perplexity is measured
on non-overlapping windows; the quantizer runs as a subprocess so its time
and peak memory are its own.

    .venv/bin/python benchmarks/quality.py [--groupsize 64] [--nsamples 128] [--seqlen 512]

Prints one line per configuration and a JSON summary (also written to
--out when given). Runs take minutes: each perplexity pass is ~65k tokens
through the model, and the quantizer calibrates all 30 layers.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "server"))

from text_generation_server.quantize.data import Text, eval_windows, tokenize  # noqa: E402
from text_generation_server.quantize.gptq import QuantSpec, quantize_rtn  # noqa: E402
from text_generation_server.quantize.perplexity import load_float_model, perplexity  # noqa: E402

KJV_DIR = ROOT / ".cache" / "kjv"
_REF = re.compile(r"^\S+\d+:\d+ ")


def kjv_texts() -> tuple[Path, Path]:
    """Old and New Testament as plain text files (one verse per line, references dropped)."""
    ot, nt = KJV_DIR / "old-testament.txt", KJV_DIR / "new-testament.txt"
    if ot.is_file() and nt.is_file():
        return ot, nt
    KJV_DIR.mkdir(parents=True, exist_ok=True)
    if not list(KJV_DIR.glob("bible-kjv_*.deb")) or not list(KJV_DIR.glob("bible-kjv-text_*.deb")):
        subprocess.run(["apt-get", "download", "bible-kjv-text", "bible-kjv"], cwd=KJV_DIR, check=True)
    for deb in KJV_DIR.glob("*.deb"):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(KJV_DIR / "root")], check=True)
    tool = KJV_DIR / "root" / "usr" / "bin" / "bible"
    data = KJV_DIR / "root" / "usr" / "lib"
    for target, span in ((ot, "Ge1:1-Mal4:6"), (nt, "Mat1:1-Rev22:21")):
        raw = subprocess.run([str(tool), "-p", str(data), "-f", span], check=True, capture_output=True, text=True).stdout
        verses = [_REF.sub("", line).strip() for line in raw.splitlines() if line.strip()]
        target.write_text("\n".join(verses) + "\n")
    return ot, nt


def ppl_line(name: str, result, extra: str = "") -> dict:
    print(f"{name:<28} ppl {result.perplexity:8.3f}  ({result.tokens} tokens, {result.seconds:.0f} s){extra}", flush=True)
    return {"name": name, **result.as_dict()}


def rtn_model(path: Path, spec: QuantSpec):
    model = load_float_model(path)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            module.weight.data = quantize_rtn(module.weight.data, spec).dequant
    return model


def run_quantizer(model: str, out: Path, calib: Path, args, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "text_generation_server.quantize.cli", "quantize", model, str(out),
           "--groupsize", str(args.groupsize), "--bits", str(args.bits), "--nsamples", str(args.nsamples),
           "--seqlen", str(args.seqlen), "--dataset", str(calib), "--overwrite", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"quantizer failed ({proc.returncode})")
    rss = re.search(r"peak RSS (\d+) MiB", proc.stderr.split("Wrote ")[-1])
    cpu = re.search(r"CPU time (\d+) s", proc.stderr)
    return {"seconds": seconds, "cpu_seconds": int(cpu.group(1)) if cpu else None,
            "peak_rss_mib": int(rss.group(1)) if rss else None, "args": extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--groupsize", type=int, default=64)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=128)
    parser.add_argument("--variants", default="default,plain,act-order",
                        help="our quantizer runs: comma list of default, plain, group-aware, act-order, static-groups, "
                             "no-true-sequential")
    parser.add_argument("--skip-fp32", action="store_true")
    parser.add_argument("--skip-rtn", action="store_true")
    parser.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "quality")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON summary here")
    parser.add_argument("--save-windows", type=Path, default=None,
                        help="write the calibration windows (the quantizer's own choice) as a tensor file for peers")
    parser.add_argument("--extra-checkpoint", action="append", default=[], metavar="NAME=DIR",
                        help="also score an existing checkpoint (e.g. a peer's)")
    args = parser.parse_args()

    from text_generation_server.model_source import resolve_model
    from transformers import AutoTokenizer

    torch.set_num_threads(torch.get_num_threads())
    path = resolve_model(None if args.model == "default" else args.model)
    ot, nt = kjv_texts()
    tokenizer = AutoTokenizer.from_pretrained(path)
    windows = eval_windows(tokenize(tokenizer, Text(nt.read_text(), str(nt))), args.eval_windows, args.seqlen)
    print(f"model {path}; held-out {nt.name}: {windows.shape[0]} windows of {args.seqlen}; "
          f"calibration {ot.name}: {args.nsamples}x{args.seqlen}; {args.bits}-bit g{args.groupsize}; "
          f"cpu {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads", flush=True)
    results: dict = {"model": str(path), "bits": args.bits, "groupsize": args.groupsize, "runs": []}

    if args.save_windows:
        from text_generation_server.quantize.data import calibration_windows

        calib = tokenize(tokenizer, Text(ot.read_text(), str(ot)))
        torch.save(calibration_windows(calib, args.nsamples, args.seqlen, 0), args.save_windows)
    for item in args.extra_checkpoint:
        name, _, directory = item.partition("=")
        results["runs"].append(ppl_line(name, perplexity(load_float_model(Path(directory)), windows)))
    if not args.skip_fp32:
        results["runs"].append(ppl_line("float32", perplexity(load_float_model(path), windows)))
    if not args.skip_rtn:
        spec = QuantSpec(bits=args.bits, group_size=args.groupsize)
        results["runs"].append(ppl_line(f"RTN {args.bits}-bit g{args.groupsize}", perplexity(rtn_model(path, spec), windows)))
    flags = {"default": [], "act-order": ["--act-order"], "no-true-sequential": ["--no-true-sequential"],
             "static-groups": ["--act-order", "--static-groups"], "group-aware": ["--group-aware-order"],
             "plain": ["--no-group-aware-order"]}
    for variant in filter(None, args.variants.split(",")):
        out = args.workdir / f"gptq-{args.bits}b-g{args.groupsize}-{variant}"
        run = run_quantizer(args.model, out, ot, args, flags[variant])
        entry = ppl_line(f"ours GPTQ {variant}", perplexity(load_float_model(out), windows),
                         f"  quantize {run['seconds']:.0f} s (CPU {run['cpu_seconds']} s), peak RSS {run['peak_rss_mib']} MiB")
        entry["quantize"] = run
        results["runs"].append(entry)
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
