"""``--quantize gptq``: checkpoints from AutoGPTQ, GPTQModel, Optimum and our quantizer.

Each quantized linear holds the checkpoint's tensors for its rank
(``qweight``, ``qzeros``, ``scales``, ``g_idx``; layout in
``quantize/packing.py``). Column-parallel layers split all of them along the
output features. Row-parallel layers split ``qweight`` and ``g_idx`` along
the input features; ``scales``/``qzeros`` are split too when the rank's
input slice starts and ends on group boundaries and act-order is off, and
otherwise kept whole, with ``g_idx`` naming the rows this rank uses. After
loading, each layer builds its kernel once (see ``gptq_kernels``); the
choice, any fallback and the weight memory per rank are logged.

Served widths are 2, 3, 4 and 8 bits. 3-bit codes run across word
boundaries (32 codes fill 3 words), so a rank's slice of features must start
and end on multiples of 32; for 2, 4 and 8 bits, of ``32 / bits``.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch
from loguru import logger

from text_generation_server.kernels.config import DENSE_FROM_ROWS, KernelConfig
from text_generation_server.layers.loading import set_weight_attrs
from text_generation_server.layers.quant.base import (
    LinearSpec,
    NativeLinear,
    QuantConfig,
    QuantMethod,
    linear_param,
)
from text_generation_server.layers.quant.gptq_kernels import (
    ConcatKernel,
    GPTQKernel,
    GPTQWeights,
    build_kernel,
)
from text_generation_server.weights import CheckpointError, Weights

SERVED_BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
_PARAMS = ("qweight", "qzeros", "scales", "g_idx")


def _bool(config: dict[str, Any], key: str, default: bool) -> bool:
    value = config.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"GPTQ quantization config: '{key}' must be true or false, got {value!r}")
    return value


def _int(config: dict[str, Any], key: str) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"GPTQ quantization config: '{key}' must be an integer, got {value!r}")
    return value


@dataclass
class _LoadReport:
    """What the model's GPTQ layers chose, logged once the last layer is ready."""

    created: int = 0
    processed: int = 0
    kernels: Counter = field(default_factory=Counter)
    fallbacks: dict[str, str] = field(default_factory=dict)  # reason -> first layer
    kernel_bytes: int = 0
    fp16_bytes: int = 0


