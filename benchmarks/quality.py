r"""Perplexity of the default model: float32 vs round-to-nearest vs our GPTQ.

Held-out text is the KJV New Testament (public domain), calibration text the
Old Testament, both from Debian's `bible-kjv-text` package, fetched with
`apt-get download` into .cache/kjv (never committed). Perplexity is measured
on non-overlapping windows; the quantizer runs as a subprocess so its time
and peak memory are its own.

    .venv/bin/python benchmarks/quality.py [--groupsize 64] [--nsamples 128] [--seqlen 512]

Prints one line per configuration and a JSON summary (also written to
--out when given). Runs take minutes: each perplexity pass is ~65k tokens
through the model, and the quantizer calibrates all 30 layers.

Serving: with --served-kernels, each GPTQ checkpoint (ours, and any given with
--served-checkpoint) is also scored through the server's own model code with
each listed GPTQ kernel, and, with --peer-python, by transformers + GPTQModel
on the same checkpoint and windows; the served figures are reported as a
ratio to GPTQModel's (the bar is within 1%). Kernels: cpu-int4-avx2 (the
default on CPUs where the native kernels build), cpu-int4pack-bf16 (torch's
int4 packed matmul), gptq-reference (dequantize then matmul) and gptq-triton
(CUDA only).

    .venv/bin/python benchmarks/quality.py --variants "" --skip-rtn \
        --served-checkpoint .cache/quality/gptq-4b-g64-default \
        --served-kernels cpu-int4-avx2,cpu-int4pack-bf16,gptq-reference \
        --peer-python .cache/peers/gptqmodel/bin/python
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


class ServedModel:
    """The server's model code on one rank, behind the ``model(input_ids=...).logits`` call perplexity() makes.

    Each row of ``input_ids`` is prefilled as its own sequence in a paged KV
    cache, all rows in one forward, exactly as the engine batches prefills.
    """

    def __init__(self, path: Path, kernel: str, block_size: int = 16) -> None:
        import os

        from text_generation_server.distributed import init_distributed
        from text_generation_server.models import load_model

        os.environ["GPTQ_KERNEL"] = kernel
        try:
            self.model = load_model(path, dtype=torch.float32, device=torch.device("cpu"),
                                    dist=init_distributed(0, 1))
        finally:
            del os.environ["GPTQ_KERNEL"]
        self.block_size = block_size
        self._caches: dict[int, list] = {}

    def _kv(self, blocks: int) -> list:
        if blocks not in self._caches:
            self._caches.clear()
            m = self.model
            shape = (blocks, self.block_size, m.num_kv_heads, m.head_dim)
            self._caches[blocks] = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(m.num_layers)]
        return self._caches[blocks]

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, use_cache: bool = False):
        from types import SimpleNamespace

        from text_generation_server.layers.attention import AttentionMetadata

        rows, seqlen = input_ids.shape
        per_row = -(-seqlen // self.block_size)
        # block 0 is left unused, as the engine keeps it for padding
        tables = torch.arange(rows * per_row).view(rows, per_row) + 1
        positions = torch.arange(seqlen).repeat(rows)
        slots = (tables.repeat_interleave(self.block_size, dim=1)[:, :seqlen] * self.block_size
                 + torch.arange(seqlen) % self.block_size).flatten()
        attn = AttentionMetadata(slot_mapping=slots, block_tables=tables,
                                 context_lens=torch.full((rows,), seqlen), query_lens=[seqlen] * rows)
        hidden = self.model(input_ids.flatten(), positions, self._kv(rows * per_row + 1), attn)
        return SimpleNamespace(logits=self.model.compute_logits(hidden).view(rows, seqlen, -1))


def gptqmodel_perplexity(peer_python: str, checkpoint: Path, windows_file: Path) -> dict:
    """transformers + GPTQModel's perplexity on the same windows, in the peer virtualenv."""
    import os

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([peer_python, str(ROOT / "benchmarks" / "gptqmodel_perplexity.py"), str(checkpoint),
                           str(windows_file)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"GPTQModel perplexity failed ({proc.returncode})")
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def score_served(name: str, checkpoint: Path, windows: torch.Tensor, args) -> list[dict]:
    """Served perplexity of ``checkpoint`` per kernel, next to GPTQModel's on the same windows."""
    runs = []
    peer = None
    if args.peer_python:
        windows_file = args.workdir / "eval-windows.pt"
        windows_file.parent.mkdir(parents=True, exist_ok=True)
        torch.save(windows, windows_file)
        peer = gptqmodel_perplexity(args.peer_python, checkpoint, windows_file)
        print(f"{'GPTQModel ' + name:<28} ppl {peer['perplexity']:8.3f}  ({peer['tokens']} tokens, "
              f"{peer['seconds']:.0f} s; {peer['dtype']}, {', '.join(peer['kernels'])})", flush=True)
        runs.append({"name": f"GPTQModel {name}", "checkpoint": str(checkpoint), **peer})
    for kernel in filter(None, args.served_kernels.split(",")):
        served = ServedModel(checkpoint, kernel)
        result = perplexity(served, windows)
        extra = ""
        if peer is not None:
            extra = f"  ratio to GPTQModel {result.perplexity / peer['perplexity']:.4f}"
        entry = ppl_line(f"served {name} [{served.model.kernel}]", result, extra)
        entry.update(checkpoint=str(checkpoint), kernel=served.model.kernel)
        if peer is not None:
            entry["ratio_to_gptqmodel"] = result.perplexity / peer["perplexity"]
        runs.append(entry)
    return runs


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
    parser.add_argument("--served-checkpoint", action="append", default=[], metavar="DIR",
                        help="a GPTQ checkpoint to score through the server's model code (see --served-kernels)")
    parser.add_argument("--served-kernels", default="",
                        help="comma list of GPTQ kernels to serve each GPTQ checkpoint with: "
                             "cpu-int4-avx2 (the CPU default), cpu-int4pack-bf16, gptq-reference; "
                             "gptq-triton needs CUDA")
    parser.add_argument("--peer-python", default=None,
                        help="python of a venv with gptqmodel==7.6.0 + optimum: also score each served "
                             "checkpoint with transformers + GPTQModel")
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
        if args.served_kernels or args.peer_python:
            results["runs"] += score_served(f"ours {variant}", out, windows, args)
    for directory in args.served_checkpoint:
        results["runs"] += score_served(Path(directory).name, Path(directory), windows, args)
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
