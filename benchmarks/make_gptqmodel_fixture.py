"""Write tests/fixtures/gptqmodel_tiny: a tiny Llama quantized by GPTQModel 7.6.0.

The test suite runs without GPTQModel, so the interop check against a
checkpoint written by an established tool needs the checkpoint committed.
This script makes it: a random 2-layer Llama (hidden 64, tied embeddings,
tests/tiny_model.py), quantized by GPTQModel (4-bit, group size 32,
act-order, its own defaults otherwise) on random token windows, in the peer
virtualenv; then GPTQModel itself generates greedily and reports its top-5
logits for a few prompts in float32, saved beside the checkpoint as
``gptqmodel_expected.json`` for the test to compare with.

    .venv/bin/python benchmarks/make_gptqmodel_fixture.py [--peer-python /work/peers/gptq-venv/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from tiny_model import build_tiny_llama  # noqa: E402

PEER_SCRIPT = ROOT / "benchmarks" / "gptqmodel_peer.py"
OUT = ROOT / "tests" / "fixtures" / "gptqmodel_tiny"
PROMPTS = ["The capital of France is", "Once upon a time there"]
GROUP_SIZE = 32
# Files GPTQModel writes that serving does not read.
_DROP = {"quant_log.csv", "generation_config.json"}


def peer(python: str, *args: str) -> str:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([python, str(PEER_SCRIPT), *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"GPTQModel peer failed ({proc.returncode})")
    return [line for line in proc.stdout.splitlines() if line.startswith("{")][-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer-python", default=os.environ.get("GPTQMODEL_PYTHON", "/work/peers/gptq-venv/bin/python"))
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = build_tiny_llama(tmp / "src", tie_word_embeddings=True, seed=1234)
        windows = torch.randint(4, 384, (32, 64), generator=torch.Generator().manual_seed(0))
        torch.save(windows, tmp / "windows.pt")
        quantized = tmp / "gptq"
        print(peer(args.peer_python, "quantize", str(src), str(quantized), str(tmp / "windows.pt"),
                   "--group-size", str(GROUP_SIZE), "--desc-act"))
        expected = json.loads(peer(args.peer_python, "generate", str(quantized), *PROMPTS,
                                   "--dtype", "float32", "--max-new-tokens", "8"))
        (quantized / "gptqmodel_expected.json").write_text(json.dumps(expected, indent=1) + "\n")
        if args.out.exists():
            shutil.rmtree(args.out)
        args.out.mkdir(parents=True)
        for f in sorted(quantized.iterdir()):
            if f.is_file() and f.name not in _DROP:
                shutil.copy(f, args.out / f.name)
    total = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"wrote {args.out} ({total / 1024:.0f} KiB): {', '.join(sorted(f.name for f in args.out.iterdir()))}")


if __name__ == "__main__":
    main()
