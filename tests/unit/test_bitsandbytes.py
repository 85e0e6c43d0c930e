"""--quantize bitsandbytes / bitsandbytes-nf4 / bitsandbytes-fp4 against dense references.

Each method promises a bound on how far its weights may move:
- LLM.int8: each weight within half an int8 step of its row, ``rowmax / 254``
  (plus float16 rounding of the weight), and activation features with
  ``|x| >= 6`` multiplied in float, so outliers do not cost accuracy;
- NF4 / FP4: each weight is the nearest of 16 code points times its block's
  absmax (64 values per block), so within half the widest code gap of it.
The checks read a layer's effective weight back by multiplying the identity,
compare it with an independent torch re-implementation of the rounding, and
compare whole outputs with the dense layer.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from loguru import logger
from paged_runner import PagedRunner
from safetensors.torch import load_file, save_file
from text_generation_server.distributed import Distributed, init_distributed
from text_generation_server.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    RowParallelLinear,
)
from text_generation_server.layers.quant import bnb_runtime
from text_generation_server.layers.quant.bnb_int8 import BitsAndBytesInt8Method
from text_generation_server.layers.quant.registry import get_quant_method, supported_quantizations
from text_generation_server.models import load_model
from text_generation_server.weights import Weights

CPU = torch.device("cpu")
MODES = ["bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4"]

NF4_CODE = torch.tensor(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
     -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
     0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
     0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
)  # fmt: skip
_FP4_POS = torch.tensor([0.0, 0.0052083333, 0.16666667, 0.25, 0.33333333, 0.5, 0.66666667, 1.0])
FP4_CODE = torch.cat([-_FP4_POS.flip(0), _FP4_POS])
CODES = {"bitsandbytes-nf4": NF4_CODE, "bitsandbytes-fp4": FP4_CODE}


class OneRank(Distributed):
    """Rank ``rank`` of ``world_size`` whose collectives return their input (the test combines)."""

    def __init__(self, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(rank, world_size, CPU, "none")

    def all_reduce(self, t):
        return t

    def all_gather(self, t, dim=-1, sizes=None):
        return t


def weights_file(tmp_path: Path, tensors: dict[str, torch.Tensor], dist: Distributed) -> Weights:
    path = tmp_path / "w.safetensors"
    if not path.exists():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return Weights([path], device=CPU, dtype=torch.float32, dist=dist)


def load_layer(layer, weights: Weights, parts: dict[str, object]) -> None:
    """Fill ``layer`` from ``{name}.weight`` / ``{name}.bias`` per checkpoint part, then finish it."""
    for pname, param in list(layer.named_parameters(recurse=False)):
        for ckpt, shard_id in parts.items():
            param.weight_loader(param, weights, f"{ckpt}.{pname}", shard_id)
    layer.quant_method.process_weights_after_loading(layer)


def effective_weight(layer, dtype=torch.float32) -> torch.Tensor:
    """The ``[out, in]`` weight the layer multiplies by (identity input, bias left out)."""
    eye = torch.eye(layer.in_features, dtype=dtype)
    with torch.inference_mode():
        return layer.quant_method.apply(layer, eye, None).float().t()


def reference_4bit(w: torch.Tensor, code: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """Nearest code point times the block absmax, blocks over the row-major flattening."""
    flat = w.reshape(-1, blocksize)
    absmax = flat.abs().amax(dim=1, keepdim=True)
    idx = ((flat / absmax).unsqueeze(-1) - code).abs().argmin(dim=-1)
    return (code[idx] * absmax).reshape(w.shape)


def reference_int8(w: torch.Tensor) -> torch.Tensor:
    w16 = w.to(torch.float16).float()
    rowmax = w16.abs().amax(dim=1, keepdim=True)
    return torch.round(w16 * 127 / rowmax) * rowmax / 127


def column_layer(mode: str, w: torch.Tensor, tmp_path: Path, dtype=torch.float32, dist=None):
    dist = dist or OneRank()
    quant = get_quant_method(mode, None)
    quant.check_supported(dtype, CPU)
    layer = ColumnParallelLinear(
        w.shape[1], w.shape[0], bias=False, quant_method=quant("lin"), dist=dist,
        dtype=dtype, device=CPU,
    )  # fmt: skip
    load_layer(layer, weights_file(tmp_path, {"lin.weight": w}, dist), {"lin": None})
    return layer


def gaussian(out: int, inp: int, seed: int = 0, scale: float = 0.05) -> torch.Tensor:
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) * scale


# ---------------------------------------------------------------- registry and refusals


def test_three_bitsandbytes_names_are_registered():
    assert set(MODES) <= set(supported_quantizations())
    for mode in MODES:
        assert get_quant_method(mode, None).name == mode


@pytest.mark.parametrize("mode", MODES)
def test_gptq_checkpoint_is_refused_with_the_reason(mode):
    with pytest.raises(ValueError) as err:
        get_quant_method(mode, {"quant_method": "gptq", "bits": 4, "group_size": 128})
    msg = str(err.value)
    assert f"--quantize {mode}" in msg and "already quantized" in msg and "'gptq'" in msg
    assert "without --quantize" in msg


@pytest.mark.parametrize("mode", MODES)
def test_gptq_checkpoint_is_refused_before_any_weight_is_read(mode, tmp_path, tiny_llama):
    ckpt = tmp_path / "gptq"
    ckpt.mkdir()
    shutil.copy(tiny_llama / "config.json", ckpt / "config.json")
    # AutoGPTQ's own file; no weights at all, so reading any would fail differently.
    (ckpt / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 64}))
    with pytest.raises(ValueError, match="already quantized"):
        load_model(
            ckpt, dtype=torch.float32, device=CPU, dist=init_distributed(0, 1), quantize=mode
        )


@pytest.mark.parametrize("mode", MODES)
def test_non_float_dtype_is_refused_naming_the_allowed_dtypes(mode):
    with pytest.raises(ValueError, match="float32, bfloat16, float16"):
        get_quant_method(mode, None).check_supported(torch.float64, CPU)


def test_unsupported_device_type_is_refused():
    with pytest.raises(ValueError, match="cpu or cuda"):
        get_quant_method("bitsandbytes-nf4", None).check_supported(
            torch.float32, torch.device("meta")
        )


def fake_gpu(monkeypatch, capability: tuple[int, int], cuda_library: bool = True) -> None:
    monkeypatch.setattr(
        bnb_runtime, "_native_library", lambda: ("libbitsandbytes_cuda.so", cuda_library)
    )
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


def test_bfloat16_on_a_gpu_without_bf16_is_refused(monkeypatch):
    fake_gpu(monkeypatch, (7, 5))
    with pytest.raises(ValueError, match="compute capability 8.0.*--dtype float16"):
        get_quant_method("bitsandbytes-nf4", None).check_supported(
            torch.bfloat16, torch.device("cuda")
        )


def test_int8_on_a_gpu_without_int8_tensor_cores_is_refused_4bit_allowed(monkeypatch):
    fake_gpu(monkeypatch, (7, 0))
    with pytest.raises(ValueError, match="7.5.*bitsandbytes-nf4"):
        get_quant_method("bitsandbytes", None).check_supported(torch.float16, torch.device("cuda"))
    get_quant_method("bitsandbytes-nf4", None).check_supported(torch.float16, torch.device("cuda"))


def test_cpu_only_bitsandbytes_build_is_refused_on_cuda(monkeypatch):
    fake_gpu(monkeypatch, (8, 0), cuda_library=False)
    with pytest.raises(ValueError, match="not its CUDA library"):
        get_quant_method("bitsandbytes-fp4", None).check_supported(
            torch.float16, torch.device("cuda")
        )


def test_missing_bitsandbytes_names_the_package(monkeypatch):
    bnb_runtime.bnb.cache_clear()
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    try:
        with pytest.raises(ValueError, match="pip install bitsandbytes"):
            get_quant_method("bitsandbytes", None).check_supported(torch.float32, CPU)
    finally:
        monkeypatch.undo()
        bnb_runtime.bnb.cache_clear()


def test_refusal_happens_before_loading(tiny_llama, monkeypatch):
    touched = []
    monkeypatch.setattr(Weights, "__init__", lambda self, *a, **k: touched.append(1))
    with pytest.raises(ValueError, match="float32, bfloat16, float16"):
        load_model(tiny_llama, dtype=torch.float64, device=CPU, dist=init_distributed(0, 1),
                   quantize="bitsandbytes")  # fmt: skip
    assert touched == []


def test_backend_is_logged_once_per_process():
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="INFO")
    bnb_runtime._logged.discard("cpu")
    try:
        for mode in MODES:
            get_quant_method(mode, None).check_supported(torch.float32, CPU)
    finally:
        logger.remove(sink)
    backend_lines = [line for line in lines if "bitsandbytes" in line and "backend CPU" in line]
    assert len(backend_lines) == 1
    assert "int8 matmul" in backend_lines[0] and "4-bit matmul" in backend_lines[0]


# ---------------------------------------------------------------- int8 (LLM.int8)


def test_int8_weights_are_row_wise_int8_within_half_a_step(tmp_path):
    w = gaussian(48, 128)
    layer = column_layer("bitsandbytes", w, tmp_path)
    assert layer.weight.dtype == torch.int8 and layer.weight.shape == (48, 128)
    eff = effective_weight(layer)
    ref = reference_int8(w)
    step = w.abs().amax(dim=1, keepdim=True) / 127
    # Equal except where a weight sits on a rounding boundary (one step either way).
    assert ((eff - ref).abs() <= step * 1e-2).float().mean() > 0.99
    assert ((eff - w).abs() <= step / 2 + w.abs() * 2**-10 + 1e-7).all()


def test_int8_output_matches_dense_and_outlier_features_stay_in_float(tmp_path):
    w = gaussian(64, 128)
    x = torch.randn(9, 128, generator=torch.Generator().manual_seed(1))
    x[:, 5] *= 40  # an outlier feature, as LLM.int8 sees in large models
    layer = column_layer("bitsandbytes", w, tmp_path)
    dense = F.linear(x, w)
    with torch.inference_mode():
        out = layer.quant_method.apply(layer, x)
        no_outliers = BitsAndBytesInt8Method(threshold=0.0).apply(layer, x)
    rel = ((out - dense).norm() / dense.norm()).item()
    rel_plain = ((no_outliers - dense).norm() / dense.norm()).item()
    assert rel < 0.01, rel
    # Without the float path the outlier's row scale crushes every other feature.
    assert rel_plain > 3 * rel, (rel, rel_plain)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int8_output_in_half_dtypes_stays_close_to_dense(tmp_path, dtype):
    w = gaussian(64, 128)
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(2))
    layer = column_layer("bitsandbytes", w, tmp_path, dtype=dtype)
    with torch.inference_mode():
        out = layer(x.to(dtype))
    assert out.dtype == dtype
    dense = F.linear(x, w)
    assert ((out.float() - dense).norm() / dense.norm()).item() < 0.02


# ---------------------------------------------------------------- 4-bit NF4 / FP4


@pytest.mark.parametrize("mode", ["bitsandbytes-nf4", "bitsandbytes-fp4"])
def test_4bit_weights_are_the_nearest_code_point_times_block_absmax(tmp_path, mode):
    w = gaussian(48, 128)
    layer = column_layer(mode, w, tmp_path)
    assert layer.weight.dtype == torch.uint8 and layer.weight.numel() == 48 * 128 // 2
    eff = effective_weight(layer)
    ref = reference_4bit(w, CODES[mode])
    # Equal except where a weight sits on a rounding boundary.
    assert (eff - ref).abs().le(1e-6).float().mean() > 0.999
    code = CODES[mode]
    half_gap = (code[1:] - code[:-1]).max() / 2
    block_absmax = w.reshape(-1, 64).abs().amax(dim=1, keepdim=True)
    bound = (block_absmax * half_gap).expand(-1, 64).reshape(w.shape)
    assert ((eff - w).abs() <= bound + 1e-6).all()


def test_nf4_is_closer_than_fp4_on_normal_weights(tmp_path):
    w = gaussian(64, 256)
    errors = {}
    for mode in ("bitsandbytes-nf4", "bitsandbytes-fp4"):
        sub = tmp_path / mode
        sub.mkdir()
        errors[mode] = (effective_weight(column_layer(mode, w, sub)) - w).norm() / w.norm()
    assert errors["bitsandbytes-nf4"] < errors["bitsandbytes-fp4"] < 0.2


@pytest.mark.parametrize("mode", ["bitsandbytes-nf4", "bitsandbytes-fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_4bit_output_equals_dense_layer_of_the_dequantized_weight(tmp_path, mode, dtype):
    w = gaussian(64, 128)
    bias = torch.randn(64, generator=torch.Generator().manual_seed(4))
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(3))
    layer = ColumnParallelLinear(
        128, 64, bias=True, quant_method=get_quant_method(mode, None)("lin"), dist=OneRank(),
        dtype=dtype, device=CPU,
    )  # fmt: skip
    load_layer(layer, weights_file(tmp_path, {"lin.weight": w, "lin.bias": bias}, OneRank()),
               {"lin": None})  # fmt: skip
    with torch.inference_mode():
        out = layer(x.to(dtype))
    assert out.dtype == dtype
    expected = F.linear(x, reference_4bit(w.to(dtype).float(), CODES[mode]), bias)
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}[dtype]
    assert ((out.float() - expected).norm() / expected.norm()).item() < tol


# ---------------------------------------------------------------- fused and split layers


@pytest.mark.parametrize("mode", MODES)
def test_fused_gate_up_equals_each_part_quantized_alone(tmp_path, mode):
    gate, up = gaussian(96, 128, seed=5), gaussian(96, 128, seed=6)
    dist = OneRank()
    w = weights_file(tmp_path, {"gate.weight": gate, "up.weight": up}, dist)
    fused = MergedColumnParallelLinear(
        128, [96, 96], bias=False, quant_method=get_quant_method(mode, None)("gate_up"),
        dist=dist, dtype=torch.float32, device=CPU,
    )  # fmt: skip
    load_layer(fused, w, {"gate": 0, "up": 1})
    alone = [
        effective_weight(column_layer(mode, part, tmp_path / name))
        for name, part in (("g", gate), ("u", up))
        if (tmp_path / name).mkdir() is None
    ]
    torch.testing.assert_close(effective_weight(fused), torch.cat(alone), rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_two_rank_row_split_sums_to_the_quantized_slices(tmp_path, mode):
    w = gaussian(32, 256, seed=7)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(8))
    total = torch.zeros(3, 32)
    for rank in range(2):
        dist = OneRank(rank, 2)
        layer = RowParallelLinear(
            256, 32, bias=False, quant_method=get_quant_method(mode, None)("o"), dist=dist,
            dtype=torch.float32, device=CPU,
        )  # fmt: skip
        load_layer(layer, weights_file(tmp_path, {"o.weight": w}, dist), {"o": None})
        assert layer.in_features == 128
        with torch.inference_mode():
            total += layer(x[:, rank * 128 : (rank + 1) * 128])
    dense = F.linear(x, w)
    bound = 0.01 if mode == "bitsandbytes" else 0.2
    assert ((total - dense).norm() / dense.norm()).item() < bound


# ---------------------------------------------------------------- whole model


@pytest.mark.parametrize("mode", ["bitsandbytes-nf4", "bitsandbytes-fp4"])
def test_4bit_model_equals_dense_model_of_dequantized_checkpoint(tmp_path, tiny_llama, mode):
    """An independent path: round the checkpoint in torch, serve it dense, compare logits."""
    rounded = tmp_path / "rounded"
    shutil.copytree(tiny_llama, rounded)
    tensors = load_file(str(tiny_llama / "model.safetensors"))
    for name, t in tensors.items():
        if name.startswith("model.layers.") and name.endswith("proj.weight"):
            tensors[name] = reference_4bit(t, CODES[mode])
    save_file(tensors, str(rounded / "model.safetensors"))
    ids = list(range(3, 40))
    dist = init_distributed(0, 1)
    quantized = load_model(tiny_llama, dtype=torch.float32, device=CPU, dist=dist, quantize=mode)
    reference = load_model(rounded, dtype=torch.float32, device=CPU, dist=dist)
    got = PagedRunner(quantized).step([("a", ids)])[0]
    want = PagedRunner(reference).step([("a", ids)])[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert quantized.kernel.startswith(f"bnb-{mode.removeprefix('bitsandbytes-')}-b64-cpu")


@pytest.mark.parametrize("mode", MODES)
def test_loaded_model_keeps_no_float_copy_of_quantized_layers(tiny_llama, mode, monkeypatch):
    from text_generation_server.layers.quant import bnb_load

    staged: set[int] = set()
    peak = []
    original_load = bnb_load.QuantizeOnLoadMethod._load_part

    def load_part(self, *args):
        staged.add(id(self))
        peak.append(len(staged))
        original_load(self, *args)
        if self.quantized:
            staged.discard(id(self))

    monkeypatch.setattr(bnb_load.QuantizeOnLoadMethod, "_load_part", load_part)
    model = load_model(tiny_llama, dtype=torch.float32, device=CPU, dist=init_distributed(0, 1),
                       quantize=mode)  # fmt: skip
    layers = [m for m in model.modules() if hasattr(m, "quant_method")]
    assert len(layers) == 8  # 2 decoder layers x (qkv, o, gate_up, down)
    for layer in layers:
        assert layer.quant_method.quantized
        for name, p in layer.named_parameters(recurse=False):
            assert p.device.type == "cpu", name
            if name == "weight":
                assert p.dtype in (torch.int8, torch.uint8)
    # Float slices live only while their layer's parts arrive: never the whole model.
    assert max(peak) <= 2 < len(layers)
    assert not staged


@pytest.mark.parametrize("mode", ["bitsandbytes-nf4", "bitsandbytes-fp4"])
def test_bfloat16_uses_the_bitsandbytes_cpu_kernel_where_the_cpu_has_it(tmp_path, mode):
    if not bnb_runtime.cpu_4bit_kernel_available():
        pytest.skip("CPU without AVX-512 BF16: bitsandbytes has no CPU 4-bit kernel here")
    w = gaussian(64, 128)
    x = torch.randn(6, 128, generator=torch.Generator().manual_seed(9))
    layer = column_layer(mode, w, tmp_path, dtype=torch.bfloat16)
    assert layer.quant_method.cpu_kernel
    assert "avx512-bf16-gemm" in layer.quant_method.kernel_name(layer)
    with torch.inference_mode():
        out = layer(x.to(torch.bfloat16)).float()
    expected = F.linear(x, reference_4bit(w.to(torch.bfloat16).float(), CODES[mode]))
    assert ((out - expected).norm() / expected.norm()).item() < 3e-2
    # 40 output rows do not fill the kernel's 32-row tiles: the generic path serves them.
    (tmp_path / "odd").mkdir()
    odd = column_layer(mode, gaussian(40, 128), tmp_path / "odd", dtype=torch.bfloat16)
    assert not odd.quant_method.cpu_kernel
    assert "dequantize+torch-matmul" in odd.quant_method.kernel_name(odd)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", ["qwen3", "granite", "phi3", "gemma2", "gemma3", "mistral-window", "falcon-7b",
                                  "falcon-40b", "mixtral"])
def test_family_member_equals_transformers_over_the_same_rounded_weights(tmp_path, arch, mode):
    """Each architecture quantized on load: its logits through prefill and decode equal
    transformers' on a checkpoint whose linears hold the same rounded weights. 4-bit: bitsandbytes'
    own quantize/dequantize round trip, equal up to float order. int8 also rounds each activation
    row to int8 as LLM.int8 does, which the reference does not: within 6% of the logits' norm, where
    a misplaced norm, cap or multiplier is off by tens of percent. Phi-3's fused projections are
    quantized as their parts, which round alike (blocks of 64 and int8's rows do not straddle the
    parts), as are Falcon's interleaved q/k/v heads."""
    from tiny_model import family_checkpoint
    from transformers import AutoModelForCausalLM

    def round_trip(w: torch.Tensor) -> torch.Tensor:
        if mode == "bitsandbytes":
            return reference_int8(w)
        packed, state = bnb_runtime.bnb().functional.quantize_4bit(
            w.contiguous(), blocksize=64, compress_statistics=False,
            quant_type=mode.removeprefix("bitsandbytes-"), quant_storage=torch.uint8)  # fmt: skip
        return bnb_runtime.bnb().functional.dequantize_4bit(packed, state)

    path = family_checkpoint(tmp_path / arch, arch)
    rounded = tmp_path / "rounded"
    shutil.copytree(path, rounded)
    tensors = load_file(str(path / "model.safetensors"))
    for name, t in tensors.items():
        quantized = name.startswith(("model.layers.", "transformer.h.")) and ".block_sparse_moe.gate." not in name
        if quantized and name.endswith(".weight") and t.dim() == 2:  # linears, every expert's; not the router
            tensors[name] = round_trip(t)
    save_file(tensors, str(rounded / "model.safetensors"), metadata={"format": "pt"})
    ids = torch.randint(0, 384, (24,), generator=torch.Generator().manual_seed(5)).tolist()
    reference = AutoModelForCausalLM.from_pretrained(rounded, dtype=torch.float32).eval()
    with torch.no_grad():
        want = reference(torch.tensor([ids])).logits[0]
    model = load_model(path, dtype=torch.float32, device=CPU, dist=init_distributed(0, 1), quantize=mode)
    runner = PagedRunner(model, block_size=4)
    got = torch.cat([runner.step([("a", ids[:16])])[0]] + [runner.step([("a", [t])])[0] for t in ids[16:]])
    rel = float((got - want).norm() / want.norm())
    if mode == "bitsandbytes":
        assert rel < 6e-2, rel
    else:
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert model.kernel.startswith("bnb-"), model.kernel
