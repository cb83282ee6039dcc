"""Block-quantized tensors and the ops they share: int8, int4 (packed) and float8 build on this.

Layout (documented ranks): ``qdata`` has the outer shape, halved along ``packed_dim`` for 4-bit
types; ``scale`` and ``zero_point`` have ``shape[i] // block_size[i]`` entries along each
dimension i, so they keep the rank of the tensor. Weights of Linear/Embedding are (N, K) with
blocks along K, the reduction dim.
"""

from __future__ import annotations

import math
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F

from ..kernels.boundary import call_kernel
from ..kernels.registry import select_kernel, unpacked
from ..primitives.affine import check_finite, quantize, quantize_weight
from ..primitives.fake_quantize import dequantize_weight
from ..primitives.hqq import hqq_qparams
from ..primitives.packing import pack_bits
from ..primitives.qtypes import get_qtype
from ..specs import WeightSpec
from .base import QuantizedTensor, return_view

aten = torch.ops.aten
PACKED_NAMES = ("packed", "packed_aux")  # a kernel's own layout, made by its pack() at quantize time


class BlockQuantizedTensor(QuantizedTensor):
    """Values quantized in blocks, one scale (and optional integer zero point) per block."""

    tensor_names = ("qdata", "scale")
    optional_tensor_names = ("zero_point",) + PACKED_NAMES
    meta_names = ("qtype", "block_size", "packed_dim", "kernel", "groups", "packed_for", "packed_transposed")
    # a conv weight's groups; (scheme, kernel name) the packed fields serve; True when they serve this tensor's transpose
    # (a weight applied as ``x @ W``, such as transformers' Conv1D: see :func:`transposed`)
    optional_meta_names = ("groups", "packed_for", "packed_transposed")
    scheme: ClassVar[str] = "block"
    packed_names: ClassVar[tuple[str, ...]] = PACKED_NAMES  # fields made by a kernel's pack(), never stored
    replaceable_names = ("qdata",)  # a kernel whose layout holds the values drops the canonical qdata at run time

    @classmethod
    def from_spec(cls, w: torch.Tensor, spec: WeightSpec, block_size: Sequence[int], *, kernel: str = "auto",
                  name: str = "weight", groups: int | None = None, qparams=None) -> "BlockQuantizedTensor":
        """Quantize ``w`` in blocks of ``block_size`` as ``spec`` says (sub-byte values packed along the last dim);
        ``groups`` is set for a convolution's weight (its kernels pack by it). ``qparams`` = ``(scale, zero_point)``
        given (e.g. learned by QAT) replace the spec's own choice: min/max, or HQQ's fit for ``algorithm="hqq"``."""
        if qparams is None and spec.algorithm == "hqq":
            qparams = hqq_qparams(w, block_size, spec.qtype, symmetric=spec.symmetric, name=name)
        if qparams is None:
            q, scale, zero_point = quantize_weight(w, block_size, spec.qtype, symmetric=spec.symmetric, name=name)
        else:
            check_finite(w, name)
            scale, zero_point = qparams
            q = quantize(w, scale, zero_point, block_size, spec.qtype)
        qt = get_qtype(spec.qtype)
        return cls(
            qdata=pack_bits(q, qt.bits, dim=-1) if qt.packed else q, scale=scale, zero_point=zero_point, qtype=qt.name,
            block_size=tuple(block_size), packed_dim=w.dim() - 1 if qt.packed else None, kernel=kernel, groups=groups,
            shape=w.shape, dtype=w.dtype,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        canonical = self.canonical()
        return dequantize_weight(canonical.fields(), canonical.meta, dtype or self.dtype)

    def canonical(self) -> "BlockQuantizedTensor":
        """The same tensor without kernel-packed fields (what views and files carry); a ``qdata`` the packing kernel
        dropped is rebuilt from its layout."""
        if all(getattr(self, n) is None for n in PACKED_NAMES):
            return self
        qdata = self.qdata
        if qdata is None:
            qdata = unpacked(self.fields(), self.meta)["qdata"]
            qdata = qdata.t() if self.packed_transposed else qdata  # the packed layout serves the transpose
        return self.rebuild(**{n: None for n in PACKED_NAMES}, qdata=qdata, packed_for=None, packed_transposed=None)

    def copied(self, fn) -> "BlockQuantizedTensor":
        """``fn`` applied to the canonical inner tensors, then packed again for the same kernel (kernel
        layouts such as oneDNN's opaque weights cannot be copied, moved or pickled themselves)."""
        if self.packed_for is None:
            return self.map_tensors(fn)
        if self.packed_transposed:
            return transposed(transposed(self, 0, 1).copied(fn), 0, 1)
        return with_packing(self.canonical().map_tensors(fn), self.packed_for[0])  # the kernel is chosen where it lands

    def __reduce_ex__(self, protocol):
        if self.packed_for is None:
            return super().__reduce_ex__(protocol)
        return _unpickle_packed, (self.canonical(), self.packed_for, self.extra_state())


    def kernel_inputs(self) -> tuple[dict, dict]:
        """Plain tensors and metadata handed to kernels (packed fields only where they serve this orientation)."""
        if self.packed_transposed:
            return self.canonical().kernel_inputs()
        return self.fields(), self.meta

    def storage_bytes(self) -> int:
        """Bytes held by the inner tensors, packed layouts included."""
        return sum(t.numel() * t.element_size() for t in self.fields().values())


def run_kernel(op: str, weight: QuantizedTensor, x: torch.Tensor, bias=None, preference: str | None = None, **call_meta):
    """Call the kernel chosen for ``weight`` on ``x``'s device through the registry; ``call_meta``
    (e.g. a convolution's arguments) is added to the metadata the kernel receives."""
    tensors, meta = weight.kernel_inputs()
    meta = {**meta, **call_meta} if call_meta else meta
    kernel = select_kernel(op, weight.scheme, x.device.type, preference or weight.kernel, meta)
    return call_kernel(kernel, x, tensors, meta, bias)


def with_packing(weight: BlockQuantizedTensor, scheme: str | None = None, activation=None,
                 kernel: str | None = None) -> BlockQuantizedTensor:
    """Attach the packed layout of the kernel chosen for ``weight`` (once, not per call); ``packed_for`` records
    the scheme and the kernel name it serves.

    ``scheme`` overrides the weight's own (an activation wrapper packs its inner weight for its own kernel, whose
    choice depends on its ``activation`` quantization); ``kernel`` overrides the weight's preference (a copy is
    packed for the kernel its original was).
    """
    canonical, scheme = weight.canonical(), scheme or weight.scheme
    if applied_transposed(weight):  # pack the linear weight W^T it serves, in a contiguous layout for the kernels
        linear = transposed(canonical, 0, 1).map_tensors(torch.Tensor.contiguous)
        return transposed(with_packing(linear, scheme, activation, kernel), 0, 1)
    op = "linear" if weight.groups is None else "conv"
    meta = canonical.meta if activation is None else {**canonical.meta, "activation": activation}
    chosen = select_kernel(op, scheme, weight.device.type, kernel or weight.kernel, meta)
    if chosen.pack is None:
        return canonical
    return canonical.rebuild(**chosen.pack(canonical.fields(), canonical.meta), packed_for=(scheme, chosen.name))


def applied_transposed(weight: BlockQuantizedTensor) -> bool:
    """Whether ``weight`` serves a linear as ``x @ W`` (transformers' Conv1D stores (in, out)): its packed fields
    say so, or, for a canonical tensor, its blocks run along dim 0 (one scale per column or per column group)."""
    if weight.packed_transposed:
        return True
    block = weight.block_size
    return weight.dim() == 2 and weight.groups is None and block[1] == 1 < block[0]


def _unpickle_packed(canonical: BlockQuantizedTensor, packed_for: tuple[str, str], extra: dict) -> BlockQuantizedTensor:
    new = with_packing(canonical, packed_for[0])  # packed for the kernel chosen on the unpickling machine
    new.__dict__.update(extra)
    return new


def _dim(t: torch.Tensor, dim: int) -> int:
    return dim % t.dim()


@BlockQuantizedTensor.implements([aten.detach.default, aten.alias.default])
def _detach(func, args, kwargs):
    return return_view(func, args, kwargs, args[0].map_tensors(func))


@BlockQuantizedTensor.implements(aten.clone.default)
def _clone(func, args, kwargs):
    return args[0].map_tensors(torch.clone)


@BlockQuantizedTensor.implements(aten._to_copy.default)
def _to_copy(func, args, kwargs):
    self = args[0]
    dtype = kwargs.get("dtype") or self.dtype
    if not dtype.is_floating_point:
        raise ValueError(f"{type(self).__name__} converts only to float dtypes; received {dtype}")
    device = kwargs.get("device")
    if device is None or torch.device(device) == self.device:
        return self.map_tensors(torch.clone, dtype=dtype)
    return self.rebuild(dtype=dtype).copied(lambda t: t.to(device))


@BlockQuantizedTensor.implements(aten.copy_.default)
def _copy_(func, args, kwargs):
    dst, src = args[0], args[1]
    keys = ("qtype", "block_size", "packed_dim", "shape")
    same = type(src) is type(dst) and all(src.meta[k] == dst.meta[k] for k in keys)
    if not same or set(src.canonical().fields()) != set(dst.canonical().fields()):
        received = src.meta if isinstance(src, QuantizedTensor) else f"a plain {src.dtype} tensor"
        raise ValueError(
            f"cannot copy into {type(dst).__name__} {dst.meta}: expected the same class, qtype, block_size "
            f"and shape (a state dict from a model quantized with the same config); received {received}"
        )
    source = src.canonical()
    for name, t in dst.fields().items():  # dst's canonical tensors (its qdata only when its kernel kept it)
        if name not in PACKED_NAMES:
            t.copy_(getattr(source, name))
    wanted = [n for n in PACKED_NAMES if getattr(dst, n) is not None]
    if src.packed_for != dst.packed_for or src.packed_transposed != dst.packed_transposed:  # the layout dst's kernel reads
        scheme, kernel = dst.packed_for
        src = with_packing(source, scheme, kernel=kernel)
    for name in wanted:
        if getattr(src, name) is not None:
            getattr(dst, name).copy_(getattr(src, name))
    return dst


def transposed(self: BlockQuantizedTensor, dim0: int, dim1: int) -> BlockQuantizedTensor:
    """Swap two dims of every inner tensor (a strided view, also for packed 4-bit data).

    A 2-D weight's kernel-packed fields serve the one linear op of W and W^T, so they stay, with
    ``packed_transposed`` saying which orientation they serve (``x @ W.t()`` and a Conv1D's ``x @ W``
    keep the fast path)."""
    d0, d1 = _dim(self, dim0), _dim(self, dim1)
    swap = {d0: d1, d1: d0}
    order = [swap.get(d, d) for d in range(self.dim())]
    packed = self.packed_dim
    keeps_packing = self.packed_for is not None and self.dim() == 2 and d0 != d1
    source = self if keeps_packing else self.canonical()
    plain = {n: t.transpose(d0, d1) for n, t in source.fields().items() if n not in PACKED_NAMES}
    out = source.rebuild(
        **plain,
        shape=[self.shape[d] for d in order],
        block_size=tuple(self.block_size[d] for d in order),
        packed_dim=None if packed is None else swap.get(packed, packed),
    )
    if not keeps_packing:
        return out
    return out.rebuild(packed_transposed=None if self.packed_transposed else True)


@BlockQuantizedTensor.implements(aten.t.default)
def _t(func, args, kwargs):
    return return_view(func, args, kwargs, transposed(args[0], 0, 1))


@BlockQuantizedTensor.implements(aten.transpose.int)
def _transpose(func, args, kwargs):
    return return_view(func, args, kwargs, transposed(*args))


@BlockQuantizedTensor.implements([aten.view.default, aten._unsafe_view.default, aten.reshape.default])
def _view(func, args, kwargs):
    self, size = args[0].canonical(), list(args[1])
    if -1 in size:
        known = math.prod(s for s in size if s != -1)
        size[size.index(-1)] = self.numel() // max(known, 1)
    per_tensor = all(s == 1 for s in self.scale.shape)
    leading_only = size[-1] == self.shape[-1] and all(b == 1 for b in self.block_size[:-1])
    packed_last = self.packed_dim in (None, self.dim() - 1)
    if per_tensor and self.packed_dim is None:
        params = {n: t.reshape([1] * len(size)) for n, t in self.fields().items() if n != "qdata"}
        out = self.rebuild(**params, qdata=self.qdata.reshape(size), shape=size, block_size=tuple(size))
    elif leading_only and packed_last:
        out = self.map_tensors(
            lambda t: t.reshape(size[:-1] + [t.shape[-1]]),
            shape=size,
            block_size=(1,) * (len(size) - 1) + (self.block_size[-1],),
            packed_dim=None if self.packed_dim is None else len(size) - 1,
        )
    else:
        raise NotImplementedError(
            f"{type(self).__name__} with block_size {self.block_size} cannot be viewed as {tuple(size)} from "
            f"{tuple(self.shape)}: only leading dims with one scale per index may be reshaped; call .dequantize() first"
        )
    return return_view(func, args, kwargs, out)


def sliced(self: BlockQuantizedTensor, dim: int, start: int | None, end: int | None) -> BlockQuantizedTensor:
    """Slice along ``dim``; ``start`` and ``end`` must fall on block boundaries."""
    self = self.canonical()
    dim = _dim(self, dim)
    size, block = self.shape[dim], self.block_size[dim]
    start = 0 if start is None else (start + size if start < 0 else start)
    end = size if end is None else min(end + size if end < 0 else end, size)
    start = min(start, end)
    whole = block == size  # one block along dim: any cut keeps every element's scale
    if whole and dim != self.packed_dim:
        block_size = list(self.block_size)
        block_size[dim] = max(end - start, 1)
        index = [slice(None)] * self.dim()
        index[dim] = slice(start, end)
        shape = list(self.shape)
        shape[dim] = end - start
        return self.rebuild(qdata=self.qdata[tuple(index)], shape=shape, block_size=tuple(block_size))
    if start % block or (end % block and end != size):
        raise NotImplementedError(
            f"{type(self).__name__} can be sliced along dim {dim} only at multiples of its block size {block}; "
            f"received [{start}:{end}]"
        )
    index = [slice(None)] * self.dim()

    def cut(t: torch.Tensor, num: int, den: int) -> torch.Tensor:
        """Entries [start * num / den, ceil(end * num / den)) of t along dim (num / den entries per element)."""
        index[dim] = slice(start * num // den, -(-end * num // den))
        return t[tuple(index)]

    fields = {n: cut(t, 1, block) for n, t in self.fields().items() if n != "qdata"}
    fields["qdata"] = cut(self.qdata, get_qtype(self.qtype).bits, 8) if dim == self.packed_dim else cut(self.qdata, 1, 1)
    shape = list(self.shape)
    shape[dim] = end - start
    return self.rebuild(**fields, shape=shape)


@BlockQuantizedTensor.implements(aten.slice.Tensor)
def _slice(func, args, kwargs):
    self = args[0]
    params = {"dim": 0, "start": None, "end": None, "step": 1, **dict(zip(("dim", "start", "end", "step"), args[1:])), **kwargs}
    dim, start, end, step = params["dim"], params["start"], params["end"], params["step"]
    if step != 1:
        raise NotImplementedError(f"{type(self).__name__} supports slicing with step 1 only; received step {step}")
    return return_view(func, args, kwargs, sliced(self, dim, start, end))


def split_sizes(size: int, split_size: int) -> list[int]:
    return [min(split_size, size - i) for i in range(0, size, split_size)]


@BlockQuantizedTensor.implements([aten.split.Tensor, aten.split_with_sizes.default])
def _split(func, args, kwargs):
    self, sizes = args[0], args[1]
    dim = _dim(self, kwargs.get("dim", args[2] if len(args) > 2 else 0))
    if isinstance(sizes, int):
        sizes = split_sizes(self.shape[dim], sizes)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [sliced(self, dim, s, s + n) for s, n in zip(starts, sizes)]


def _mm_like(a, b):
    """a @ b with one quantized 2-D operand, through the linear kernel."""
    if isinstance(b, BlockQuantizedTensor) and not isinstance(a, QuantizedTensor):
        return run_kernel("linear", transposed(b, 0, 1), a)
    if isinstance(a, BlockQuantizedTensor) and not isinstance(b, QuantizedTensor):
        return run_kernel("linear", a, b.t()).t()
    raise NotImplementedError(f"matmul needs exactly one quantized operand; received {type(a).__name__} @ {type(b).__name__}")


@BlockQuantizedTensor.implements(aten.mm.default)
def _mm(func, args, kwargs):
    return _mm_like(args[0], args[1])


@BlockQuantizedTensor.implements(aten.addmm.default)
def _addmm(func, args, kwargs):
    bias, a, b = args[:3]
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    out = _mm_like(a, b)
    return (bias if beta == 1 else beta * bias) + (out if alpha == 1 else alpha * out)


@BlockQuantizedTensor.implements(aten.bmm.default)
def _bmm(func, args, kwargs):
    a, b = args
    if not isinstance(b, BlockQuantizedTensor) or isinstance(a, QuantizedTensor):
        raise NotImplementedError("bmm supports a plain batch times a quantized batch of matrices")
    return run_kernel("bmm", b, a)


@BlockQuantizedTensor.implements_function(F.linear)
def _linear(input, weight, bias=None):
    if not isinstance(weight, QuantizedTensor) or isinstance(input, QuantizedTensor):
        raise NotImplementedError(
            f"F.linear supports a plain input and a quantized weight; received input {type(input).__name__}, "
            f"weight {type(weight).__name__}"
        )
    return run_kernel("linear", weight, input, bias)


def addmm_function(transpose):
    """``torch.addmm(bias, x, W)`` with a quantized ``W`` of shape (in, out), as transformers' Conv1D calls it:
    the linear kernel on ``transpose(W)`` with the bias fused. W^T is built outside the dispatcher (inference mode
    allows no view ops on parameters there) and, in eager mode, once per weight: it shares W's inner tensors, and
    building it costs as much as a small layer's kernel. Other forms run the ATen ops (``aten.addmm``)."""

    def linear_weight(weight):
        if torch.compiler.is_compiling():
            return transpose(weight)
        cache = weight._built()  # per-object state that copies and pickles leave out
        if "transposed" not in cache:
            cache["transposed"] = transpose(weight)
        return cache["transposed"]

    def addmm(input, mat1, mat2, *, beta=1, alpha=1, out=None):
        plain = not isinstance(input, QuantizedTensor) and not isinstance(mat1, QuantizedTensor)
        if plain and isinstance(mat2, QuantizedTensor) and out is None and beta == 1 and alpha == 1 and input.shape == mat2.shape[1:]:
            return run_kernel("linear", linear_weight(mat2), mat1, input)
        with torch._C.DisableTorchFunctionSubclass():
            return torch.addmm(input, mat1, mat2, beta=beta, alpha=alpha, out=out)

    return addmm


BlockQuantizedTensor.implements_function(torch.addmm)(addmm_function(lambda weight: transposed(weight, 0, 1)))


@BlockQuantizedTensor.implements_function(F.embedding)
def _embedding(input, weight, padding_idx=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False, sparse=False):
    if max_norm is not None:
        raise ValueError(f"embedding max_norm renormalises the weight in place, which a quantized weight cannot; received max_norm={max_norm}")
    if weight.dim() != 2:
        raise NotImplementedError(f"quantized embedding needs a 2-D weight; received {weight!r}")
    return run_kernel("embedding", weight, input, preference="auto")


@BlockQuantizedTensor.implements_function(F.scaled_dot_product_attention)
def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Dequantize-first attention (quantized query, key or value from :mod:`lowbit.attention`): each quantized input
    becomes the float tensor it stands for; PyTorch has no integer attention kernel to call instead."""
    if isinstance(attn_mask, QuantizedTensor):
        raise TypeError("attn_mask must be a plain tensor; received a quantized tensor")
    query, key, value = (t.dequantize() if isinstance(t, QuantizedTensor) else t for t in (query, key, value))
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


CONV_FUNCTIONS = (F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)


def run_conv(func, input, weight, bias, args, kwargs):
    """A convolution with a quantized weight through the registry's ``conv`` kernel."""
    if isinstance(input, QuantizedTensor):
        raise NotImplementedError(f"{func.__name__} supports a plain input and a quantized weight")
    return run_kernel("conv", weight, input, bias, conv=(func, tuple(args), dict(kwargs)))


def conv_impl(func):
    """``func(input, weight, bias, *args, **kwargs)`` routed to :func:`run_conv`."""

    def impl(input, weight, bias=None, *args, **kwargs):
        return run_conv(func, input, weight, bias, args, kwargs)

    return impl


for _func in CONV_FUNCTIONS:
    BlockQuantizedTensor.implements_function(_func)(conv_impl(_func))
