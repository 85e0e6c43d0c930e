"""bitsandbytes modes on CUDA: bitsandbytes' own kernels against the dense layer (skips without a GPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from text_generation_server.distributed import Distributed
from text_generation_server.layers.linear import ColumnParallelLinear
from text_generation_server.layers.quant.registry import get_quant_method
from text_generation_server.weights import Weights

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CUDA = torch.device("cuda")
# Relative output error each method promises against the dense fp16 layer.
BOUNDS = {"bitsandbytes": 0.02, "bitsandbytes-nf4": 0.15, "bitsandbytes-fp4": 0.2}


class OneRank(Distributed):
    def __init__(self) -> None:
        super().__init__(0, 1, CUDA, "none")


def layer_for(mode: str, w: torch.Tensor, tmp_path, dtype: torch.dtype):
    path = tmp_path / "w.safetensors"
    save_file({"lin.weight": w.contiguous()}, str(path))
    dist = OneRank()
    quant = get_quant_method(mode, None)
    quant.check_supported(dtype, CUDA)
    layer = ColumnParallelLinear(
        w.shape[1], w.shape[0], bias=False, quant_method=quant("lin"), dist=dist,
        dtype=dtype, device=CUDA,
    )  # fmt: skip
    weights = Weights([path], device=CUDA, dtype=dtype, dist=dist)
    for param in list(layer.parameters(recurse=False)):
        param.weight_loader(param, weights, "lin.weight", None)
    layer.quant_method.process_weights_after_loading(layer)
    return layer


@pytest.mark.parametrize("mode", sorted(BOUNDS))
def test_cuda_layer_output_stays_within_the_method_bound(tmp_path, mode):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 512, generator=g) * 0.05
    x = torch.randn(7, 512, generator=g)
    layer = layer_for(mode, w, tmp_path, torch.float16)
    assert layer.weight.device.type == "cuda"
    assert "-cuda[" in layer.quant_method.kernel_name(layer)
    with torch.inference_mode():
        out = layer(x.to(CUDA, torch.float16)).float().cpu()
    dense = F.linear(x, w)
    assert ((out - dense).norm() / dense.norm()).item() < BOUNDS[mode]
