"""`quantize MODEL OUTPUT_DIR` end to end: checks, calibration data, GPTQ,
checkpoint writing and the optional upload.

Every check that can fail on user input runs before the long computation.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from loguru import logger

from text_generation_server.quantize.activations import ActivationStore, default_budget_bytes
from text_generation_server.quantize.checkpoint import load_config, read_config_json
from text_generation_server.quantize.data import (
    BUILTIN_DATASET,
    calibration_windows,
    load_text,
    tokenize,
)
from text_generation_server.quantize.gptq import QuantSpec
from text_generation_server.quantize.memory import peak_rss_mib
from text_generation_server.quantize.progress import RunProgress
from text_generation_server.quantize.runner import (
    LinearReport,
    QuantizationConfigError,
    check_shapes,
    quantize_model,
)
from text_generation_server.quantize.writer import (
    atomic_output_dir,
    check_output_dir,
    quantization_config,
    write_checkpoint,
)


class UploadError(RuntimeError):
    """The local checkpoint is complete but pushing it to the hub failed."""


class AlreadyQuantizedError(ValueError):
    """The source checkpoint is already quantized."""


@dataclass(frozen=True)
class CalibrationSettings:
    dataset: str = BUILTIN_DATASET
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0


def set_threads() -> int:
    """Use every core unless OMP_NUM_THREADS says otherwise; returns the count."""
    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    return torch.get_num_threads()


def resolve(model_id: str | None, revision: str | None) -> Path:
    """The model's directory: a local one, the cached snapshot of a hub id, or, for a hub id not in
    the cache, its download (config, tokenizer and safetensors, as ``download-weights`` fetches
    them; refused offline, naming the model and ``download-weights``)."""
    from text_generation_server.model_source import resolve_or_download

    if model_id in (None, "", "default"):
        model_id = None
    return resolve_or_download(model_id, revision)


def load_tokenizer(path: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load the tokenizer of {path}: {err}") from err


def calibration_data(
    model_path: Path, calibration: CalibrationSettings, seqlen: int, trust_remote_code: bool
) -> tuple[torch.Tensor, str]:
    """The calibration windows ``[nsamples, seqlen]`` and a description of their text.

    The tokenizer, the text and its full tokenization are dropped on return,
    before the GPTQ pass needs the memory.
    """
    tokenizer = load_tokenizer(model_path, trust_remote_code)
    text = load_text(calibration.dataset, "train")
    tokens = tokenize(tokenizer, text)
    windows = calibration_windows(tokens, calibration.nsamples, seqlen, calibration.seed, text.source)
    logger.info(
        f"Calibration: {windows.shape[0]} random windows of {seqlen} tokens (seed {calibration.seed}) "
        f"from {text.source}, {tokens.numel()} tokens in total"
    )
    return windows, text.source


def resolve_calibration_dtype(name: str, device: torch.device) -> torch.dtype:
    """``--calibration-dtype``: float32, bfloat16, or auto (bfloat16 where the device has bfloat16
    matrix instructions: AMX/AVX-512 BF16 CPUs, CUDA GPUs that support it; float32 elsewhere)."""
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        fast = torch.cuda.is_bf16_supported()
    else:
        flags = ""
        try:
            flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                          if line.startswith("flags")), "")
        except OSError:
            pass
        fast = any(f in flags.split() for f in ("amx_bf16", "avx512_bf16"))
    dtype = torch.bfloat16 if fast else torch.float32
    logger.info(f"--calibration-dtype auto: {str(dtype)[6:]} on {device}")
    return dtype


def resolve_device(name: str) -> torch.device:
    """``--device``: ``auto`` (the first GPU where CUDA is present, else the CPU), ``cpu``, ``cuda`` or
    ``cuda:N``; a GPU that is not there is refused naming what is."""
    if name == "auto":
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    else:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise QuantizationConfigError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
        if device.type not in ("cpu", "cuda"):
            raise QuantizationConfigError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count == 0:
                raise QuantizationConfigError(f"--device {name}: no CUDA device is visible; use --device cpu")
            device = torch.device("cuda", device.index or 0)
            if device.index >= count:
                raise QuantizationConfigError(f"--device {name}: only {count} CUDA device(s) are visible")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU"
    logger.info(f"Quantizing on {device} ({where}); layers move there one at a time")
    return device


def quantize_checkpoint(
    model_id: str | None,
    output_dir: Path,
    spec: QuantSpec,
    calibration: CalibrationSettings = CalibrationSettings(),
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    true_sequential: bool = True,
    overwrite: bool = False,
    resume: bool = False,
    save_every: float = 60.0,
    device: str = "auto",
    activation_memory: int | None = None,
    calibration_dtype: str = "float32",
) -> Path:
    """Quantize ``model_id`` into a v1 GPTQ checkpoint at ``output_dir``; returns its path.

    ``activation_memory``: bytes of calibration activations kept in memory (default half the
    available memory); the rest go to files beside the output while the run lasts."""
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    output_dir = Path(output_dir)
    check_output_dir(output_dir, overwrite)
    run_device = resolve_device(device)
    model_path = resolve(model_id, revision)
    check_output_dir(output_dir, overwrite, model_path)
    raw_config = read_config_json(model_path)
    if raw_config.get("quantization_config"):
        method = raw_config["quantization_config"].get("quant_method", "unknown")
        raise AlreadyQuantizedError(
            f"{model_path} is already quantized ({method}); quantize the unquantized checkpoint instead"
        )
    config = load_config(model_path, trust_remote_code)
    ragged = check_shapes(config, spec, trust_remote_code)
    if ragged:
        g = spec.group_size
        layers = ", ".join(
            f"{name} ({in_f} = {in_f // g}x{g} + {in_f % g})" for name, in_f in ragged.items()
        )
        logger.info(f"Group size {g} leaves a shorter last group in {layers}")

    seqlen = calibration.seqlen
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos and seqlen > max_pos:
        logger.info(f"--seqlen {seqlen} exceeds the model's {max_pos} positions; using {max_pos}")
        seqlen = max_pos

    windows, source = calibration_data(model_path, calibration, seqlen, trust_remote_code)
    threads = set_threads()
    logger.info(
        f"Quantizing {model_path} ({config.architectures[0]}, {config.num_hidden_layers} layers) to "
        f"{spec.bits}-bit, group size {spec.group_size}, {'sym' if spec.sym else 'asym'}, "
        f"act-order {spec.act_order}, group-aware order {spec.group_aware_order}, static groups {spec.static_groups}, "
        f"true-sequential {true_sequential}, "
        f"percdamp {spec.percdamp}, {threads} threads"
    )

    t_quant = time.perf_counter()
    progress = RunProgress(
        output_dir, RunProgress.describe(spec, windows, model_path, true_sequential), every_s=save_every
    )
    budget = default_budget_bytes() if activation_memory is None else activation_memory
    store = ActivationStore(budget, progress.spill_dir)
    store.clear_directory()  # what a stopped run left
    logger.info(f"Calibration activations: up to {budget / 2**20:.0f} MiB in memory, the rest in {store.dir}")
    try:
        result = quantize_model(
            model_path, config, windows, spec, true_sequential=true_sequential, trust_remote_code=trust_remote_code,
            progress=progress, resume=resume, device=run_device, activations=store,
            calibration_dtype=resolve_calibration_dtype(calibration_dtype, run_device),
        )
    finally:
        store.clear_directory()
    log_error_table(result.reports)
    t_quant = time.perf_counter() - t_quant

    calib_meta = {
        "dataset": source,
        "nsamples": int(windows.shape[0]),
        "seqlen": int(seqlen),
        "seed": calibration.seed,
    }
    qconfig = quantization_config(spec, true_sequential, calib_meta)
    with atomic_output_dir(output_dir) as tmp:
        packed = {**progress.packed_tensors(config.num_hidden_layers), **result.tensors}
        write_checkpoint(tmp, model_path, packed, result.replaced, qconfig)
    progress.finish()
    size = sum(f.stat().st_size for f in output_dir.iterdir() if f.is_file())
    logger.info(
        f"Wrote {output_dir} ({size / 2**20:.1f} MiB) in {time.perf_counter() - t_start:.1f} s "
        f"(GPTQ {t_quant:.1f} s; CPU time {time.process_time() - cpu_start:.0f} s); peak RSS {peak_rss_mib():.0f} MiB"
    )
    return output_dir


def log_error_table(reports: list[LinearReport]) -> None:
    """One line per layer: each linear's relative output error on the calibration inputs."""
    columns = list(dict.fromkeys(r.name.rsplit(".", 1)[-1].removesuffix("_proj") for r in reports))
    rows: dict[str, dict[str, LinearReport]] = {}
    for r in reports:
        layer, linear = r.name.rsplit(".", 2)[0], r.name.rsplit(".", 1)[-1].removesuffix("_proj")
        rows.setdefault(layer, {})[linear] = r
    logger.info("Relative output error ||WX-QX||/||WX|| per linear on the calibration inputs:")
    logger.info(f"{'layer':<20}" + "".join(f"{c:>8}" for c in columns))
    for layer, cells in rows.items():
        logger.info(f"{layer:<20}" + "".join(f"{cells[c].rel_error:>8.4f}" if c in cells else f"{'-':>8}" for c in columns))
    if reports:
        worst = max(reports, key=lambda r: r.rel_error)
        mean = sum(r.rel_error for r in reports) / len(reports)
        raised = sorted({r.percdamp for r in reports})
        logger.info(
            f"mean {mean:.4f}, worst {worst.rel_error:.4f} ({worst.name}); dampening used: "
            + ", ".join(f"{p:g}" for p in raised)
        )


def upload(output_dir: Path, repo_id: str) -> None:
    """Push a finished checkpoint to the Hugging Face hub (the local copy stays either way)."""
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.constants import HF_HUB_OFFLINE
    except ModuleNotFoundError as err:
        raise UploadError("uploading needs the huggingface_hub package, which is not installed") from err
    if HF_HUB_OFFLINE:
        raise UploadError(
            f"cannot upload to {repo_id}: the hub is in offline mode (HF_HUB_OFFLINE is set); "
            f"the checkpoint is kept at {output_dir}"
        )
    api = HfApi()
    try:
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(folder_path=str(output_dir), repo_id=repo_id, commit_message="Add GPTQ checkpoint")
    except Exception as err:  # noqa: BLE001 - network, auth and hub errors all end the same way
        raise UploadError(
            f"upload to {repo_id} failed ({type(err).__name__}: {err}); the checkpoint is kept at {output_dir}"
        ) from err
    logger.info(f"Uploaded {output_dir} to https://huggingface.co/{repo_id}")
