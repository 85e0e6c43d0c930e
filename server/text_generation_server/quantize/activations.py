"""Calibration activations between and inside layers: in memory up to a budget, on disk beyond it.

The calibration set's hidden states (``--nsamples`` x ``--seqlen`` x hidden size,
float32) are carried from layer to layer, and a layer holds two or three such
sets at once (its input, the attention's output, the residual). For a wide
model and long windows they exceed the host's memory, so each batch of them
lives in an :class:`ActivationList` backed by one :class:`ActivationStore`:
CPU tensors stay in memory while the store's resident bytes are within its
budget, and beyond it are written to a file (safetensors, exact) and read back
on each use. Tensors on a GPU are never spilled (they are the device's working
set for the layer). Dropping an item (``items[i] = None``, :meth:`release`)
returns its memory or removes its file.
"""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


@dataclass
class _Item:
    """One batch: its tensor in memory, or the file (and key) holding it."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    tensor: torch.Tensor | None = None
    path: Path | None = None
    key: str = "t"
    owned: bool = True  # a spill file of ours (removed when dropped), not a progress file

    def load(self) -> torch.Tensor:
        if self.tensor is not None:
            return self.tensor
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(self.key)


class ActivationStore:
    """The budget (bytes of CPU activations kept in memory) and the directory for the rest."""

    def __init__(self, budget_bytes: int, directory: Path) -> None:
        self.budget = max(0, int(budget_bytes))
        self.dir = Path(directory)
        self.resident = 0
        self.spilled_bytes = 0  # currently on disk
        self.spilled_total = 0  # ever written (for the log)
        self._names = itertools.count()

    def list(self, tensors: Iterable[torch.Tensor] = ()) -> ActivationList:
        items = ActivationList(self)
        for t in tensors:
            items.append(t)
        return items

    def from_file(self, path: Path) -> ActivationList:
        """The batches saved by :meth:`ActivationList.save` (read from the file when used)."""
        items = ActivationList(self)
        with safe_open(str(path), framework="pt") as f:
            for key in sorted(f.keys()):
                view = f.get_slice(key)
                dtype = _DTYPES[view.get_dtype()]
                shape = tuple(view.get_shape())
                nbytes = _nbytes(dtype, shape)
                items._items.append(_Item(dtype, shape, nbytes, path=Path(path), key=key, owned=False))
        return items

    def _put(self, tensor: torch.Tensor) -> _Item:
        nbytes = tensor.numel() * tensor.element_size()
        item = _Item(tensor.dtype, tuple(tensor.shape), nbytes)
        if tensor.device.type != "cpu" or self.resident + nbytes <= self.budget:
            item.tensor = tensor
            if tensor.device.type == "cpu":
                self.resident += nbytes
            return item
        self.dir.mkdir(parents=True, exist_ok=True)
        item.path = self.dir / f"batch-{next(self._names):06d}.safetensors"
        save_file({"t": tensor.contiguous()}, str(item.path))
        self.spilled_bytes += nbytes
        self.spilled_total += nbytes
        return item

    def _drop(self, item: _Item | None) -> None:
        if item is None:
            return
        if item.tensor is not None:
            if item.tensor.device.type == "cpu":
                self.resident -= item.nbytes
            item.tensor = None
        elif item.owned and item.path is not None:
            item.path.unlink(missing_ok=True)
            self.spilled_bytes -= item.nbytes
            item.path = None

    def clear_directory(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class ActivationList:
    """A list of batch tensors (or None for batches already consumed) held by a store."""

    def __init__(self, store: ActivationStore) -> None:
        self._store = store
        self._items: list[_Item | None] = []

    def append(self, tensor: torch.Tensor) -> None:
        self._items.append(self._store._put(tensor))

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> torch.Tensor | None:
        item = self._items[index]
        return None if item is None else item.load()

    def __setitem__(self, index: int, value: torch.Tensor | None) -> None:
        self._store._drop(self._items[index])
        self._items[index] = None if value is None else self._store._put(value)

    def __iter__(self) -> Iterator[torch.Tensor | None]:
        for index in range(len(self._items)):
            yield self[index]

    def new(self) -> ActivationList:
        """An empty list in the same store."""
        return ActivationList(self._store)

    def numel(self) -> int:
        """Elements in the batches still held (from their shapes; nothing is read)."""
        total = 0
        for item in self._items:
            if item is not None:
                n = 1
                for d in item.shape:
                    n *= d
                total += n
        return total

    def map(self, fn) -> ActivationList:
        """A new list of ``fn(batch)``, this one released batch by batch as it goes."""
        out = ActivationList(self._store)
        for index in range(len(self._items)):
            out.append(fn(self[index]))
            self[index] = None
        return out

    def release(self) -> None:
        for index in range(len(self._items)):
            self[index] = None

    def save(self, path: Path) -> None:
        """Every batch into one safetensors file, streamed one batch at a time."""
        from text_generation_server.quantize.writer import PendingTensor, save_streaming

        save_streaming(path, {
            f"{i:06d}": PendingTensor(item.dtype, item.shape, item.load)
            for i, item in enumerate(self._items) if item is not None
        })  # fmt: skip

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to return
            pass


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def default_budget_bytes() -> int:
    """Half the memory available when the run starts (``MemAvailable``), 4 GiB where it is unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return 4 << 30
