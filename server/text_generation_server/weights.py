"""Read tensors, or this rank's slices of them, from safetensors files.

Slices are read through ``safe_open(...).get_slice(name)[...]`` so a shard
only ever materialises its own part of a tensor. Floating tensors are cast to
the serving dtype; integer tensors (packed quantized weights, indices) keep
their stored dtype. This module knows ranks, not models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open

if TYPE_CHECKING:
    from text_generation_server.distributed import Distributed


class CheckpointError(ValueError):
    """The checkpoint lacks a tensor or holds one of the wrong shape."""


def shard_range(size: int, world_size: int, rank: int, align: int = 1) -> tuple[int, int]:
    """This rank's ``[start, stop)`` of ``size`` items split as evenly as possible.

    Items move in units of ``align`` (e.g. a quantization group) so no unit
    straddles two ranks; earlier ranks take the remainder, so the last rank
    may hold less. A rank may get an empty range when there are fewer units
    than ranks.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    units = -(-size // align)
    base, extra = divmod(units, world_size)
    start_unit = rank * base + min(rank, extra)
    count = base + (1 if rank < extra else 0)
    start = min(size, start_unit * align)
    stop = min(size, (start_unit + count) * align)
    return start, stop


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, honouring a sharded index."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from e
        files = sorted({model_dir / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists files that do not exist: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"no .safetensors files in {model_dir}; the server loads safetensors checkpoints only"
        )
    return files


class Weights:
    """Tensor access over one or more safetensors files for one rank."""

    def __init__(
        self,
        files: list[Path],
        *,
        device: torch.device,
        dtype: torch.dtype,
        dist: Distributed,
    ) -> None:
        if not files:
            raise CheckpointError("no safetensors files given")
        self.files = [Path(f) for f in files]
        self.device = device
        self.dtype = dtype
        self.dist = dist
        self._handles: dict[Path, Any] = {}
        self._routing: dict[str, Path] = {}
        # Views: name -> (stored tensor, dim, segments), the concatenation of blocks
        # [start, stop) of a stored tensor along dim under a name of its own (the parts of a
        # fused projection, a renamed tensor); see split() and regroup().
        self._views: dict[str, tuple[str, int, list[tuple[int, int]]]] = {}
        self._order: list[str] = []
        for f in self.files:
            handle = self._handle(f)
            for name in handle.keys():
                if name not in self._routing:
                    self._order.append(name)
                self._routing.setdefault(name, f)

    def _handle(self, f: Path) -> Any:
        if f not in self._handles:
            try:
                self._handles[f] = safe_open(str(f), framework="pt", device="cpu")
            except (OSError, RuntimeError, SafetensorError) as e:
                # A corrupt or truncated file fails here, at its header, before any shard loads a tensor.
                raise CheckpointError(f"cannot read safetensors file {f}: {e}") from e
        return self._handles[f]

    def close(self) -> None:
        """Release the files' memory maps; the object must not be used afterwards."""
        self._handles.clear()

    def names(self) -> list[str]:
        """All tensor names in the checkpoint, in file order (a split tensor by its parts' names)."""
        return list(self._order)

    def has(self, name: str) -> bool:
        return name in self._order

    def split(self, name: str, dim: int, parts: list[tuple[str, int | None]]) -> None:
        """Present the stored tensor ``name`` as consecutive blocks along ``dim``, each under its
        own name: ``parts`` is ``[(new name, size), ...]`` and must cover the dim exactly, or give
        the size ``None`` for a part that is the whole tensor (shared by every part, e.g. a GPTQ
        g_idx). ``name`` itself is no longer listed."""
        shape = self._view_source_shape(name)
        sized = [size for _, size in parts if size is not None]
        if sized and sum(sized) != shape[dim]:
            raise CheckpointError(
                f"tensor '{name}' in {self.file_of(name).name} has size {shape[dim]} along dim {dim}, "
                f"expected the parts {sized} summing to {sum(sized)}"
            )
        offset = 0
        segments = []
        for part, size in parts:
            if size is None:
                segments.append((part, [(0, shape[dim])]))
            else:
                segments.append((part, [(offset, offset + size)]))
                offset += size
        self._add_views(name, dim, segments)

    def regroup(self, name: str, dim: int, parts: list[tuple[str, list[tuple[int, int]]]]) -> None:
        """Present the stored tensor ``name`` as parts gathered along ``dim``: each part, under
        its own name, is the concatenation of the blocks ``[start, stop)`` listed for it (the
        interleaved heads of a fused projection, e.g. Falcon's ``[q.., k, v]`` per KV group).
        The parts must cover the dim exactly once. ``name`` itself is no longer listed."""
        shape = self._view_source_shape(name)
        covered = sorted(seg for _, segments in parts for seg in segments)
        position = 0
        for start, stop in covered:
            if start != position or stop <= start:
                raise CheckpointError(
                    f"tensor '{name}' in {self.file_of(name).name}: its parts do not cover dim {dim} "
                    f"(size {shape[dim]}) exactly once at [{start}, {stop})"
                )
            position = stop
        if position != shape[dim]:
            raise CheckpointError(
                f"tensor '{name}' in {self.file_of(name).name} has size {shape[dim]} along dim {dim}, "
                f"its parts cover {position}"
            )
        self._add_views(name, dim, parts)

    def _view_source_shape(self, name: str) -> list[int]:
        if name in self._views:
            raise CheckpointError(f"tensor '{name}' is itself a view")
        return self.get_shape(name)

    def _add_views(self, name: str, dim: int, parts: list[tuple[str, list[tuple[int, int]]]]) -> None:
        position = self._order.index(name)
        for part, segments in parts:
            self._views[part] = (name, dim, list(segments))
        self._order[position : position + 1] = [part for part, _ in parts]

    def file_of(self, name: str) -> Path:
        """The file that holds ``name``; :class:`CheckpointError` when none does."""
        if name in self._views:
            return self.file_of(self._views[name][0])
        try:
            return self._routing[name]
        except KeyError:
            where = ", ".join(f.name for f in self.files)
            raise CheckpointError(
                f"tensor '{name}' not found in checkpoint {self.files[0].parent} (files: {where})"
            ) from None

    def get_shape(self, name: str) -> list[int]:
        if name in self._views:
            source, dim, segments = self._views[name]
            shape = self.get_shape(source)
            shape[dim] = sum(stop - start for start, stop in segments)
            return shape
        return list(self._handle(self.file_of(name)).get_slice(name).get_shape())

    def _finish(self, t: torch.Tensor, cast: bool) -> torch.Tensor:
        if cast and t.is_floating_point() and t.dtype != self.dtype:
            t = t.to(self.dtype)
        return t.to(self.device)

    def get_tensor(self, name: str, *, cast: bool = True) -> torch.Tensor:
        """The whole tensor (for replicated parameters such as norms)."""
        if name in self._views:
            return self.get_slices(name, {}, cast=cast)
        return self._finish(self._handle(self.file_of(name)).get_tensor(name), cast)

    def get_slices(
        self, name: str, ranges: dict[int, tuple[int, int]], *, cast: bool = True
    ) -> torch.Tensor:
        """The block ``[start, stop)`` along each listed dim, full along the others."""
        if name in self._views:
            source, vdim, segments = self._views[name]
            ndim = len(self.get_shape(source))
            vdim %= ndim
            size = sum(b - a for a, b in segments)
            shifted = {d % ndim: r for d, r in ranges.items()}
            start, stop = shifted.get(vdim, (0, size))
            if not 0 <= start <= stop <= size:
                raise CheckpointError(
                    f"tensor '{name}' (part of '{source}') has size {size} along dim {vdim}; "
                    f"cannot take [{start}, {stop})"
                )
            # The view's [start, stop) as blocks of the stored tensor, read and joined.
            pieces, offset = [], 0
            for a, b in segments:
                lo, hi = max(start, offset), min(stop, offset + b - a)
                if lo < hi or (start == stop and not pieces and lo == hi == start):
                    shifted[vdim] = (a + lo - offset, a + hi - offset)
                    pieces.append(self.get_slices(source, dict(shifted), cast=cast))
                offset += b - a
            return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=vdim)
        f = self.file_of(name)
        sl = self._handle(f).get_slice(name)
        shape = list(sl.get_shape())
        index = [slice(None)] * len(shape)
        for dim, (start, stop) in ranges.items():
            d = dim % len(shape) if shape else dim
            if not shape or not 0 <= start <= stop <= shape[d]:
                raise CheckpointError(
                    f"tensor '{name}' in {f.name} has shape {shape}; "
                    f"cannot take [{start}, {stop}) along dim {dim}"
                )
            index[d] = slice(start, stop)
        return self._finish(sl[tuple(index)], cast)

    def get_range(
        self, name: str, dim: int, start: int, stop: int, *, cast: bool = True
    ) -> torch.Tensor:
        """``[start, stop)`` along ``dim`` (any split, e.g. uneven head groups)."""
        return self.get_slices(name, {dim: (start, stop)}, cast=cast)

    def get_sharded(
        self, name: str, dim: int, *, align: int = 1, cast: bool = True
    ) -> torch.Tensor:
        """This rank's part of ``name`` split evenly along ``dim`` (see :func:`shard_range`)."""
        size = self.get_shape(name)[dim]
        start, stop = shard_range(size, self.dist.world_size, self.dist.rank, align)
        return self.get_range(name, dim, start, stop, cast=cast)

    def get_packed(
        self, name: str, dim: int, sizes: list[int], *, cast: bool = True
    ) -> torch.Tensor:
        """This rank's part of a tensor that stores several tensors back to back along ``dim``.

        Each part (of the given ``sizes``) is split evenly on its own and the
        rank's pieces are concatenated, as a fused projection needs.
        """
        total = self.get_shape(name)[dim]
        if sum(sizes) != total:
            raise CheckpointError(
                f"tensor '{name}' in {self.file_of(name).name} has size {total} along dim {dim}, "
                f"expected the parts {sizes} summing to {sum(sizes)}"
            )
        pieces = []
        offset = 0
        for size in sizes:
            start, stop = shard_range(size, self.dist.world_size, self.dist.rank)
            pieces.append(self.get_range(name, dim, offset + start, offset + stop, cast=cast))
            offset += size
        return torch.cat(pieces, dim=dim)
