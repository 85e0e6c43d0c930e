"""Calibration and evaluation text.

The built-in corpus, ``python-docs``, is the docstrings of the Python
standard library installed on this machine (PSF-licensed), harvested with
``ast`` from the source files without importing anything, so it is available
offline everywhere and deterministic for a given Python install. Modules are
split by a stable hash of their path: about 80% are the ``train`` split used
for calibration, the rest the ``eval`` split the perplexity tool scores by
default, so quality numbers are never measured on calibration text.

Other sources: a local ``.txt`` file (read whole) or ``.jsonl`` file (the
``text`` field of each line), or a Hugging Face dataset name where the
network is available and the ``datasets`` package is installed (the
``quantize`` extra: ``pip install 'text-generation-server[quantize]'``).
"""

from __future__ import annotations

import ast
import functools
import json
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from loguru import logger

BUILTIN_DATASET = "python-docs"
SPLITS = ("train", "eval")
_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_MIN_DOCSTRING = 40
# Hugging Face names with a well-known config and text column
_HUB_ALIASES = {"wikitext2": ("wikitext", "wikitext-2-raw-v1")}
# How to get the optional `datasets` package that hub datasets need.
HUB_DATASETS_INSTALL = "pip install 'text-generation-server[quantize]'"


class DatasetError(ValueError):
    """The dataset cannot be read or is too small; the message names it and says what is allowed."""


@dataclass(frozen=True)
class Text:
    """A corpus as one string, with a human-readable description of its origin."""

    text: str
    source: str


def load_text(dataset: str, split: str = "train") -> Text:
    """The text of ``dataset`` (built-in name, local file or hub dataset) for ``split``.

    ``split`` only selects a part of the built-in corpus and of hub datasets;
    a local file is used whole for either purpose.
    """
    if split not in SPLITS:
        raise DatasetError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    if dataset == BUILTIN_DATASET:
        return python_docs(split)
    path = Path(dataset).expanduser()
    if path.is_file():
        return _local_file(path)
    if path.exists():
        raise DatasetError(f"dataset {dataset!r} is a directory; pass a .txt or .jsonl file")
    if path.suffix in (".txt", ".jsonl", ".json") or not _looks_like_hub_id(dataset):
        raise DatasetError(
            f"dataset {dataset!r} is not a file that exists, nor the built-in corpus ({BUILTIN_DATASET}), "
            "nor a Hugging Face dataset name (org/name, or wikitext2)"
        )
    return _hub_dataset(dataset, split)


def _looks_like_hub_id(name: str) -> bool:
    if name in _HUB_ALIASES:
        return True
    parts = name.split(":", 1)[0].split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not name.startswith((".", "/", "~"))


def python_docs(split: str = "train") -> Text:
    """Docstrings of the standard library modules of this Python, one split of them."""
    root, modules, skipped = _stdlib_docstrings()
    pieces: list[str] = []
    used = 0
    for rel, docs in modules:
        in_eval = zlib.crc32(rel.encode()) % 5 == 0
        if in_eval == (split == "eval"):
            used += 1
            pieces.extend(docs)
    if not pieces:
        raise DatasetError(f"found no standard-library docstrings under {root} for the built-in corpus")
    note = f", {skipped} unparsable skipped" if skipped else ""
    return Text("\n\n".join(pieces), f"{BUILTIN_DATASET} ({split} split: docstrings of {used} stdlib modules in {root}{note})")


