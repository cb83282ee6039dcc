"""Static int8 and float8 convolutions on oneDNN.

Int8 runs oneDNN's u8s8 kernels (``torch.ops.onednn.qconv_pointwise``): the int8 weight is reordered
into oneDNN's blocked layout once, at convert/load time (``qconv_prepack``, by the conv's groups);
each call quantizes the input with the calibrated scale in one pass (uint8, zero point + 128), and
oneDNN applies weight scales, bias and the output dtype inside the convolution.

Float8 (e4m3fn) runs oneDNN's bf16 convolution: every e4m3 value is exact in bf16, so the input is
rounded to the float8 grid straight into bf16 in one pass, the weight codes widen exactly to bf16,
and one pass after the convolution applies both scales and the bias (products are exact; the
convolution's bf16 result carries 8 significant bits, far below float8's own rounding).

Results are channels-last; the next conv reads them without a copy. Neither kernel takes transposed
convolutions or padding given as a string, nor the float8 one Conv1d (channels are not the innermost
dimension there): the registry gives such calls the reference kernel under ``"auto"`` and raises where
``kernel="onednn"`` names these kernels.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from . import native
from .avx512 import _vector, e4m3fn_activations
from .cpu import needs_vnni
from .ops import custom_op
from .registry import Call, register_kernel

_CONVS = (F.conv1d, F.conv2d, F.conv3d)
_PARALLEL_MIN = 1 << 16  # elements below which input quantization runs on one thread
_LAYOUTS = {3: torch.contiguous_format, 4: torch.channels_last, 5: torch.channels_last_3d}  # of results, by dims


def _requires(device_type: str) -> str | None:
    if not hasattr(torch.ops.onednn, "qconv_pointwise"):
        return "needs torch.ops.onednn.qconv_pointwise (PyTorch built with oneDNN)"
    return needs_vnni(device_type) or native.unavailable(device_type)


def _requires_bf16(device_type: str) -> str | None:
    if not torch.backends.mkldnn.is_available():
        return "needs PyTorch built with oneDNN"
    if not {"avx512_bf16", "amx_bf16"} & native.cpu_flags():
        return "needs a CPU with AVX512-BF16 or AMX-BF16 (bf16 convolutions are emulated, slowly, elsewhere)"
    return native.unavailable(device_type)


def _pack(tensors, meta) -> dict:
    """oneDNN's weight layout, chosen for a nominal input (the layout does not depend on the input's size)."""
    weight, groups = tensors["qdata"], meta["groups"]  # (C_out, C_in / groups, *k)
    spatial = [k + 7 for k in weight.shape[2:]]
    x_shape = [1, weight.shape[1] * groups, *spatial]
    dims = weight.dim() - 2
    w_scale = tensors["scale"].reshape(-1).float()
    packed = torch.ops.onednn.qconv_prepack(weight, w_scale, 1.0, 0, [1] * dims, [0] * dims, [1] * dims, groups, x_shape)
    return {"packed": packed, "packed_aux": torch.zeros(weight.shape[0], dtype=torch.int64)}  # weight zero points


def _quantize_input(x: torch.Tensor, scale: float, zero: float, symmetric: bool) -> torch.Tensor:
    """uint8 q + 128 of the int8 static quantization of x (any dense layout kept), in one pass."""
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
            or x.is_contiguous(memory_format=torch.channels_last_3d)):
        x = x.contiguous()
    x = x.float()
    q = torch.empty_like(x, dtype=torch.uint8)
    rows = x.shape[0] * x.shape[1]  # per-tensor scale: any split of the buffer into rows works
    row_scales = torch.empty(rows)  # written by the kernel (all equal to scale here)
    threads = torch.get_num_threads() if x.numel() >= _PARALLEL_MIN else 1  # waking threads costs more than small inputs
    native.library().lowbit_quantize_rows_int8(x.data_ptr(), q.data_ptr(), row_scales.data_ptr(), row_scales.data_ptr(),
                                               rows, x.numel() // rows, int(symmetric), 1, scale, zero, None, 0, threads)
    return q


@custom_op("lowbit::int8_static_conv")
def int8_static_conv(x: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor,
                     bias: torch.Tensor | None, act_scale: torch.Tensor, act_zero: torch.Tensor | None, symmetric: bool,
                     stride: list[int], padding: list[int], dilation: list[int], groups: int) -> torch.Tensor:
    """Conv of x quantized with the calibrated ``act_scale``/``act_zero`` and a prepacked int8 weight."""
    scale = float(act_scale.reshape(()))
    zero = 0.0 if act_zero is None else float(act_zero.reshape(()))
    q = _quantize_input(x, scale, zero, symmetric)
    out_dtype = x.dtype if x.dtype in (torch.float32, torch.bfloat16) else torch.float32
    out = torch.ops.onednn.qconv_pointwise(q, scale, int(zero) + 128, packed, w_scale, w_zero, bias, stride, padding,
                                           dilation, groups, 1.0, 0, out_dtype, "none", [], "")
    return out.to(x.dtype).contiguous(memory_format=_LAYOUTS[x.dim()])


@int8_static_conv.register_fake
def _(x, packed, w_scale, w_zero, bias, act_scale, act_zero, symmetric, stride, padding, dilation, groups):
    spatial = [(size + 2 * p - d * (k - 1) - 1) // s + 1
               for size, k, s, p, d in zip(x.shape[2:], packed.shape[2:], stride, padding, dilation)]
    return torch.empty(x.shape[0], packed.shape[0], *spatial, dtype=x.dtype, device=x.device, memory_format=_LAYOUTS[x.dim()])


def _unbatched(x, meta) -> bool:
    """Whether x is one unbatched input (C, *spatial), which PyTorch's convolutions take as a batch of one."""
    return x.dim() == len(meta["shape"]) - 1


