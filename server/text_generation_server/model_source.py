"""Where a model's files come from: the default model, a local directory, or the Hugging Face cache.

:func:`resolve_model` never touches the network, so a server start is
reproducible and works offline; :func:`download_weights` is the one explicit
step that downloads, and converts ``.bin`` weights to safetensors when the
caller consents to unpickling them (``trust_remote_code``, as in TGI).
A resolved path always holds ``config.json`` and safetensors weights.
"""

from __future__ import annotations

import fnmatch
import json
import os
import pickle
import re
from pathlib import Path

from loguru import logger

from .default_model import DEFAULT_MODEL_ID, ConversionError, ensure_default_model
from .safetensors_conversion import (
    BIN_INDEX,
    SAFETENSORS_INDEX,
    bin_weight_files,
    convert_bin_checkpoint,
)

__all__ = [
    "DEFAULT_MODEL_ID",
    "ModelNotFoundError",
    "PickleConsentError",
    "default_cache_dir",
    "download_weights",
    "hub_cache_dir",
    "resolve_model",
]

# Files a shard or the router may read besides the weights.
_METADATA_PATTERNS = [
    "*.json",
    "*.txt",
    "*.model",
    "*.tiktoken",
    "*.jinja",
]
_SAFETENSORS_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
_BIN_PATTERNS = ["pytorch_model*.bin", BIN_INDEX]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")


class ModelNotFoundError(FileNotFoundError):
    """The model cannot be used as given; the message names it and says what to do."""


class ModelNotCachedError(ModelNotFoundError):
    """A hub id that is not in the Hugging Face cache (``download-weights`` would fetch it)."""


class PickleConsentError(ModelNotFoundError):
    """The model's weights are pickle files and converting them was not consented to (--trust-remote-code)."""


def _pickle_refusal(name: str, where: str, note: str = "") -> str:
    return (
        f"model {name} has only PyTorch .bin weights {where}: they are pickle files, and converting them to "
        f"safetensors means unpickling them, which can run code of their author's choosing{note}. If you "
        "trust this checkpoint, pass --trust-remote-code to consent to the conversion "
        f"(`text-generation-server download-weights {name} --trust-remote-code`)"
    )


