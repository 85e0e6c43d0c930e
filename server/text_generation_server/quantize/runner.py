"""Layer-by-layer GPTQ over a decoder-only model (the Llama family, Falcon).

Only one decoder layer's weights are in memory at a time (read from the
safetensors files into a meta-device transformers skeleton), plus the
calibration activations entering and leaving that layer. Each layer is
calibrated on the outputs of the already *quantized* previous layers.

Within a layer the linears are solved in four groups that share an input:
q/k/v, o, gate/up, down. With ``true_sequential`` each group sees inputs
produced by the already-quantized groups before it; the layer is advanced
stage by stage (attention input, attention output, MLP input, MLP hidden),
keeping each stage's activations, so every matmul runs once per stage rather
than re-running the whole layer per group. Layers that are not a sequence of
pre-norm blocks (Falcon's parallel attention) run the whole layer once per
group instead. Without ``true_sequential``, all four Hessians come from one
forward of the unquantized layer (AutoGPTQ's non-sequential mode).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from loguru import logger
from tqdm import tqdm

from text_generation_server.quantize.activations import ActivationList, ActivationStore
from text_generation_server.quantize.checkpoint import (
    SafetensorsCheckpoint,
    UnsupportedArchitectureError,
    decoder_parts,
    load_module,
    meta_model,
    release,
)
from text_generation_server.quantize.gptq import (
    HessianAccumulator,
    QuantSpec,
    calibration_precision,
    exact_precision,
    gptq_quantize,
    relative_output_error,
)
from text_generation_server.quantize.memory import (
    map_large_buffers,
    peak_rss_mib,
    return_freed_memory,
)
from text_generation_server.quantize.moe import PREFIX as MOE_PREFIX
from text_generation_server.quantize.moe import CheckpointMoE, is_moe
from text_generation_server.quantize.packing import pack_gptq, packed_length
from text_generation_server.quantize.progress import RunProgress

# Linears that read the same input, in the order the layer computes them.
LINEAR_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
# Phi-3 stores q/k/v and gate/up fused: each fused linear is one group (GPTQModel's layout).
FUSED_LINEAR_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.qkv_proj",),
    ("self_attn.o_proj",),
    ("mlp.gate_up_proj",),
    ("mlp.down_proj",),
)
# Falcon, in the order its layer calls them (GPTQModel's groups).
FALCON_LINEAR_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attention.query_key_value",),
    ("self_attention.dense",),
    ("mlp.dense_h_to_4h",),
    ("mlp.dense_4h_to_h",),
)


def linear_groups(layer: torch.nn.Module) -> tuple[tuple[str, ...], ...]:
    """The layer's linears in GPTQ's order, grouped by the input they share (a Mixtral layer:
    its attention's, then each expert's w1+w3 and w2 where its experts are loaded)."""
    if is_moe(layer):
        experts = getattr(getattr(layer, MOE_PREFIX, None), "experts", ())
        per_expert = [g for e in range(len(experts)) for g in (
            (f"{MOE_PREFIX}.experts.{e}.w1", f"{MOE_PREFIX}.experts.{e}.w3"), (f"{MOE_PREFIX}.experts.{e}.w2",))]
        return LINEAR_GROUPS[:2] + tuple(per_expert)
    if hasattr(layer, "self_attention"):
        return FALCON_LINEAR_GROUPS
    return FUSED_LINEAR_GROUPS if hasattr(layer.self_attn, "qkv_proj") else LINEAR_GROUPS


def _staged(layer: torch.nn.Module) -> bool:
    """Whether the layer is a Llama-style sequence of pre-norm blocks the staged forward runs
    (else each group is calibrated with a forward of the whole layer, see _quantize_layer_generic)."""
    return hasattr(layer, "self_attn")
# Keep the MLP hidden activations between stages only under this size;
# above it they are recomputed (one extra gate/up matmul) to save memory.
MLP_CACHE_BYTES = 2 << 30


class QuantizationConfigError(ValueError):
    """The requested settings do not fit the model's shapes."""


@dataclass
class LinearReport:
    name: str
    shape: tuple[int, int]
    rel_error: float
    percdamp: float


@dataclass
class QuantizedModel:
    """Packed tensors of every quantized linear (checkpoint names) and their error reports."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    reports: list[LinearReport] = field(default_factory=list)
    replaced: set[str] = field(default_factory=set)  # source weight names now stored packed


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the wanted input is captured."""


