"""The fused int8 ops that lowering (:mod:`lowbit.export.lowering`) puts in place of Q/DQ patterns.

Each op takes the plain tensors of a converted graph (int8 weight values and scales, the activation's
qparams, the bias) and calls the kernel lowbit's eager flow calls for the same layer, through the same
registry: ``lowbit::qlinear_static`` computes what a :class:`~lowbit.StaticInt8` layer computes,
``lowbit::qlinear_dynamic`` what an :class:`~lowbit.Int8DynamicActivation` layer computes, bit for bit.
The weight is wrapped as an :class:`~lowbit.tensors.int8.Int8Tensor` (its values as given, never quantized
again) and packed for its kernel once, then cached per weight tensor (dropped with it, rebuilt when the
weight or its scale is changed in place). The ops are inference only (no gradient).

Under ``torch.autocast("cpu", torch.bfloat16)`` the ops cast their input to bf16 and the kernels return
bf16 (int8-mixed-bf16): the float parts of a lowered model run in bf16.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..kernels.boundary import forward_values
from ..kernels.ops import custom_op
from ..kernels.registry import select_kernel
from ..specs import ActivationQuant
from ..tensors.blockwise import with_packing
from ..tensors.int8 import Int8Tensor
from ..tensors.schemes import scheme_for
from .qdq import block_grid, resolve_block_size

_CONVS = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}  # by weight dims
_LAYOUTS = {3: torch.contiguous_format, 4: torch.channels_last, 5: torch.channels_last_3d}  # of conv results, by dims
POST_OPS = ("none", "relu")
_AUTOCAST = torch.library.Library("lowbit", "IMPL")  # the ops' AutocastCPU kernels


@dataclass
class _Packed:
    """A weight packed for its kernel and what it was packed from (weak references and versions: the cache keeps no
    weight alive; the weight's own tensor is handed back per call, not stored)."""

    weight: weakref.ref
    scale: weakref.ref
    versions: tuple[int, int]
    tensors: dict  # the kernel's tensors but the weight values themselves
    weight_names: tuple[str, ...]  # the kernel tensors that are the weight values
    meta: dict

    def serves(self, w_q: torch.Tensor, w_scale: torch.Tensor) -> bool:
        return self.weight() is w_q and self.scale() is w_scale and self.versions == (_version(w_q), _version(w_scale))

    def kernel_tensors(self, w_q: torch.Tensor) -> dict:
        return {**self.tensors, **{name: w_q for name in self.weight_names}}


def _version(t: torch.Tensor) -> int:
    """In-place changes so far; inference tensors (frozen constants under ``torch.inference_mode``) keep no count
    and cannot change outside inference mode."""
    return -1 if t.is_inference() else t._version


_PACKED: dict[tuple, _Packed] = {}  # (id(w_q), scheme, activation, groups) -> packed weight


def packed_weight(w_q: torch.Tensor, w_scale: torch.Tensor, w_block: list[int], scheme: str, activation: ActivationQuant,
                  groups: Optional[int] = None) -> tuple[dict, dict]:
    """The kernel tensors and metadata of the int8 weight ``w_q`` with ``w_scale`` per block (``groups`` set for a
    convolution's weight), packed for the ``scheme`` kernel that takes ``activation``: built once per weight."""
    key = (id(w_q), scheme, activation, groups)
    entry = _PACKED.get(key)
    if entry is not None and entry.serves(w_q, w_scale):
        return entry.kernel_tensors(w_q), entry.meta
    if w_q.dtype != torch.int8:
        raise TypeError(f"lowbit's fused int8 ops take int8 weight values; received {w_q.dtype}")
    scale = w_scale.float().reshape(block_grid(w_q.shape, w_block)).clone()  # no reference to w_scale either
    weight = Int8Tensor(qdata=w_q, scale=scale, zero_point=None, qtype="int8", block_size=resolve_block_size(w_q.shape, w_block),
                        packed_dim=None, kernel="auto", groups=groups, shape=w_q.shape, dtype=torch.float32)
    tensors, meta = with_packing(weight, scheme, activation).kernel_inputs()
    if entry is None:  # the first entry for this tensor: dropped with it
        weakref.finalize(w_q, _PACKED.pop, key, None)
    names = tuple(name for name, t in tensors.items() if t is w_q)
    entry = _PACKED[key] = _Packed(weakref.ref(w_q), weakref.ref(w_scale), (_version(w_q), _version(w_scale)),
                                   {n: t for n, t in tensors.items() if n not in names}, names, {**meta, "activation": activation})
    return entry.kernel_tensors(w_q), entry.meta


def _run(op: str, scheme: str, x: torch.Tensor, tensors: dict, meta: dict, bias: Optional[torch.Tensor]) -> torch.Tensor:
    kernel = select_kernel(op, scheme, x.device.type, "auto", meta)
    return forward_values(kernel, x, tensors, meta, bias)


def _static_tensors(tensors: dict, x_scale, x_zero_point, smooth) -> dict:
    extra = {"act_scale": x_scale, "act_zero_point": x_zero_point, "act_smooth": smooth}
    return {**tensors, **{name: t for name, t in extra.items() if t is not None}}


def _static_activation(x_zero_point) -> ActivationQuant:
    return ActivationQuant("int8", "per_tensor", symmetric=x_zero_point is None)


@custom_op("lowbit::qlinear_static")
def qlinear_static(x: torch.Tensor, x_scale: torch.Tensor, x_zero_point: Optional[torch.Tensor],
                   smooth: Optional[torch.Tensor], w_q: torch.Tensor, w_scale: torch.Tensor, w_block: list[int],
                   bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``linear(dequantize(quantize(x / smooth)), dequantize(w_q), bias)`` as lowbit's static int8 kernel runs it:
    ``x`` divided by ``smooth`` (K,) and quantized with the 0-d ``x_scale`` / ``x_zero_point`` (None: symmetric)
    inside the kernel's input pass, int8 GEMM, scales and bias fused in its epilogue; float32 or bf16 like ``x``."""
    scheme, activation = scheme_for("int8", "static").name, _static_activation(x_zero_point)
    tensors, meta = packed_weight(w_q, w_scale, w_block, scheme, activation)
    return _run("linear", scheme, x, _static_tensors(tensors, x_scale, x_zero_point, smooth), meta, bias)


@qlinear_static.register_fake
def _(x, x_scale, x_zero_point, smooth, w_q, w_scale, w_block, bias):
    return x.new_empty(*x.shape[:-1], w_q.shape[0])


@custom_op("lowbit::qlinear_dynamic")
def qlinear_dynamic(x: torch.Tensor, granularity: str, symmetric: bool, w_q: torch.Tensor, w_scale: torch.Tensor,
                    w_block: list[int], bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``linear`` of ``x`` quantized per call (``granularity`` ``"per_token"`` or ``"per_tensor"``, ``symmetric``
    or with a zero point) and the int8 weight, as lowbit's dynamic int8 kernel runs it (fused quantization and
    epilogue with the bias); float32 or bf16 like ``x``."""
    scheme, activation = scheme_for("int8", "dynamic").name, ActivationQuant("int8", granularity, symmetric)
    tensors, meta = packed_weight(w_q, w_scale, w_block, scheme, activation)
    return _run("linear", scheme, x, tensors, meta, bias)


@qlinear_dynamic.register_fake
def _(x, granularity, symmetric, w_q, w_scale, w_block, bias):
    return x.new_empty(*x.shape[:-1], w_q.shape[0])


@custom_op("lowbit::qconv_static")
def qconv_static(x: torch.Tensor, x_scale: torch.Tensor, x_zero_point: Optional[torch.Tensor], w_q: torch.Tensor,
                 w_scale: torch.Tensor, w_block: list[int], bias: Optional[torch.Tensor], stride: list[int],
                 padding: list[int], dilation: list[int], groups: int, other: Optional[torch.Tensor],
                 post_op: str) -> torch.Tensor:
    """``post_op(conv(dequantize(quantize(x)), dequantize(w_q), bias, ...) + other)``: the static int8 convolution
    lowbit's eager flow runs (input quantization fused, prepacked oneDNN conv, bias in its epilogue); the residual
    ``other`` (None: none) and ``post_op`` (``"none"`` / ``"relu"``) are applied in place on its output (the
    kernel's oneDNN call takes no post-op). Batched input only; the result is channels-last."""
    if post_op not in POST_OPS:
        raise ValueError(f"qconv_static post_op must be one of {POST_OPS}; received {post_op!r}")
    scheme, activation = scheme_for("int8", "static").name, _static_activation(x_zero_point)
    tensors, meta = packed_weight(w_q, w_scale, w_block, scheme, activation, groups)
    conv = (_CONVS[w_q.dim()], (stride, padding, dilation, groups), {})
    out = _run("conv", scheme, x, _static_tensors(tensors, x_scale, x_zero_point, None), {**meta, "conv": conv}, bias)
    out = out.contiguous(memory_format=_LAYOUTS[x.dim()])  # the layout the fake states (oneDNN's: no copy)
    if other is not None:
        if torch.broadcast_shapes(out.shape, other.shape) != out.shape:
            raise ValueError(f"qconv_static adds its residual in place: expected one that broadcasts to the output "
                             f"{tuple(out.shape)}; received {tuple(other.shape)}")
        out.add_(other)
    return out.relu_() if post_op == "relu" else out


@qconv_static.register_fake
def _(x, x_scale, x_zero_point, w_q, w_scale, w_block, bias, stride, padding, dilation, groups, other, post_op):
    y = _CONVS[w_q.dim()](x, w_q.new_empty(w_q.shape, dtype=x.dtype), None, stride, padding, dilation, groups)
    return y.contiguous(memory_format=_LAYOUTS[x.dim()])


def _autocast_kernel(op):
    """``op`` with its input cast to the autocast dtype when that is bf16 (the kernels return bf16 for it); the
    scales, weights and bias stay as they are."""

    def kernel(x, *args):
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)):
            if torch.get_autocast_dtype("cpu") == torch.bfloat16 and x.is_floating_point():
                x = x.to(torch.bfloat16)
            return op(x, *args)

    return kernel


for _op in (torch.ops.lowbit.qlinear_static, torch.ops.lowbit.qlinear_dynamic, torch.ops.lowbit.qconv_static):
    _AUTOCAST.impl(_op._qualified_op_name.split("::")[1], _autocast_kernel(_op.default), "AutocastCPU")

QLINEAR_STATIC = torch.ops.lowbit.qlinear_static.default
QLINEAR_DYNAMIC = torch.ops.lowbit.qlinear_dynamic.default
QCONV_STATIC = torch.ops.lowbit.qconv_static.default
