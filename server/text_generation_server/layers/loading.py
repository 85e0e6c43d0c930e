"""Parameter metadata and the shape checks every weight loader shares.

A parameter carries, as plain attributes:

- ``weight_loader(param, weights, name, shard_id)``: copies this rank's part
  of checkpoint tensor ``name`` into ``param``;
- ``shard_ids``: the checkpoint parts that fill it (``(None,)`` for a plain
  tensor, ``("q", "k", "v")`` for a fused projection), so the model loader can
  name any part the checkpoint lacks;
- ``checkpoint_shapes``: the full checkpoint shape expected for each part.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import torch

from text_generation_server.weights import CheckpointError, Weights


def set_weight_attrs(param: torch.Tensor, **attrs: Any) -> None:
    """Attach loading metadata to a parameter."""
    for key, value in attrs.items():
        setattr(param, key, value)


def expected_checkpoint_shape(param: torch.Tensor, shard_id: Hashable = None) -> list[int]:
    """The full checkpoint shape ``param`` expects for part ``shard_id``."""
    shapes = getattr(param, "checkpoint_shapes", None)
    if shapes is None:
        return list(param.shape)
    return list(shapes[shard_id])


def check_checkpoint_tensor(
    param: torch.Tensor, weights: Weights, name: str, shard_id: Hashable = None
) -> None:
    """Raise :class:`CheckpointError` when ``name`` has the wrong shape or kind for ``param``."""
    expected = expected_checkpoint_shape(param, shard_id)
    got = weights.get_shape(name)
    if got != expected:
        raise CheckpointError(
            f"tensor '{name}' in {weights.file_of(name).name} has shape {got}, expected {expected}"
        )


def replicated_weight_loader(
    param: torch.Tensor, weights: Weights, name: str, shard_id: Hashable = None
) -> None:
    """Load the whole tensor (norm weights, biases of row-parallel layers)."""
    check_checkpoint_tensor(param, weights, name, shard_id)
    tensor = weights.get_tensor(name, cast=False)
    copy_checked(param.data, tensor, name)


def copy_checked(dest: torch.Tensor, src: torch.Tensor, name: str) -> None:
    """Copy ``src`` into ``dest``, refusing float/integer mix-ups that a cast would hide."""
    if dest.is_floating_point() != src.is_floating_point():
        raise CheckpointError(
            f"tensor '{name}' has dtype {src.dtype}, expected a {dest.dtype} tensor"
        )
    if dest.shape != src.shape:
        raise CheckpointError(
            f"tensor '{name}': slice of shape {list(src.shape)} does not fit {list(dest.shape)}"
        )
    dest.copy_(src)
