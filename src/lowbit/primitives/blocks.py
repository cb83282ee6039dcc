"""Granularity as one idea: a ``block_size`` tuple, one block extent per dimension.

For a weight of shape (N, K): per-tensor is ``(N, K)``, per-channel (axis 0) is ``(1, K)``,
per-group is ``(1, group_size)``; for activations (..., K) per-token is ``(1, ..., 1, K)``.
Scale and zero-point tensors keep the input's rank, with ``shape[i] // block_size[i]`` entries
along dimension i, so they broadcast block-wise without reshapes by the caller.
"""

from __future__ import annotations

from typing import Sequence

import torch


def check_block_size(shape: Sequence[int], block_size: Sequence[int]) -> tuple[int, ...]:
    """Validate that ``block_size`` tiles ``shape`` exactly; return it as a tuple.

    Example:
        >>> check_block_size((4, 8), (1, 4))
        (1, 4)
    """
    shape, block_size = tuple(shape), tuple(int(b) for b in block_size)
    if len(block_size) != len(shape):
        raise ValueError(f"block_size needs one entry per dimension of shape {shape}; received {block_size}")
    for dim, (size, block) in enumerate(zip(shape, block_size)):
        if block < 1 or size % block:
            raise ValueError(
                f"block size {block} along dim {dim} must be positive and divide the size {size} "
                f"(shape {shape}, block_size {block_size})"
            )
    return block_size


def per_axis_block(shape: Sequence[int], axis: int) -> tuple[int, ...]:
    """Block size giving one scale per index along ``axis`` (per-channel, per-token, per-row)."""
    axis = axis % len(shape)
    return tuple(1 if d == axis else s for d, s in enumerate(shape))


def per_group_block(shape: Sequence[int], group_size: int) -> tuple[int, ...]:
    """Block size of ``group_size`` consecutive elements along the last (reduction) dimension."""
    if group_size < 1 or shape[-1] % group_size:
        raise ValueError(
            f"group_size must divide the last dimension {shape[-1]} of shape {tuple(shape)}; received {group_size}"
        )
    return (1,) * (len(shape) - 1) + (group_size,)


def per_token_block(shape: Sequence[int]) -> tuple[int, ...]:
    """Block size giving one scale per row of the last dimension (per-token for activations)."""
    return (1,) * (len(shape) - 1) + (shape[-1],)


def to_blocks(x: torch.Tensor, block_size: Sequence[int]) -> torch.Tensor:
    """View x of shape (d0, d1, ...) as (d0/b0, b0, d1/b1, b1, ...)."""
    split = []
    for size, block in zip(x.shape, block_size):
        split += [size // block, block]
    return x.reshape(split)


def block_dims(ndim: int) -> tuple[int, ...]:
    """The within-block dimensions of a :func:`to_blocks` view (the odd ones)."""
    return tuple(range(1, 2 * ndim, 2))


def expand_params(p: torch.Tensor) -> torch.Tensor:
    """Scale/zero-point (d0/b0, d1/b1, ...) -> (d0/b0, 1, d1/b1, 1, ...) to broadcast over blocks."""
    for dim in range(p.dim(), 0, -1):
        p = p.unsqueeze(dim)
    return p
