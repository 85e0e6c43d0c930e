"""Run the Triton GPTQ kernel on random layers and print its error against the dense matmul.

Started by test_gptq_kernels.py in a fresh interpreter with
``TRITON_INTERPRET=1`` (it must be set before Triton is imported), and by
the CUDA test on a GPU. Argument: a JSON list of ``[name, layout, k, n]``.
Prints a JSON object ``{name: max abs error relative to the output's max}``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptq_random import activations, random_gptq  # noqa: E402
from text_generation_server.layers.quant.gptq_kernels.triton_kernel import TritonKernel  # noqa: E402


def main() -> None:
    cases = json.loads(sys.argv[1])
    device = torch.device(sys.argv[2] if len(sys.argv) > 2 else "cpu")
    errors = {}
    for name, layout, k, n in cases:
        weights, dense = random_gptq(k, n, **layout)
        why = TritonKernel.unsupported(weights, device)
        if why is not None:
            errors[name] = why
            continue
        for field in ("qweight", "qzeros", "scales", "g_idx"):
            setattr(weights, field, getattr(weights, field).to(device))
        x = activations(3, k)
        got = TritonKernel(weights)(x.to(device)).cpu()
        want = x @ dense.t()
        errors[name] = float((got - want).abs().max() / want.abs().max())
    print(json.dumps(errors))


if __name__ == "__main__":
    main()