def _submodule(root: torch.nn.Module, dotted: str) -> torch.nn.Module:
    return root.get_submodule(dotted)


def check_shapes(config, spec: QuantSpec, trust_remote_code: bool = False) -> dict[str, int]:
    """Refuse settings the checkpoint layout cannot hold, naming the layer and sizes.

    A group size need not divide a layer's input features: the layer then
    gets ``ceil(in / group_size)`` groups, the last one shorter (the
    AutoGPTQ layout). Returns those layers' input features by name. The
    shapes are those of the first decoder layer's linears, built on the meta
    device (no memory).
    """
    layer = decoder_parts(meta_model(config, trust_remote_code)).layers[0]
    shapes = {name: tuple(_submodule(layer, name).weight.shape) for group in linear_groups(layer) for name in group}
    if is_moe(layer):  # every expert alike
        shapes[f"{MOE_PREFIX}.experts.E.w1"] = shapes[f"{MOE_PREFIX}.experts.E.w3"] = (
            config.intermediate_size, config.hidden_size)
        shapes[f"{MOE_PREFIX}.experts.E.w2"] = (config.hidden_size, config.intermediate_size)
    ragged = {}
    for name, (out_f, in_f) in shapes.items():
        if 0 < spec.group_size < in_f and in_f % spec.group_size:
            ragged[name] = in_f
        try:
            packed_length(in_f, spec.bits)
            packed_length(out_f, spec.bits)
        except ValueError as err:
            raise QuantizationConfigError(
                f"{spec.bits}-bit packing cannot hold {name} (weight {out_f}x{in_f}): {err}"
            ) from err
    return ragged


class _LayerInputs:
    """Calibration activations entering the current layer, with the keyword
    arguments the model passes to each layer (mask, rotary tables, ...)."""

    def __init__(self, hidden: ActivationList) -> None:
        self.hidden = hidden
        self.kwargs: list[list[dict]] = []  # [batch][layer]


def capture_layer_inputs(
    model, checkpoint: SafetensorsCheckpoint, windows: torch.Tensor, batch_size: int, store: ActivationStore
) -> _LayerInputs:
    """Run the embeddings and record what every decoder layer would receive.

    Each decoder layer is swapped for a recorder that passes hidden states
    through unchanged, so per-layer arguments (e.g. sliding-window masks) are
    captured as the model itself builds them; the last recorder stops the pass.
    """
    parts = decoder_parts(model)
    inner = parts.inner
    load_module(parts.embed, parts.embed_prefix, checkpoint)
    layers = parts.layers
    originals = list(layers)
    record: dict[int, dict] = {}

    class Recorder(torch.nn.Module):
        def __init__(self, index: int) -> None:
            super().__init__()
            self.index = index
            self.attention_type = getattr(originals[index], "attention_type", None)

        def forward(self, hidden_states, *args, **kwargs):
            if args:
                raise UnsupportedArchitectureError("decoder layers called with positional arguments are not supported")
            record[self.index] = dict(kwargs)
            if self.index == 0:
                record["input"] = hidden_states
            if self.index == len(originals) - 1:
                raise _StopForward
            return hidden_states

    captured = _LayerInputs(store.list())
    for i in range(len(originals)):
        layers[i] = Recorder(i)
    try:
        with torch.no_grad():
            for batch in windows.split(batch_size):
                record.clear()
                try:
                    inner(input_ids=batch, use_cache=False)
                except _StopForward:
                    pass
                captured.hidden.append(record["input"].detach())
                captured.kwargs.append([record[i] for i in range(len(originals))])
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
        release(parts.embed)
    return captured


def _layer_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _capture_input(module: torch.nn.Module, fn: Callable[[], object]) -> torch.Tensor:
    """Run ``fn`` until ``module`` is called and return ``module``'s input (the call is skipped)."""
    box: list[torch.Tensor] = []

    def hook(_mod, args):
        box.append(args[0])
        raise _StopForward

    handle = module.register_forward_pre_hook(hook)
    try:
        fn()
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not box:
        raise UnsupportedArchitectureError(f"{type(module).__name__} was never called in the layer forward")
    return box[0]