def default_cache_dir() -> Path:
    """Where converted models live: $TEXT_GENERATION_CACHE, else $XDG_CACHE_HOME or ~/.cache, /text-generation-server."""
    explicit = os.environ.get("TEXT_GENERATION_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "text-generation-server"


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time (HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME)."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.environ[name]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "huggingface" / "hub"


def resolve_model(model_id: str | None, revision: str | None = None) -> Path:
    """A local directory holding ``config.json`` and safetensors weights for ``model_id``.

    - None: the built-in default model (converted once from the shipped GGUF).
    - An existing directory: checked and returned.
    - A hub id: its snapshot in the Hugging Face cache (``revision`` honoured);
      ``DEFAULT_MODEL_ID`` falls back to the built-in copy when not cached.

    Raises ModelNotFoundError with a message naming the model and the fix.
    """
    if model_id is None or not model_id.strip():
        if revision:
            logger.warning(f"--revision {revision} ignored: the built-in default model has no revisions")
        return _default_model()

    local = Path(model_id).expanduser()
    if local.exists():
        return check_checkpoint_dir(local)
    if _looks_like_path(model_id):
        raise ModelNotFoundError(f"model directory {model_id} does not exist")
    if not _HUB_ID.match(model_id):
        raise ModelNotFoundError(
            f"model {model_id!r} is neither an existing local directory nor a Hugging Face model id (org/name)"
        )

    try:
        snapshot = _cached_snapshot(model_id, revision)
    except ModelNotFoundError:
        if model_id == DEFAULT_MODEL_ID and revision is None:
            logger.info(f"{model_id} is not in the Hugging Face cache; using the built-in copy")
            return _default_model()
        raise
    return check_checkpoint_dir(snapshot, model_id=model_id)


def resolve_or_download(model_id: str | None, revision: str | None = None, *, trust_remote_code: bool = False) -> Path:
    """:func:`resolve_model`, and for a hub id not in the cache its download first, as
    ``download-weights`` does (config, tokenizer, safetensors; refused offline naming the model and
    ``download-weights``): what the launcher and ``quantize`` do with a model id, as TGI's do."""
    try:
        return resolve_model(model_id, revision)
    except ModelNotCachedError:
        if model_id is None:
            raise
    at = f" at revision {revision}" if revision else ""
    logger.info(f"{model_id}{at} is not in the Hugging Face cache: downloading it first, as download-weights does")
    return download_weights(model_id, revision, trust_remote_code=trust_remote_code)


def download_weights(model_id: str | None, revision: str | None = None, *, trust_remote_code: bool = False) -> Path:
    """Download ``model_id`` (config, tokenizer, safetensors) into the Hugging Face cache and return its path.

    Weights that exist only as ``pytorch_model*.bin`` (pickle) files are
    converted to safetensors, which means unpickling them, so only with
    ``trust_remote_code``: a hub repository's .bin files are then downloaded
    and converted locally, a local directory is converted in place. Without
    it such a model raises :class:`PickleConsentError` (for the hub, before
    any .bin file is downloaded). None means the built-in default model.
    """
    if model_id is None or not model_id.strip():
        return _default_model()
    local = Path(model_id).expanduser()
    if local.exists():
        if local.is_dir() and not _safetensors_files(local) and bin_weight_files(local):
            if not trust_remote_code:
                raise PickleConsentError(_pickle_refusal(model_id, f"({bin_weight_files(local)[0].name})"))
            _convert_bins(local, model_id)
        return check_checkpoint_dir(local)
    if _looks_like_path(model_id) or not _HUB_ID.match(model_id):
        raise ModelNotFoundError(
            f"model {model_id!r} is neither an existing local directory nor a Hugging Face model id (org/name)"
        )

    try:
        snapshot = _download(model_id, revision, _METADATA_PATTERNS + _SAFETENSORS_PATTERNS)
        if not _safetensors_files(snapshot):
            if not trust_remote_code:
                _refuse_hub_pickles(model_id, revision)
            logger.info(
                f"{model_id} has no safetensors weights; downloading its PyTorch .bin weights to convert them "
                "(--trust-remote-code: they will be unpickled)"
            )
            snapshot = _download(model_id, revision, _BIN_PATTERNS)
            if not bin_weight_files(snapshot):
                raise ModelNotFoundError(
                    f"model {model_id} has neither *.safetensors nor pytorch_model*.bin weights on the hub"
                )
            _convert_bins(snapshot, model_id)
    except ModelNotFoundError as err:
        if model_id == DEFAULT_MODEL_ID and revision is None:
            logger.warning(f"Cannot download {model_id} ({err}); using the built-in copy instead")
            return _default_model()
        raise
    path = check_checkpoint_dir(snapshot, model_id=model_id)
    logger.info(f"Downloaded {model_id} to {path}")
    return path


def _refuse_hub_pickles(model_id: str, revision: str | None) -> None:
    """Raise for a hub repository without safetensors weights, naming its .bin files when the hub lists them."""
    from huggingface_hub import list_repo_files

    try:
        bins = sorted(f for f in list_repo_files(model_id, revision=revision) if fnmatch.fnmatch(f, "pytorch_model*.bin"))
    except Exception as err:  # the listing only sharpens the message; the refusal stands without it
        logger.debug(f"cannot list the files of {model_id} on the hub: {err}")
        bins = None
    if bins == []:
        raise ModelNotFoundError(f"model {model_id} has neither *.safetensors nor pytorch_model*.bin weights on the hub")
    where = f"on the hub ({bins[0]}{', ...' if len(bins) > 1 else ''})" if bins else "on the hub (no *.safetensors)"
    raise PickleConsentError(_pickle_refusal(model_id, where, "; none of them was downloaded"))


def check_checkpoint_dir(path: Path, model_id: str | None = None) -> Path:
    """``path`` itself if it holds config.json and complete safetensors weights, else ModelNotFoundError.

    ``model_id`` (a hub id) is used in the message instead of the path when fixing means re-downloading.
    """
    name = model_id or str(path)
    if not path.is_dir():
        raise ModelNotFoundError(f"model path {path} is a file; expected a directory with config.json and *.safetensors")
    present = sorted(p.name for p in path.iterdir())
    listing = ", ".join(present[:12]) + (", ..." if len(present) > 12 else "") if present else "nothing"
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"model directory {path} has no config.json (found: {listing})")

    index = path / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map", {})
        except (OSError, ValueError) as err:
            raise ModelNotFoundError(f"model directory {path}: cannot read {index.name} ({err})") from None
        missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing:
            raise ModelNotFoundError(
                f"model directory {path}: {index.name} lists weight files that are missing: {', '.join(missing)}"
            )
        if weight_map:
            return path
    if _safetensors_files(path):
        return path

    bins = bin_weight_files(path)
    if bins:
        raise ModelNotFoundError(
            f"model directory {path} has only PyTorch .bin weights ({bins[0].name}); this server loads "
            "safetensors only and never unpickles weights. They are pickle files: if you trust the "
            f"checkpoint, run `text-generation-server download-weights {name} --trust-remote-code`, which "
            "unpickles them once and writes model*.safetensors beside the .bin files"
        )
    ggufs = sorted(path.glob("*.gguf"))
    if ggufs:
        raise ModelNotFoundError(
            f"model directory {path} has a GGUF file ({ggufs[0].name}) but no *.safetensors weights; "
            "this server loads safetensors checkpoints"
        )
    raise ModelNotFoundError(f"model directory {path} has no *.safetensors weights (found: {listing})")