class GPTQConfig(QuantConfig):
    """A GPTQ checkpoint's settings (``quantize_config.json`` / ``quantization_config``)."""

    name = "gptq"
    checkpoint_methods = ("gptq",)
    dtype_flag_allowed = False

    def __init__(
        self,
        *,
        bits: int,
        group_size: int,
        desc_act: bool = False,
        sym: bool = True,
        checkpoint_format: str = "gptq",
        static_groups: bool = False,
        kernels: KernelConfig | None = None,
    ) -> None:
        """``kernels``: the shard's kernel switches (``GPTQ_KERNEL`` names the kernel tried
        first for every layer; ``GPTQ_PREFILL_DTYPE``); default: chosen by device."""
        if bits not in SERVED_BITS:
            raise ValueError(
                f"GPTQ checkpoint has bits={bits}, which this server cannot serve; "
                f"supported: {', '.join(map(str, SERVED_BITS))}"
            )
        if group_size == 0:
            group_size = -1
        if group_size < -1:
            raise ValueError(
                f"GPTQ checkpoint has group_size={group_size}; expected a positive size or -1 "
                "(one group per output row)"
            )
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(
                f"GPTQ checkpoint has checkpoint_format '{checkpoint_format}', which this server "
                f"cannot load; supported: {', '.join(CHECKPOINT_FORMATS)}"
            )
        self.bits = bits
        self.group_size = group_size
        self.desc_act = desc_act
        self.sym = sym
        self.checkpoint_format = checkpoint_format
        self.static_groups = static_groups
        self.kernels = kernels or KernelConfig()
        self.kernel = self.kernels.gptq_kernel
        self.report = _LoadReport()

    @classmethod
    def from_checkpoint(
        cls, checkpoint_quant_config: dict[str, Any] | None, kernels: KernelConfig | None = None
    ) -> GPTQConfig:
        if not checkpoint_quant_config:
            raise ValueError(
                "--quantize gptq needs a GPTQ checkpoint, but this one has no quantization "
                "config (neither config.json's 'quantization_config' nor quantize_config.json)"
            )
        c = checkpoint_quant_config
        method = c.get("quant_method", "gptq")
        if method not in cls.checkpoint_methods:
            raise ValueError(
                f"--quantize gptq does not match the checkpoint, which is quantized with "
                f"quant_method '{method}'"
            )
        if "bits" not in c or "group_size" not in c:
            raise ValueError(
                "GPTQ quantization config lacks 'bits' or 'group_size'; found keys: "
                f"{', '.join(sorted(c))}"
            )
        if c.get("lm_head"):
            raise ValueError(
                "GPTQ checkpoint quantizes lm_head (lm_head: true), which this server cannot "
                "serve; quantize without the LM head"
            )
        pack_dtype = c.get("pack_dtype")
        if pack_dtype not in (None, "int32", "torch.int32"):
            raise ValueError(
                f"GPTQ checkpoint packs into {pack_dtype}; this server loads int32 packing only"
            )
        if c.get("dynamic"):
            raise ValueError(
                "GPTQ checkpoint uses per-module 'dynamic' overrides, which this server cannot "
                "serve; quantize every module with one setting"
            )
        fmt = c.get("checkpoint_format") or c.get("format") or "gptq"
        config = cls(
            bits=_int(c, "bits"),
            group_size=_int(c, "group_size"),
            desc_act=_bool(c, "desc_act", False),
            sym=_bool(c, "sym", True),
            checkpoint_format=fmt,
            static_groups=_bool(c, "static_groups", False),
            kernels=kernels,
        )
        logger.info(f"GPTQ checkpoint: {config.describe()}")
        return config

    def describe(self) -> str:
        group = "per-row" if self.group_size == -1 else f"g{self.group_size}"
        parts = [f"{self.bits}-bit", group, "sym" if self.sym else "asym"]
        if self.desc_act:
            parts.append("act-order" + (" (static groups)" if self.static_groups else ""))
        parts.append(f"format {self.checkpoint_format}")
        if self.kernel:
            parts.append(f"kernel {self.kernel} requested by GPTQ_KERNEL")
        return ", ".join(parts)

    @property
    def features_per_word(self) -> int | Fraction:
        """Features packed in one int32 word of ``qweight`` (along the input) and of
        ``qzeros`` (along the output): ``32 / bits``, a fraction for 3 bits. The
        tensor-parallel split arithmetic divides by it exactly."""
        return 32 // self.bits if 32 % self.bits == 0 else Fraction(32, self.bits)

    @property
    def word_unit(self) -> tuple[int, int]:
        """The fewest features that fill whole int32 words, and those words:
        ``(32 / bits, 1)`` for 2, 4 and 8 bits, ``(32, 3)`` for 3 bits."""
        per = Fraction(32, self.bits)
        return per.numerator, per.denominator

    def lm_head_kernel(self) -> str:
        # The other layers already multiply in 16 bits on the CPU, and the checkpoint's head is
        # fp16; the reference kernel stays exact end to end.
        return "dense" if self.kernel == "gptq-reference" else "half"

    def input_alignment(self) -> int:
        features, _ = self.word_unit
        if self.group_size > 0:
            return math.lcm(self.group_size, features)
        return features

    def get_method(self, prefix: str) -> QuantMethod:
        return GPTQLinearMethod(self, prefix)

    def layer_done(self, prefix: str, kernel: GPTQKernel, reasons: list[str], fp16: int) -> None:
        r = self.report
        r.processed += 1
        r.kernels[kernel.name] += 1
        r.kernel_bytes += kernel.nbytes()
        r.fp16_bytes += fp16
        for reason in reasons:
            if reason not in r.fallbacks:
                r.fallbacks[reason] = prefix
                logger.info(f"GPTQ {prefix}: {reason}; using {kernel.name}")
        if r.processed == r.created:
            if "cpu-int4-avx2" in r.kernels:
                dtype, why = self.kernels.prefill_dtype()
                logger.info(
                    f"cpu-int4-avx2: calls of {DENSE_FROM_ROWS}+ rows (prefill) unpack the 4-bit weights and "
                    f"multiply in {str(dtype).removeprefix('torch.')} ({why}); fewer rows use the integer kernel"
                )
            kernels = ", ".join(f"{n} ({c} layers)" for n, c in r.kernels.items())
            logger.info(
                f"GPTQ linear weights on this rank: {r.kernel_bytes / 2**20:.1f} MiB vs "
                f"{r.fp16_bytes / 2**20:.1f} MiB in fp16 "
                f"({100 * r.kernel_bytes / max(r.fp16_bytes, 1):.1f}%); kernels: {kernels}"
            )


