"""A GPU shard's work stays on its GPU (skips without CUDA): the reference GPTQ kernel dequantizes
on the device, and the model worker thread's current device is the shard's."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_the_reference_gptq_kernel_dequantizes_on_the_gpu_and_equals_the_cpu():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dataclasses import replace

    from gptq_random import random_gptq
    from text_generation_server.layers.quant.gptq_kernels.reference import ReferenceKernel

    weights, _ = random_gptq(256, 128, group_size=64)
    cpu = ReferenceKernel(weights).dequantize()
    gpu = torch.device("cuda", 0)
    moved = replace(weights, qweight=weights.qweight.to(gpu), qzeros=weights.qzeros.to(gpu),
                    scales=weights.scales.to(gpu), g_idx=weights.g_idx.to(gpu))  # fmt: skip
    on_gpu = ReferenceKernel(moved).dequantize()
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), cpu, rtol=0, atol=0)


def test_the_model_worker_runs_on_the_last_gpu():
    from text_generation_server.server import ModelWorker

    last = torch.device("cuda", torch.cuda.device_count() - 1)
    worker = ModelWorker(last)
    assert worker.call(torch.cuda.current_device) == last.index
    assert worker.call(lambda: torch.ones(1, device="cuda").device) == last


def test_warmup_sizes_the_gpu_cache_after_the_prefill_peak_within_the_memory_fraction(tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from profile_decode import batch_pb
    from text_generation_server.distributed import init_distributed
    from text_generation_server.engine import Generator
    from text_generation_server.models import load_model
    from text_generation_server.pb.generate.v1 import generate_pb2 as pb
    from tiny_model import build_tiny_llama

    monkeypatch.setenv("CUDA_MEMORY_FRACTION", "0.5")
    device = torch.device("cuda", 0)
    model = load_model(build_tiny_llama(tmp_path / "m"), dtype=torch.float16, device=device,
                       dist=init_distributed(0, 1))  # fmt: skip
    gen = Generator(model, init_distributed(0, 1))
    reply = gen.warmup(pb.WarmupRequest(batch=batch_pb(4, 64, 2, 384, 1), max_total_tokens=256))
    assert reply.num_blocks > 0
    total = torch.cuda.mem_get_info(device)[1]
    assert torch.cuda.memory_reserved(device) <= 0.5 * total