def _default_model() -> Path:
    try:
        return ensure_default_model(default_cache_dir())
    except ConversionError as err:
        raise ModelNotFoundError(f"default model {DEFAULT_MODEL_ID}: {err}") from None


def _looks_like_path(model_id: str) -> bool:
    return model_id.startswith(("/", "./", "../", "~")) or model_id in (".", "..") or model_id.count("/") > 1


def _safetensors_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def _cached_snapshot(model_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        return Path(
            snapshot_download(model_id, revision=revision, cache_dir=str(cache), local_files_only=True)
        )
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        at = f" at revision {revision}" if revision else ""
        rev = f" --revision {revision}" if revision else ""
        raise ModelNotCachedError(
            f"model {model_id}{at} is not in the Hugging Face cache {cache}; download it first with "
            f"`text-generation-server download-weights {model_id}{rev}` (set HUGGINGFACE_HUB_CACHE or "
            "--huggingface-hub-cache if it is cached elsewhere)"
        ) from None


def _download(model_id: str, revision: str | None, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache = hub_cache_dir()
    logger.info(f"Downloading {model_id}{f' at revision {revision}' if revision else ''} into {cache}")
    try:
        return Path(snapshot_download(model_id, revision=revision, cache_dir=str(cache), allow_patterns=patterns))
    except GatedRepoError:
        raise ModelNotFoundError(
            f"model {model_id} is gated: accept its terms on the hub and set HF_TOKEN to a token with access"
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"model {model_id} does not exist on the Hugging Face hub (or is private: set HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"model {model_id} has no revision {revision!r}") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise ModelNotFoundError(
            f"the Hugging Face hub is unreachable (offline, or HF_HUB_OFFLINE is set) and model {model_id} "
            f"is not in the cache {cache}; download it where the hub is reachable with "
            f"`text-generation-server download-weights {model_id}` and point HUGGINGFACE_HUB_CACHE at that cache"
        ) from None
    except (HfHubHTTPError, HFValidationError, OSError) as err:
        raise ModelNotFoundError(f"downloading model {model_id} failed: {err}") from None


def _convert_bins(directory: Path, name: str) -> None:
    try:
        convert_bin_checkpoint(directory)
    except PermissionError:
        raise ModelNotFoundError(
            f"model {name}: cannot write safetensors files into {directory} (permission denied); "
            "copy the checkpoint to a writable directory first"
        ) from None
    except (ValueError, RuntimeError, OSError, pickle.UnpicklingError) as err:
        raise ModelNotFoundError(f"model {name}: converting .bin weights to safetensors failed: {err}") from None
