"""Run our quantizer on a small model, and build the float "twin" of any GPTQ checkpoint.

The twin is the same model with every packed linear replaced by the weight
the checkpoint encodes, read back with numpy bit operations (one
little-endian bit stream per column, any width, 3 bits included) rather than
with the packing code under test; transformers' forward over the twin is
the reference a server must reproduce.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

WORDS = ("the model reads tokens and writes text over a socket while the router batches "
         "requests from clients in order to keep every core busy with work on weights and caches").split()


def calibration_text(path: Path, seed: int = 0, lines: int = 400) -> Path:
    """A deterministic text from a small vocabulary, written to ``path``."""
    rng = np.random.default_rng(seed)
    path.write_text("\n".join(" ".join(rng.choice(WORDS, size=12)) + "." for _ in range(lines)))
    return path


def run_quantizer(model: Path, out: Path, corpus: Path, *flags: str) -> Path:
    """``text-generation-server quantize`` with few, short calibration windows; fails the test on error."""
    from text_generation_server.quantize import cli

    argv = ["quantize", str(model), str(out), "--dataset", str(corpus), "--nsamples", "8", "--seqlen", "64",
            *flags]
    code = cli.main(argv)
    assert code == 0, f"quantize {' '.join(flags)} exited with {code}"
    return out


def unpack_stream(packed: torch.Tensor, bits: int) -> np.ndarray:
    """int32 ``[words, cols]`` -> codes ``[words * 32 / bits, cols]``: each column's words
    read as one bit stream, lowest bit of the first word first."""
    words = np.ascontiguousarray(packed.numpy().T).astype("<i4").view("<u4")  # [cols, words]
    stream = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")  # [cols, words * 32]
    n = stream.shape[1] // bits
    values = stream[:, : n * bits].reshape(stream.shape[0], n, bits).astype(np.int64)
    return (values << np.arange(bits)).sum(axis=-1).T


def dequantize(tensors: dict[str, torch.Tensor], stem: str, bits: int, fmt: str = "gptq") -> torch.Tensor:
    """``w[o, i] = scales[g_idx[i], o] * (q[i, o] - zero[g_idx[i], o])`` as ``[out, in]`` float32."""
    q = unpack_stream(tensors[f"{stem}.qweight"], bits)  # [in, out]
    z = unpack_stream(tensors[f"{stem}.qzeros"].t().contiguous(), bits).T  # [G, out]
    if fmt == "gptq":
        z = z + 1  # v1 stores zero - 1
    s = tensors[f"{stem}.scales"].float().numpy()
    g = tensors[f"{stem}.g_idx"].numpy().astype(np.int64)
    w = s[g] * (q - z[g]).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(w.T))


def read_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(checkpoint.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def dense_twin(checkpoint: Path, out: Path) -> Path:
    """A plain float32 checkpoint at ``out`` holding exactly the weights ``checkpoint`` encodes."""
    config = json.loads((checkpoint / "config.json").read_text())
    qc = config.pop("quantization_config", None)
    if qc is None:
        qc = json.loads((checkpoint / "quantize_config.json").read_text())
    bits, fmt = qc["bits"], qc.get("checkpoint_format", "gptq")
    out.mkdir(parents=True, exist_ok=True)
    for f in checkpoint.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "quantize_config.json"):
            shutil.copy(f, out / f.name)
    config["torch_dtype"] = config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config))
    tensors = read_tensors(checkpoint)
    dense = {}
    for name, t in tensors.items():
        if name.endswith(".qweight"):
            stem = name.removesuffix(".qweight")
            dense[f"{stem}.weight"] = dequantize(tensors, stem, bits, fmt)
        elif not name.endswith((".qzeros", ".scales", ".g_idx")):
            dense[name] = t.float().contiguous()
    save_file(dense, str(out / "model.safetensors"))
    return out