class LayerQuantizer:
    """Quantizes one decoder layer in place and collects its packed tensors."""

    def __init__(self, layer: torch.nn.Module, prefix: str, spec: QuantSpec, result: QuantizedModel) -> None:
        self.layer = layer
        self.prefix = prefix
        self.spec = spec
        self.result = result

    def solve(self, group: tuple[str, ...], acc: HessianAccumulator) -> None:
        with exact_precision(acc.device):
            self._solve(group, acc)

    def _solve(self, group: tuple[str, ...], acc: HessianAccumulator) -> None:
        h = acc.hessian()
        linears = [_submodule(self.layer, n) for n in group]
        weights = [lin.weight.data for lin in linears]
        stacked = torch.cat(weights, 0) if len(weights) > 1 else weights[0]
        name = self.prefix + "+".join(n.rsplit(".", 1)[-1] for n in group)
        solved = gptq_quantize(stacked, h, self.spec, name=name)
        parts = solved.split_rows([w.shape[0] for w in weights]) if len(weights) > 1 else [solved]
        for lin_name, lin, w, part in zip(group, linears, weights, parts, strict=True):
            full = self.prefix + lin_name
            rel = relative_output_error(w, part.dequant, h)
            # Packed and kept on the CPU, whatever device the layer runs on.
            packed = pack_gptq(part.codes.cpu(), part.scales.cpu(), part.zeros.cpu(), part.g_idx.cpu(),
                               self.spec.bits)  # fmt: skip
            for key, tensor in packed.items():
                self.result.tensors[f"{full}.{key}"] = tensor
            if lin.bias is not None:
                self.result.tensors[f"{full}.bias"] = lin.bias.data.to("cpu", torch.float16).clone()
            self.result.replaced.add(f"{full}.weight")
            self.result.replaced.add(f"{full}.bias")
            self.result.reports.append(LinearReport(full, tuple(w.shape), rel, part.percdamp))
            # later stages and layers see what the checkpoint will hold
            lin.weight.data = part.dequant.to(lin.weight.dtype)


def _residual_scale(layer) -> float:
    """What each block's output is multiplied by before it joins the stream (Granite's
    residual_multiplier; 1 for Llama)."""
    return float(getattr(layer, "residual_multiplier", 1.0))


def _sandwich(layer) -> bool:
    """Gemma 2/3 layers norm each block's output too (post_attention_layernorm after attention,
    pre/post_feedforward_layernorm around the MLP)."""
    return hasattr(layer, "pre_feedforward_layernorm")


def _mlp_norm(layer) -> torch.nn.Module:
    """The norm in front of the MLP."""
    return layer.pre_feedforward_layernorm if _sandwich(layer) else layer.post_attention_layernorm


def _attention_block_out(layer, y: torch.Tensor) -> torch.Tensor:
    """o_proj's output as it joins the stream (before the residual scale)."""
    return layer.post_attention_layernorm(y) if _sandwich(layer) else y


def _mlp_block_out(layer, y: torch.Tensor) -> torch.Tensor:
    """down_proj's output as it joins the stream (before the residual scale)."""
    return layer.post_feedforward_layernorm(y) if _sandwich(layer) else y


def _check_layer_structure(layer, x: torch.Tensor, kwargs: dict) -> None:
    """The staged forward must reproduce the layer's own forward (pre-norm residual blocks, with
    Gemma's block-output norms where the layer has them)."""
    scale = _residual_scale(layer)
    with torch.no_grad():
        ref = _layer_output(layer(x, **kwargs))
        attn = _layer_output(layer.self_attn(hidden_states=layer.input_layernorm(x), **kwargs))
        h = x + scale * _attention_block_out(layer, attn)
        out = h + scale * _mlp_block_out(layer, layer.mlp(_mlp_norm(layer)(h)))
    if not torch.allclose(ref, out, rtol=1e-4, atol=1e-4 * float(ref.abs().max()) + 1e-6):
        raise UnsupportedArchitectureError(
            f"{type(layer).__name__} does not follow the pre-norm residual layout of the Llama recipe"
        )


def _quantize_attention(layer, q: LayerQuantizer, hidden: list[torch.Tensor], kwargs: list[dict]) -> list[torch.Tensor]:
    """Quantize q/k/v then o; returns the residual stream after the attention block, per batch
    (``hidden`` is consumed)."""
    qkv, o = linear_groups(layer)[:2]
    attn = layer.self_attn
    o_proj = _submodule(layer, o[0])
    scale = _residual_scale(layer)
    with torch.no_grad():
        acc = HessianAccumulator(hidden[0].shape[-1])
        for x in hidden:
            acc.add(layer.input_layernorm(x))
        q.solve(qkv, acc)

        acc = HessianAccumulator(o_proj.in_features)
        attn_out = hidden.new()
        for x, kw in zip(hidden, kwargs, strict=True):
            normed = layer.input_layernorm(x)
            a = _capture_input(o_proj, lambda normed=normed, kw=kw: attn(hidden_states=normed, **kw))
            acc.add(a)
            attn_out.append(a)
        q.solve(o, acc)

        residual = hidden.new()
        for i, x in enumerate(hidden):
            residual.append(x + scale * _attention_block_out(layer, o_proj(attn_out[i])))
            attn_out[i] = hidden[i] = None
    return residual


