"""The quantize / dequantize ops of converted graphs: ``torch.ops.lowbit.quantize_affine`` and friends.

A converted graph states its numerics with these ops, one idea of granularity for all of them: a
``block_size`` with one entry per dimension, where ``-1`` means the whole dimension (so a per-tensor
activation block is ``[-1, -1, -1]`` whatever the batch, a per-channel Linear weight ``[1, -1]``, a
per-group one ``[1, 32]``, a per-token activation ``[1, 1, -1]``). Scales and zero points hold one entry per
block (the block grid's shape, or any shape with as many elements, e.g. 0-d for a whole tensor). The ops
call lowbit's primitives, so a graph computes exactly what the eager flows compute; lowering
(:mod:`lowbit.export.lowering`) and ONNX export (:mod:`lowbit.export.onnx`) read the same arguments.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..kernels.ops import custom_op
from ..primitives.affine import choose_qparams, dequantize, quantize
from ..primitives.qtypes import get_qtype


def resolve_block_size(shape: Sequence[int], block_size: Sequence[int]) -> tuple[int, ...]:
    """``block_size`` with each ``-1`` replaced by the size of its dimension.

    Example:
        >>> resolve_block_size((2, 5, 8), [1, -1, -1])
        (1, 5, 8)
    """
    if len(block_size) != len(shape):
        raise ValueError(f"block_size needs one entry per dimension of shape {tuple(shape)}; received {list(block_size)}")
    return tuple(size if block == -1 else int(block) for size, block in zip(shape, block_size))


def block_grid(shape: Sequence[int], block_size: Sequence[int]) -> tuple[int, ...]:
    """The shape of the qparams of a tensor of ``shape``: its number of blocks along each dimension."""
    return tuple(size // block for size, block in zip(shape, resolve_block_size(shape, block_size)))


TRACING_HOOKS: list = []  # called when a compilation traces a Q/DQ op (lowering keeps its Inductor pass set)


def _traced() -> None:
    if torch.compiler.is_compiling():
        for hook in TRACING_HOOKS:
            hook()


def _on_grid(param: Optional[torch.Tensor], grid: tuple[int, ...]) -> Optional[torch.Tensor]:
    return None if param is None else param.reshape(grid)


@custom_op("lowbit::quantize_affine")
def quantize_affine(input: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor],
                    block_size: list[int], qtype: str) -> torch.Tensor:
    """Quantize ``input`` block-wise to ``qtype``'s storage dtype: round half to even, add the zero point,
    clamp; +/-inf saturate and NaN maps to the zero point (activations are not checked)."""
    grid = block_grid(input.shape, block_size)
    blocks = resolve_block_size(input.shape, block_size)
    q = quantize(input, _on_grid(scale, grid), _on_grid(zero_point, grid), blocks, qtype, saturate_nonfinite=True)
    return q.contiguous()  # what the fake states, whatever the input's layout (a conv's channels-last output)


@quantize_affine.register_fake
def _(input, scale, zero_point, block_size, qtype):
    _traced()
    return input.new_empty(input.shape, dtype=get_qtype(qtype).storage)


@custom_op("lowbit::dequantize_affine")
def dequantize_affine(input: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor],
                      block_size: list[int], output_dtype: torch.dtype) -> torch.Tensor:
    """``(input - zero_point) * scale`` block-wise, in ``output_dtype``."""
    grid = block_grid(input.shape, block_size)
    blocks = resolve_block_size(input.shape, block_size)
    return dequantize(input, _on_grid(scale, grid), _on_grid(zero_point, grid), blocks, output_dtype).contiguous()


@dequantize_affine.register_fake
def _(input, scale, zero_point, block_size, output_dtype):
    _traced()
    return input.new_empty(input.shape, dtype=output_dtype)


@custom_op("lowbit::choose_qparams_affine")
def choose_qparams_affine(input: torch.Tensor, block_size: list[int], qtype: str,
                          symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic quantization's per-call ``(scale, zero_point)`` on the block grid (float32 scale; the
    zero point in the qtype's storage dtype, all zeros when symmetric). NaN and inf are ignored."""
    blocks = resolve_block_size(input.shape, block_size)
    scale, zero_point = choose_qparams(input, blocks, qtype, symmetric=symmetric, ignore_nonfinite=True)
    if zero_point is None:
        zero_point = torch.zeros(scale.shape, dtype=get_qtype(qtype).storage, device=scale.device)
    return scale, zero_point


@choose_qparams_affine.register_fake
def _(input, block_size, qtype, symmetric):
    grid = block_grid(input.shape, block_size)
    return (input.new_empty(grid, dtype=torch.float32), input.new_empty(grid, dtype=get_qtype(qtype).storage))


QUANTIZE = torch.ops.lowbit.quantize_affine.default
DEQUANTIZE = torch.ops.lowbit.dequantize_affine.default
CHOOSE_QPARAMS = torch.ops.lowbit.choose_qparams_affine.default