@functools.cache
def _stdlib_docstrings() -> tuple[Path, list[tuple[str, list[str]]], int]:
    """(stdlib root, [(module path, its docstrings)], files skipped), parsed once per process."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py")
        if not _EXCLUDED_DIRS.intersection(p.relative_to(root).parts)
    )
    modules: list[tuple[str, list[str]]] = []
    skipped = 0
    for f in files:
        rel = f.relative_to(root).as_posix()
        try:
            tree = ast.parse(f.read_bytes(), filename=rel)
        except (SyntaxError, ValueError, OSError):
            skipped += 1
            continue
        docs = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= _MIN_DOCSTRING:
                    docs.append(doc)
        modules.append((rel, docs))
    return root, modules, skipped


def _local_file(path: Path) -> Text:
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DatasetError(f"dataset file {path} is not UTF-8 text ({err})") from err
    if path.suffix == ".jsonl":
        pieces = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                raise DatasetError(f"{path}:{lineno}: each line needs a string \"text\" field (found: {keys})")
            pieces.append(record["text"])
        text = "\n\n".join(pieces)
        source = f"{path} ({len(pieces)} JSONL records)"
    else:
        text = raw
        source = str(path)
    if not text.strip():
        raise DatasetError(f"dataset file {path} has no text")
    return Text(text, source)


def _hub_dataset(name: str, split: str) -> Text:
    hint = (
        f"dataset {name!r} is neither the built-in corpus ({BUILTIN_DATASET}) nor an existing "
        ".txt/.jsonl file"
    )
    try:
        import datasets
    except ModuleNotFoundError as err:
        raise DatasetError(
            f"{hint}; reading it from the Hugging Face hub needs the `datasets` package, which is not installed: "
            f"run `{HUB_DATASETS_INSTALL}`, or pass '{BUILTIN_DATASET}' or a .txt/.jsonl file"
        ) from err
    repo, config = _HUB_ALIASES.get(name, (name, None))
    if config is None and ":" in repo:
        repo, config = repo.split(":", 1)
    hub_split = "train" if split == "train" else "test"
    try:
        ds = datasets.load_dataset(repo, config, split=hub_split)
    except Exception as err:  # noqa: BLE001 - any hub/network failure becomes one clear message
        raise DatasetError(f"{hint}; loading it from the Hugging Face hub failed: {err}") from err
    if "text" not in ds.column_names:
        raise DatasetError(f"hub dataset {name!r} has no 'text' column (columns: {', '.join(ds.column_names)})")
    return Text("\n\n".join(ds["text"]), f"hub dataset {repo}" + (f"/{config}" if config else "") + f" [{hub_split}]")


def tokenize(tokenizer, text: Text, chunk_chars: int = 1 << 16) -> torch.Tensor:
    """All token ids of the text (no special tokens), as a 1-D int64 tensor.

    The text is encoded in pieces of about ``chunk_chars`` characters, cut
    after a newline, so a multi-megabyte corpus never holds a full encoding
    (offsets, token strings) in memory at once.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    ids: list[int] = []
    start = 0
    body = text.text
    while start < len(body):
        end = min(len(body), start + chunk_chars)
        if end < len(body):
            cut = body.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        piece = body[start:end]
        if backend is not None:
            # the fast tokenizer's own encoder: no "longer than model_max_length" warning
            ids.extend(backend.encode(piece, add_special_tokens=False).ids)
        else:
            ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
        start = end
    return torch.tensor(ids, dtype=torch.int64)


def calibration_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int, source: str = "") -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens (``[nsamples, seqlen]``), fixed by ``seed``."""
    total = tokens.numel()
    if total < seqlen + 1:
        raise DatasetError(
            f"the calibration text{' ' + source if source else ''} has {total} tokens, "
            f"fewer than one window of --seqlen {seqlen}; use a longer text or a smaller --seqlen"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, total - seqlen, (nsamples,), generator=gen)
    if nsamples * seqlen > total:
        logger.warning(
            f"calibration asks for {nsamples}x{seqlen} tokens but the text has {total}: windows overlap"
        )
    return torch.stack([tokens[s:s + seqlen] for s in starts.tolist()])


def eval_windows(tokens: torch.Tensor, nsamples: int, seqlen: int) -> torch.Tensor:
    """Up to ``nsamples`` consecutive non-overlapping windows from the start of the text."""
    available = tokens.numel() // seqlen
    if available == 0:
        raise DatasetError(
            f"the evaluation text has {tokens.numel()} tokens, fewer than one window of --seqlen {seqlen}"
        )
    n = min(nsamples, available)
    if n < nsamples:
        logger.warning(f"the evaluation text holds only {n} windows of {seqlen} tokens (asked for {nsamples})")
    return tokens[: n * seqlen].view(n, seqlen)
