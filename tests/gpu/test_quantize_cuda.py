"""`text-generation-server quantize --device cuda` (skips without a GPU): the layers are quantized
on the GPU, the checkpoint serves its encoded weights, and its quality is the CPU run's."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def test_quantizing_on_the_gpu_gives_a_checkpoint_as_good_as_the_cpus(tmp_path):
    from gptq_twin import calibration_text, dense_twin, run_quantizer
    from tiny_model import build_tiny_llama
    from transformers import AutoModelForCausalLM

    model = build_tiny_llama(tmp_path / "m", hidden_size=128, intermediate_size=256, num_hidden_layers=3)
    text = calibration_text(tmp_path / "calib.txt")
    ids = torch.randint(3, 384, (1, 48), generator=torch.Generator().manual_seed(3))

    def nll(path: Path) -> float:
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            return float(lm(ids, labels=ids).loss)

    errors = {}
    for device in ("cpu", "cuda"):
        out = run_quantizer(model, tmp_path / f"q-{device}", text, "--groupsize", "32", "--device", device)
        errors[device] = nll(dense_twin(out, tmp_path / f"twin-{device}"))
    # Float order differs between the devices; the quantization quality does not.
    assert abs(errors["cuda"] - errors["cpu"]) < 0.02 * errors["cpu"], errors
