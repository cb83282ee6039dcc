"""The one place where autograd meets lowbit's kernels.

Kernels compute forward values only (integer GEMMs have no gradient). :func:`call_kernel` runs the
chosen kernel and, when autograd needs a gradient, wraps the call in :class:`KernelGrad`, whose
backward gives the input (and bias) the gradients of the float op on the dequantized weight: the
straight-through estimate across activation and weight rounding. Forward costs the same in grad
mode as under ``no_grad``; the dequantized weight is built only when backward runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import weight_values
from .registry import Kernel


def needs_grad(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """True when autograd records this call: grad mode on and the input or the bias requires grad."""
    return torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))


def call_kernel(kernel: Kernel, x: torch.Tensor, tensors: dict, meta: dict, bias: torch.Tensor | None):
    """``kernel.fn(x, tensors, meta, bias)``, differentiable in ``x`` and ``bias`` when autograd asks."""
    if needs_grad(x, bias):
        return KernelGrad.apply(x, bias, kernel, tensors, meta)
    return forward_values(kernel, x, tensors, meta, bias)


def forward_values(kernel: Kernel, x: torch.Tensor, tensors: dict, meta: dict, bias: torch.Tensor | None):
    """The kernel's result; an input without elements never reaches a kernel (no kernel is handed zero
    rows) and gets the empty result PyTorch's float op gives."""
    if x.numel() == 0:
        return empty_result(kernel.op, x, meta, bias)
    out = kernel.fn(x, tensors, meta, bias)
    if kernel.op == "conv" and "activation" in meta:
        out = with_nan_windows(out, x, meta)
    return out


def with_nan_windows(out: torch.Tensor, x: torch.Tensor, meta: dict) -> torch.Tensor:
    """A convolution with quantized inputs (which turn NaN into 0) made to follow the float conv's rule:
    NaN in every output whose window holds a NaN input. Which windows do is one small conv: the NaN mask
    reduced over each group's input channels, convolved with ones (groups, 1, *k), then spread over each
    group's output channels. Eager calls skip it when ``x`` holds no NaN."""
    nan = torch.isnan(x)
    if not torch.compiler.is_compiling() and not nan.any():
        return out
    func, args, kwargs = meta["conv"]
    kernel_size, groups = meta["shape"][2:], meta["groups"]
    channel = x.dim() - len(kernel_size) - 1  # 0 for an unbatched input
    mask = nan.unflatten(channel, (groups, -1)).any(channel + 1).to(x.dtype)  # (N, groups, *spatial)
    ones = torch.ones((groups, 1, *kernel_size), dtype=x.dtype, device=x.device)
    windows = func(mask, ones, None, *args, **kwargs).repeat_interleave(out.shape[channel] // groups, channel)
    return out.masked_fill(windows > 0, float("nan"))



def empty_result(op: str, x: torch.Tensor, meta: dict, bias: torch.Tensor | None) -> torch.Tensor:
    """The float op's result for an ``x`` without elements: its shape, dtype and shape errors, found on
    the meta device (nothing is computed or dequantized)."""
    dtype = meta["dtype"] if op == "embedding" else x.dtype
    weight = torch.empty(meta["shape"], dtype=dtype, device="meta")
    x_meta, b = x.to("meta"), None if bias is None else torch.empty(bias.shape, dtype=dtype, device="meta")
    if op == "linear":
        out = F.linear(x_meta, weight, b)
    elif op == "bmm":
        out = torch.bmm(x_meta, weight)
    elif op == "embedding":
        out = F.embedding(x_meta, weight)
    elif op == "conv":
        func, args, kwargs = meta["conv"]
        out = func(x_meta, weight, b, *args, **kwargs)
    else:
        raise NotImplementedError(f"lowbit has no empty-input rule for {op!r}")
    return torch.empty(out.shape, dtype=out.dtype, device=x.device)


def effective_weight(tensors: dict, meta: dict, dtype: torch.dtype) -> torch.Tensor:
    """The float weight the op applies to its (un-smoothed) input: dequantized, smoothing divisors folded out."""
    weight = weight_values(tensors, meta, dtype)
    smooth = tensors.get("act_smooth")
    return weight if smooth is None else weight / smooth.to(dtype)


class KernelGrad(torch.autograd.Function):
    """Forward: the kernel alone. Backward: gradients of the float op on the dequantized weight."""

    @staticmethod
    def forward(ctx, x, bias, kernel, tensors, meta):
        ctx.kernel, ctx.tensors, ctx.meta, ctx.x_shape = kernel, tensors, meta, x.shape
        ctx.save_for_backward(x if kernel.op == "conv" else None, bias)
        return forward_values(kernel, x, tensors, meta, bias)

    @staticmethod
    def backward(ctx, grad):
        x, bias = ctx.saved_tensors
        weight = effective_weight(ctx.tensors, ctx.meta, grad.dtype)
        want_x, want_bias = ctx.needs_input_grad[:2]
        op = ctx.kernel.op
        if op == "conv":
            grad_x, grad_bias = _conv_grads(grad, x, weight, bias, ctx.meta["conv"], want_x, want_bias)
        elif op == "linear":  # y (*, N) = x (*, K) @ W (N, K)^T + b
            grad_x = (grad @ weight).reshape(ctx.x_shape) if want_x else None
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(bias.dtype) if want_bias else None
        elif op == "bmm":  # y (B, M, N) = x (B, M, K) @ W (B, K, N)
            grad_x, grad_bias = (grad @ weight.transpose(-1, -2) if want_x else None), None
        else:
            raise NotImplementedError(f"lowbit has no gradient for {op!r}")
        return grad_x, grad_bias, None, None, None


def _conv_grads(grad, x, weight, bias, conv, want_x, want_bias):
    """Input and bias gradients of ``func(x, weight, bias, *args, **kwargs)``, by autograd on the float conv."""
    func, args, kwargs = conv
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_(want) for t, want in ((x, want_x), (bias, want_bias)) if t is not None]
        out = func(inputs[0], weight, inputs[1] if bias is not None else None, *args, **kwargs)
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad))
    return (next(grads) if want_x else None), (next(grads) if want_bias else None)
