"""AWQ (Lin et al. 2023): protect the input channels that carry large activations by scaling them up in the
weight before quantization (and dividing the activation by the same factors), with the scaling strength
searched per layer against the layer's output error on calibration tokens."""

from __future__ import annotations

from typing import Sequence

import torch

from ..primitives.affine import choose_qparams, dequantize, quantize
from ..primitives.fake_quantize import fake_quantize
from ..specs import WeightSpec
from .clipping import shrunk_qparams

CLIP_SHRINK = 0.5  # the narrowest range the clipping search tries, as a fraction of a group's min/max range


class ActivationSampleCollector:
    """Running mean of ``|x|`` per input channel and a uniform sample of up to ``samples`` tokens (reservoir
    sampling with a fixed seed, so a run is reproducible)."""

    def __init__(self, features: int, samples: int, device: torch.device | str = "cpu"):
        self.mean_abs = torch.zeros(features, dtype=torch.float32, device=device)
        self.rows = torch.empty(0, features, dtype=torch.float32, device=device)
        self.samples, self.tokens = samples, 0
        self.generator = torch.Generator(device=device).manual_seed(0)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (M, K)
        x = x[torch.isfinite(x).all(-1)]
        m = x.shape[0]
        if m == 0:
            return
        total = self.tokens + m
        self.mean_abs.mul_(self.tokens / total).add_(x.abs().sum(0), alpha=1.0 / total)
        room = self.samples - self.rows.shape[0]
        if room > 0:
            self.rows = torch.cat([self.rows, x[:room]])
        if m > room:  # token t replaces a random kept one with probability samples / t
            rest = x[max(room, 0):]
            seen = self.tokens + max(room, 0) + torch.arange(1, rest.shape[0] + 1, device=x.device)
            slot = (torch.rand(rest.shape[0], generator=self.generator, device=x.device) * seen).long()
            keep = slot < self.samples
            self.rows[slot[keep]] = rest[keep]
        self.tokens = total


def awq_scales(weight: torch.Tensor, collector: ActivationSampleCollector, spec: WeightSpec, block_size: Sequence[int],
               grid: int = 20) -> torch.Tensor:
    """The per-input-channel factors s (K,) minimizing ``|X W^T - X (Q(W s) / s)^T|^2`` over the sampled tokens X,
    for ``s = mean|x|^r`` normalized to a geometric mean of its extremes of 1, ``r`` on a grid in [0, 1); ``r = 0``
    (all ones: round to nearest) is among them.

    Example:
        >>> from lowbit.specs import weight_spec
        >>> c = ActivationSampleCollector(64, 256); c.add(torch.randn(128, 64) * torch.linspace(0.1, 8, 64))
        >>> awq_scales(torch.randn(16, 64), c, weight_spec("int4", "uint4", 32), (1, 32)).shape
        torch.Size([64])
    """
    w = weight.detach().float()
    x, mean_abs = collector.rows, collector.mean_abs.clamp(min=1e-4)  # channels never active keep a tiny factor
    reference = x @ w.t()
    best, best_error = torch.ones_like(mean_abs), None
    for step in range(grid):
        s = mean_abs.pow(step / grid)
        s = s / (s.max() * s.min()).sqrt()
        w_q = fake_quantize(w * s, block_size, spec.qtype, symmetric=spec.symmetric) / s
        error = (x @ w_q.t() - reference).pow(2).mean()
        if best_error is None or error < best_error:
            best, best_error = s, error
    return best


def awq_clipped_qparams(weight: torch.Tensor, x: torch.Tensor, spec: WeightSpec, block_size: Sequence[int], steps: int):
    """Per group of a per-group weight, the min/max qparams of its range shrunk by the factor in [0.5, 1]
    (``steps`` + 1 candidates) minimizing the group's share of the layer's output error on the tokens ``x``
    (M, K), ``d^T X_g^T X_g d`` for the group's rounding error ``d`` and its inputs ``X_g`` (AWQ's clipping
    search); min/max qparams for other granularities or ``steps=0``.

    Example:
        >>> from lowbit.specs import weight_spec
        >>> x = torch.randn(128, 64)
        >>> scale, zero = awq_clipped_qparams(torch.randn(16, 64), x, weight_spec("int4", "uint4", 32), (1, 32), 10)
        >>> tuple(scale.shape), tuple(zero.shape)
        ((16, 2), (16, 2))
    """
    w = weight.detach().float()
    if spec.granularity != "per_group":
        return choose_qparams(w, block_size, spec.qtype, symmetric=spec.symmetric)
    n, k = w.shape
    group = block_size[-1]
    x = x.float().reshape(-1, k // group, group)  # (M, G, g)
    gram = torch.einsum("mgi,mgj->gij", x, x)  # (G, g, g): each group's inputs' Gram matrix

    def output_error(scale, zero):
        d = (w - dequantize(quantize(w, scale, zero, block_size, spec.qtype), scale, zero, block_size)).reshape(n, -1, group)
        return torch.einsum("ngi,gij,ngj->ng", d, gram, d)  # (N, G)

    return shrunk_qparams(w, block_size, spec.qtype, symmetric=spec.symmetric, steps=steps, narrowest=CLIP_SHRINK,
                          error=output_error)