def _takes_convs(convs) -> Callable[[Call], str | None]:
    """``accepts`` of a kernel that runs ``convs`` with numeric padding."""
    names = [f.__name__ for f in convs]

    def accepts(call: Call) -> str | None:
        if call.conv is not None and call.conv not in convs:
            return f"it runs {names}; received {call.conv.__name__}"
        if call.string_padding:
            return "it takes padding as numbers; received a string ('same' / 'valid')"
        return None

    return accepts


_float8_convs = _takes_convs(_CONVS[1:])


def _float8_accepts(call: Call) -> str | None:
    return _float8_convs(call) or e4m3fn_activations(call)


@register_kernel("conv", "int8_static", "onednn", devices=("cpu",), priority=20, granularities=("per_channel",),
                 qtypes=("int8",), requires=_requires, pack=_pack, accepts=_takes_convs(_CONVS))
def int8_static_conv_onednn(x, tensors, meta, bias):
    """Static int8 Conv1d/2d/3d: fused input quantization, prepacked u8s8 oneDNN convolution."""
    if _unbatched(x, meta):
        return int8_static_conv_onednn(x.unsqueeze(0), tensors, meta, bias).squeeze(0)
    stride, padding, dilation, groups = _conv_args(x.dim() - 2, *meta["conv"][1:])
    if groups != meta["groups"]:
        raise ValueError(f"this conv weight was packed for groups={meta['groups']}; received groups={groups}")
    return int8_static_conv(
        x.detach(), tensors["packed"], tensors["scale"].reshape(-1).float(), tensors["packed_aux"],
        None if bias is None else bias.detach().float(), tensors["act_scale"], tensors.get("act_zero_point"),
        meta["activation"].symmetric, stride, padding, dilation, groups,
    )


@custom_op("lowbit::float8_static_conv")
def float8_static_conv(x: torch.Tensor, codes: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                       act_scale: torch.Tensor, stride: list[int], padding: list[int], dilation: list[int],
                       groups: int) -> torch.Tensor:
    """Conv2d/3d of x rounded to e4m3 with the calibrated ``act_scale`` and e4m3 weight codes (as uint8),
    through oneDNN's bf16 convolution; channels-last float32 scaled by ``act_scale * w_scale`` plus bias."""
    layout, lib, threads = _LAYOUTS[x.dim()], native.library(), torch.get_num_threads()
    x = x.contiguous(memory_format=layout).float()
    channels_out = codes.shape[0]
    r, row_scales = torch.empty_like(x, dtype=torch.bfloat16), torch.empty(x.shape[0] * x.shape[1])
    lib.lowbit_float8_rows(x.data_ptr(), r.data_ptr(), row_scales.data_ptr(), row_scales.numel(), x.numel() // row_scales.numel(),
                           float(act_scale.reshape(())), 1, None, 0, threads)  # per-tensor scale: any split into rows works
    weight = torch.empty(codes.shape, dtype=torch.bfloat16)
    lib.lowbit_fp8_rows_to_bf16(codes.data_ptr(), weight.data_ptr(), codes[0].numel(), 0, channels_out, threads)
    acc = _CONVS[x.dim() - 3](r, weight, None, stride, padding, dilation, groups).contiguous(memory_format=layout)
    out = torch.empty_like(acc, dtype=torch.float32)
    scale = (w_scale.reshape(-1).float() * act_scale.reshape(()).float()).contiguous()
    lib.lowbit_bf16_epilogue(acc.data_ptr(), scale.data_ptr(), None, None if bias is None else bias.data_ptr(), out.data_ptr(),
                             acc.numel() // channels_out, channels_out, channels_out, threads)  # channels innermost
    return out


@float8_static_conv.register_fake
def _(x, codes, w_scale, bias, act_scale, stride, padding, dilation, groups):
    spatial = [(size + 2 * p - d * (k - 1) - 1) // s + 1
               for size, k, s, p, d in zip(x.shape[2:], codes.shape[2:], stride, padding, dilation)]
    return torch.empty(x.shape[0], codes.shape[0], *spatial, device=x.device, memory_format=_LAYOUTS[x.dim()])


@register_kernel("conv", "float8_static", "onednn", devices=("cpu",), priority=20, granularities=("per_channel",),
                 qtypes=("float8_e4m3fn",), requires=_requires_bf16, accepts=_float8_accepts)
def float8_static_conv_onednn(x, tensors, meta, bias):
    """Static float8 Conv2d/3d: input rounded to e4m3 in bf16, oneDNN bf16 convolution, one epilogue pass."""
    if _unbatched(x, meta):
        return float8_static_conv_onednn(x.unsqueeze(0), tensors, meta, bias).squeeze(0)
    out = float8_static_conv(x.detach(), tensors["qdata"].view(torch.uint8).contiguous(), tensors["scale"], _vector(bias),
                             tensors["act_scale"], *_conv_args(x.dim() - 2, *meta["conv"][1:]))
    return out.to(x.dtype)


def _conv_args(dims: int, args, kwargs):
    """(stride, padding, dilation, groups) of an ``F.convNd(input, weight, bias, *args, **kwargs)`` call;
    padding stays a string when given as ``"same"``/``"valid"``."""
    given = {**dict(zip(("stride", "padding", "dilation", "groups"), args)), **kwargs}

    def expand(value):
        return value if isinstance(value, str) else [value] * dims if isinstance(value, int) else list(value)

    return expand(given.get("stride", 1)), expand(given.get("padding", 0)), expand(given.get("dilation", 1)), given.get("groups", 1)
