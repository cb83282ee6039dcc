"""AWQ (Lin et al. 2023): protect the input channels that carry large activations by scaling them up in the
weight before quantization (and dividing the activation by the same factors), with the scaling strength
searched per layer against the layer's output error on calibration tokens."""

from __future__ import annotations

from typing import Sequence

import torch

from ..primitives.fake_quantize import fake_quantize
from ..specs import WeightSpec


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