def _quantize_layer_sequential(layer, q: LayerQuantizer, hidden: list[torch.Tensor], kwargs: list[dict]) -> list[torch.Tensor]:
    gate_up, down = linear_groups(layer)[2:]
    mlp = layer.mlp
    down_proj = _submodule(layer, down[0])
    scale = _residual_scale(layer)
    mlp_norm = _mlp_norm(layer)
    residual = _quantize_attention(layer, q, hidden, kwargs)
    with torch.no_grad():
        acc = HessianAccumulator(residual[0].shape[-1])
        for h in residual:
            acc.add(mlp_norm(h))
        q.solve(gate_up, acc)

        total = residual.numel() // residual[0].shape[-1] * down_proj.in_features * 4
        keep = total <= MLP_CACHE_BYTES
        acc = HessianAccumulator(down_proj.in_features)
        mlp_hidden = []
        for h in residual:
            normed = mlp_norm(h)
            m = _capture_input(down_proj, lambda normed=normed: mlp(normed))
            acc.add(m)
            mlp_hidden.append(m if keep else None)
        q.solve(down, acc)

        outputs = residual.new()
        for i, h in enumerate(residual):
            if keep:
                outputs.append(h + scale * _mlp_block_out(layer, down_proj(mlp_hidden[i])))
                mlp_hidden[i] = None
            else:
                outputs.append(h + scale * _mlp_block_out(layer, mlp(mlp_norm(h))))
            residual[i] = None
    return outputs


def _quantize_layer_moe(layer, q: LayerQuantizer, hidden: list[torch.Tensor], kwargs: list[dict]) -> list[torch.Tensor]:
    """Attention as for Llama; then each expert's w1+w3 and w2 calibrated on the tokens the
    (float) router sends it, with its quantized w1/w3 feeding w2's Hessian."""
    moe = getattr(layer, MOE_PREFIX)
    residual = _quantize_attention(layer, q, hidden, kwargs)
    with torch.no_grad():
        width = residual[0].shape[-1]
        normed = [layer.post_attention_layernorm(h).reshape(-1, width) for h in residual]
        routes = [moe.route(n)[1] for n in normed]
        for e, expert in enumerate(moe.experts):
            picked = [n[(chosen == e).any(-1)] for n, chosen in zip(normed, routes, strict=True)]
            base = f"{MOE_PREFIX}.experts.{e}."
            acc = HessianAccumulator(width)
            for x in picked:
                acc.add(x)
            if acc.rows == 0:
                logger.warning(f"{q.prefix}{base.rstrip('.')}: no calibration token chose this expert; "
                               f"its weights are rounded to nearest")  # fmt: skip
                acc.add(torch.eye(width, device=expert.w1.weight.device))
            q.solve((base + "w1", base + "w3"), acc)
            acc = HessianAccumulator(expert.w2.in_features)
            for x in picked:
                acc.add(expert.hidden_of(x))
            if acc.rows == 0:
                acc.add(torch.eye(expert.w2.in_features, device=expert.w2.weight.device))
            q.solve((base + "w2",), acc)
        outputs = residual.new()
        for i, n in enumerate(normed):
            h = residual[i]
            outputs.append(h + moe(n).reshape(h.shape))
            residual[i] = normed[i] = None
        return outputs