class GPTQLinearMethod(QuantMethod):
    """One linear layer's GPTQ tensors and kernel."""

    def __init__(self, config: GPTQConfig, prefix: str) -> None:
        self.config = config
        self.prefix = prefix
        self.group_offset = 0
        self.kernel: GPTQKernel | None = None
        self.device = torch.device("cpu")
        self.part_g_idx: dict[Hashable, torch.Tensor] = {}
        self.plain_g_idx: torch.Tensor | None = None

    def _group_split(self, spec: LinearSpec) -> tuple[int, int] | None:
        """This rank's ``[first, stop)`` rows of scales/qzeros, or None to keep them whole."""
        c = self.config
        if not spec.input_is_sharded or c.desc_act or c.group_size <= 0:
            return None
        g = c.group_size
        start, stop = spec.input_start, spec.input_start + spec.in_features
        if start % g or (stop % g and stop != spec.full_in_features):
            return None
        return start // g, -(-stop // g)

    def _check_word_alignment(self, layer: torch.nn.Module, spec: LinearSpec) -> None:
        """Refuse a split whose slices cut through packed int32 words."""
        c = self.config
        unit, words = c.word_unit
        each = f"{unit} features per word" if words == 1 else f"{unit} features per {words} words"
        if spec.in_features % unit or spec.input_start % unit:
            raise ValueError(
                f"{self.prefix}: input features [{spec.input_start}, "
                f"{spec.input_start + spec.in_features}) of {spec.full_in_features} on this rank do "
                f"not start and end on whole {c.bits}-bit words of qweight ({each}); "
                f"{c.bits}-bit layers split their inputs only at multiples of {unit}"
            )
        parts = getattr(layer, "parts", None) or []
        offset = 0
        for part in parts:
            if part.start % unit or part.size % unit or offset % unit:
                name = "" if part.shard_id is None else f" (part {part.shard_id})"
                raise ValueError(
                    f"{self.prefix}{name}: output features [{part.start}, {part.stop}) of "
                    f"{part.full_size} on this rank do not start and end on whole {c.bits}-bit words "
                    f"of qzeros ({each}); {c.bits}-bit layers split their outputs only at "
                    f"multiples of {unit}"
                )
            offset += part.size
        if not parts and spec.out_features % unit:
            raise ValueError(
                f"{self.prefix}: {spec.out_features} output features on this rank do not fill "
                f"whole {c.bits}-bit words of qzeros ({each})"
            )

    def create_weights(self, layer: torch.nn.Module, spec: LinearSpec) -> None:
        c = self.config
        self._check_word_alignment(layer, spec)
        per = c.features_per_word
        n, k = spec.out_features, spec.in_features
        group = c.group_size if c.group_size > 0 else spec.full_in_features
        groups = -(-spec.full_in_features // group)
        split = self._group_split(spec)
        if split is not None:
            self.group_offset = split[0]
            groups = split[1] - split[0]
            # Splitting the groups assumes the plain layout; checked once g_idx is loaded.
            self.plain_g_idx = torch.arange(spec.input_start, spec.input_start + k) // group
        group_dim = 0 if split is not None else None
        dev = spec.device
        self.device = dev
        self.fp16_bytes = n * k * 2
        layer.register_parameter(
            "qweight",
            linear_param(
                torch.empty(k // per, n, dtype=torch.int32, device=dev),
                output_dim=1,
                input_dim=0,
                input_pack=per,
            ),
        )
        layer.register_parameter(
            "qzeros",
            linear_param(
                torch.empty(groups, n // per, dtype=torch.int32, device=dev),
                output_dim=1,
                output_pack=per,
                input_dim=group_dim,
                input_pack=group,
            ),
        )
        layer.register_parameter(
            "scales",
            linear_param(
                torch.empty(groups, n, dtype=torch.float16, device=dev),
                output_dim=1,
                input_dim=group_dim,
                input_pack=group,
            ),
        )
        g_idx = linear_param(
            torch.empty(k, dtype=torch.int32, device=dev), output_dim=None, input_dim=0
        )
        set_weight_attrs(g_idx, weight_loader=functools.partial(self._load_g_idx, layer))
        if not c.desc_act:
            # Older AutoGPTQ checkpoints without act-order omit g_idx: the plain
            # layout it would hold (global group of each of this rank's columns).
            plain = torch.arange(spec.input_start, spec.input_start + k) // group
            set_weight_attrs(g_idx, fill_missing=lambda plain=plain: plain.to(torch.int32))
        layer.register_parameter("g_idx", g_idx)
        c.report.created += 1

    def _load_g_idx(
        self,
        layer: torch.nn.Module,
        param: torch.Tensor,
        weights: Weights,
        name: str,
        shard_id: Hashable = None,
    ) -> None:
        # Each fused part (q/k/v, gate/up) has its own g_idx. Tools that quantize
        # them from the same inputs write the same act-order permutation, but
        # nothing forces that, so every part's copy is kept until the kernel is built.
        part = linear_param(torch.empty_like(param.data), output_dim=None, input_dim=0)
        set_weight_attrs(part, checkpoint_shapes=param.checkpoint_shapes)
        layer.weight_loader(part, weights, name, shard_id)
        if not self.part_g_idx:
            param.data.copy_(part.data)
        self.part_g_idx[shard_id] = part.data

    def _local_g_idx(self, g_idx: torch.Tensor, groups: int) -> torch.Tensor:
        if self.plain_g_idx is not None and not torch.equal(
            g_idx.to(torch.int64).cpu(), self.plain_g_idx
        ):
            raise CheckpointError(
                f"{self.prefix}.g_idx is not in column order although the checkpoint says "
                f"desc_act=false; its row-parallel split cannot slice scales/qzeros by group "
                f"(set desc_act true in the quantization config to load it)"
            )
        local = g_idx.to(torch.int64) - self.group_offset
        if local.numel() and (int(local.min()) < 0 or int(local.max()) >= groups):
            raise CheckpointError(
                f"{self.prefix}.g_idx names groups outside the {groups} this rank holds "
                f"(offset {self.group_offset}); the checkpoint's g_idx does not match its "
                f"group_size {self.config.group_size}"
            )
        return local

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        c = self.config
        groups = layer.scales.shape[0]
        per = c.features_per_word
        shard_ids = [p.shard_id for p in getattr(layer, "parts", ())] or [None]
        parts = [self.part_g_idx.get(sid, layer.g_idx.data) for sid in shard_ids]
        if all(torch.equal(parts[0], other) for other in parts[1:]):
            pieces = [(0, layer.out_features, parts[0])]
        else:
            # Parts with their own act-order permutations cannot share one input order.
            offsets = [0, *itertools.accumulate(layer.output_sizes)]
            pieces = list(zip(offsets[:-1], offsets[1:], parts, strict=True))
        kernels, reasons = [], []
        for start, stop, g_idx in pieces:
            weights = GPTQWeights(
                qweight=layer.qweight.data[:, start:stop],
                qzeros=layer.qzeros.data[:, start // per : stop // per],
                scales=layer.scales.data[:, start:stop],
                g_idx=self._local_g_idx(g_idx, groups),
                bits=c.bits,
                checkpoint_format=c.checkpoint_format,
            )
            kernel, why = build_kernel(weights, self.device, c.kernel, kernels=c.kernels)
            kernels.append(kernel)
            reasons += [r for r in why if r not in reasons]
        self.kernel = kernels[0] if len(kernels) == 1 else ConcatKernel(kernels)
        self.part_g_idx.clear()
        # The kernel keeps what it multiplies with (the same tensors or a repacked copy);
        # as buffers they count in the model's memory like any other weight.
        for name in _PARAMS:
            delattr(layer, name)
        for name, tensor in self.kernel.tensors().items():
            layer.register_buffer(f"gptq_{name}", tensor, persistent=False)
        c.layer_done(self.prefix, self.kernel, reasons, self.fp16_bytes)

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.kernel is None:
            raise RuntimeError(f"{self.prefix}: GPTQ weights used before they were loaded")
        shape = x.shape
        y = self.kernel(x.reshape(-1, shape[-1]))
        if bias is not None:
            y = y + bias
        return y.reshape(*shape[:-1], y.shape[-1])

    def kernel_name(self, layer: torch.nn.Module) -> str:
        return self.kernel.name if self.kernel is not None else "gptq (not loaded)"

    def native_linear(self, layer: torch.nn.Module) -> NativeLinear | None:
        native = getattr(self.kernel, "native_linear", None)
        return native() if native is not None else None

    def weight_bytes(self) -> int:
        """Bytes the layer's kernel keeps for its weights on this rank."""
        return self.kernel.nbytes() if self.kernel is not None else 0