def _check_moe_structure(layer, x: torch.Tensor, kwargs: dict) -> None:
    """The staged MoE layer reproduces transformers' forward, its experts filled with the same
    weights (skipped, logged, where transformers' expert layout is not the one known here)."""
    moe = getattr(layer, MOE_PREFIX)
    if not moe.load_into(layer.mlp):
        logger.debug("transformers' expert layout is not the stacked one; the MoE layer check is skipped")
        return
    try:
        with torch.no_grad():
            ref = _layer_output(layer(x, **kwargs))
            attn = _layer_output(layer.self_attn(hidden_states=layer.input_layernorm(x), **kwargs))
            h = x + attn
            out = h + moe(layer.post_attention_layernorm(h).reshape(-1, h.shape[-1])).reshape(h.shape)
    finally:
        release(layer.mlp)
    if not torch.allclose(ref, out, rtol=1e-4, atol=1e-4 * float(ref.abs().max()) + 1e-6):
        raise UnsupportedArchitectureError(
            f"{type(layer).__name__}: the experts as read from the checkpoint do not reproduce the layer"
        )


def _quantize_layer_generic(layer, q: LayerQuantizer, hidden: list[torch.Tensor], kwargs: list[dict]) -> list[torch.Tensor]:
    """True-sequential for any layer: each group's Hessian from forwards of the whole layer
    (stopped at the group's linear) with the groups before it already quantized."""
    with torch.no_grad():
        for group in linear_groups(layer):
            first = _submodule(layer, group[0])
            acc = HessianAccumulator(first.in_features)
            for x, kw in zip(hidden, kwargs, strict=True):
                acc.add(_capture_input(first, lambda x=x, kw=kw: layer(x, **kw)))
            q.solve(group, acc)
        return _outputs(layer, hidden, kwargs)


def _outputs(layer, hidden: ActivationList, kwargs: list[dict]) -> ActivationList:
    """The layer's output for each batch, its input released as it goes."""
    outputs = hidden.new()
    for i, kw in enumerate(kwargs):
        outputs.append(_layer_output(layer(hidden[i], **kw)))
        hidden[i] = None
    return outputs


def _quantize_layer_parallel(layer, q: LayerQuantizer, hidden: list[torch.Tensor], kwargs: list[dict]) -> list[torch.Tensor]:
    accs = {}
    handles = []
    groups = linear_groups(layer)
    for group in groups:
        first = _submodule(layer, group[0])
        acc = accs[group] = HessianAccumulator(first.in_features)
        handles.append(first.register_forward_pre_hook(lambda _m, args, acc=acc: acc.add(args[0])))
    try:
        with torch.no_grad():
            for x, kw in zip(hidden, kwargs, strict=True):
                layer(x, **kw)
    finally:
        for handle in handles:
            handle.remove()
    for group in groups:
        q.solve(group, accs[group])
    with torch.no_grad():
        return _outputs(layer, hidden, kwargs)


def quantize_model(
    model_path,
    config,
    windows: torch.Tensor,
    spec: QuantSpec,
    *,
    true_sequential: bool = True,
    trust_remote_code: bool = False,
    batch_tokens: int = 4096,
    progress: RunProgress | None = None,
    resume: bool = False,
    device: torch.device | None = None,
    activations: ActivationStore | None = None,
    calibration_dtype: torch.dtype = torch.float32,
) -> QuantizedModel:
    """GPTQ-quantize every decoder layer's linears of the checkpoint at ``model_path``.

    ``windows`` are the calibration token ids ``[nsamples, seqlen]``. Returns the
    packed tensors (checkpoint names) and a per-linear error report; the
    caller writes the checkpoint. With ``progress``, finished layers are saved as
    the run goes, and with ``resume`` an earlier run's saved layers are taken up.
    Each layer runs on ``device`` (default the CPU): its weights, the calibration
    activations and the Hessian work (float32) move there for the layer and back.
    ``activations`` keeps the calibration activations within a memory budget, the rest on disk
    (default: all in memory). ``calibration_dtype`` bfloat16 runs the calibration forwards and
    Hessian products in bfloat16 (the solve stays float32).
    """
    device = device or torch.device("cpu")
    store = activations or ActivationStore(1 << 62, Path(tempfile.gettempdir()))
    map_large_buffers()
    checkpoint = SafetensorsCheckpoint(model_path)
    model = meta_model(config, trust_remote_code)
    batch_size = max(1, batch_tokens // windows.shape[1])
    t0 = time.perf_counter()
    inputs = capture_layer_inputs(model, checkpoint, windows, batch_size, store)
    logger.info(
        f"Captured layer inputs for {windows.shape[0]} windows of {windows.shape[1]} tokens "
        f"in {len(inputs.hidden)} batches ({time.perf_counter() - t0:.1f} s)"
    )
    result = QuantizedModel()
    parts = decoder_parts(model)
    layers = parts.layers
    hidden = inputs.hidden
    done = progress.start(resume) if progress is not None else 0
    if done:
        hidden.release()
        reports, hidden_file = progress.load(done, LinearReport)
        hidden = store.from_file(hidden_file)
        result.reports.extend(reports)
        result.replaced.update(f"{r.name}.{suffix}" for r in reports for suffix in ("weight", "bias"))
    last_save = time.perf_counter()
    mode = "true-sequential" if true_sequential else "one pass per layer"
    bar = tqdm(total=len(layers), initial=done, desc="GPTQ layers", unit="layer", dynamic_ncols=True)
    try:
        for index, layer in enumerate(layers):
            if index < done:
                continue
            t_layer = time.perf_counter()
            prefix = f"{parts.layer_prefix}{index}."
            kwargs = [batch_kwargs[index] for batch_kwargs in inputs.kwargs]
            moe = is_moe(layer)
            if moe:  # the experts as the checkpoint stores them, beside the rest of the layer
                for name, child in layer.named_children():
                    if name != "mlp":
                        load_module(child, f"{prefix}{name}.", checkpoint)
                setattr(layer, MOE_PREFIX, CheckpointMoE.load(checkpoint, prefix, config))
                if index == 0:
                    _check_moe_structure(layer, hidden[0][:1], _slice_kwargs(kwargs[0], 1))
            else:
                load_module(layer, prefix, checkpoint)
                if index == 0 and _staged(layer):
                    _check_layer_structure(layer, hidden[0][:1], _slice_kwargs(kwargs[0], 1))
            if device.type != "cpu":
                layer.to(device)
                if moe:
                    getattr(layer, MOE_PREFIX).to(device)
                hidden = hidden.map(lambda h: h.to(device))
                kwargs = [_to_device(kw, device) for kw in kwargs]
            quantizer = LayerQuantizer(layer, prefix, spec, result)
            if moe:
                run = _quantize_layer_moe  # true-sequential within each expert either way
            elif not true_sequential:
                run = _quantize_layer_parallel
            else:
                run = _quantize_layer_sequential if _staged(layer) else _quantize_layer_generic
            with calibration_precision(calibration_dtype, device):
                hidden = run(layer, quantizer, hidden, kwargs)
            if device.type != "cpu":
                hidden = hidden.map(lambda h: h.cpu())
            groups = linear_groups(layer)
            if moe:
                delattr(layer, MOE_PREFIX)
            release(layer)
            return_freed_memory()
            layer_reports = result.reports[-sum(len(g) for g in groups):]
            errors = " ".join(
                f"{r.name.rsplit('.', 1)[-1].removesuffix('_proj')}={r.rel_error:.4f}" for r in layer_reports
            )
            spilled = f", activations on disk {store.spilled_bytes / 2**20:.0f} MiB" if store.spilled_total else ""
            logger.info(
                f"layer {index + 1}/{len(layers)} ({mode}) {time.perf_counter() - t_layer:.1f} s, "
                f"peak RSS {peak_rss_mib():.0f} MiB{spilled}: rel. output error {errors}"
            )
            bar.set_postfix_str(f"layer {index + 1} worst rel. error {max(r.rel_error for r in layer_reports):.4f}")
            bar.update(1)
            if progress is not None:
                # The layer's packed tensors go to disk now (the writer reads them back), so memory
                # holds one layer's work, never the quantized model.
                names = [k for k in result.tensors if k.startswith(prefix)]
                progress.save_layer(index, {k: result.tensors.pop(k) for k in names}, layer_reports)
                if time.perf_counter() - last_save >= progress.every_s or index == len(layers) - 1:
                    progress.save_hidden(index, hidden)
                    last_save = time.perf_counter()
    finally:
        bar.close()
    return result


def _to_device(value, device: torch.device):
    """A layer's keyword arguments (masks, rotary tables, nested in tuples) on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(_to_device(v, device) for v in value)
    return value


def _slice_kwargs(kwargs: dict, n: int) -> dict:
    """Keyword arguments for the first ``n`` rows of a batch (tensors with a batch dim are cut)."""
    def cut(v):
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] > n:
            return v[:n]
        if isinstance(v, tuple):
            return tuple(cut(t) for t in v)
        return v
    return {k: cut(v) for k, v in kwargs.items()}


__all__ = [
    "LINEAR_GROUPS",
    "LinearReport",
    "QuantizationConfigError",
    "QuantizedModel",
    "check_shapes",
    "quantize_model",
]
