"""SmoothQuant (Xiao et al. 2022): divide each input channel c of a layer's activation by
``s_c = max|x_c|^alpha / max|W[:, c]|^(1 - alpha)`` and multiply the weight's column c by it, moving activation
outliers into the per-channel weight scales before the activation is quantized."""

from __future__ import annotations

import torch


class ChannelMaxCollector:
    """Running ``max |x|`` per input channel (non-finite tokens skipped)."""

    def __init__(self, features: int, device: torch.device | str = "cpu"):
        self.max_abs = torch.zeros(features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        x = x[torch.isfinite(x).all(-1)]
        if x.shape[0]:
            torch.maximum(self.max_abs, x.abs().amax(0), out=self.max_abs)
            self.tokens += x.shape[0]


def smoothing_factors(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant factors ``s_c = max|x_c|^alpha / max|W[:, c]|^(1 - alpha)`` per input channel c
    (maxima floored at 1e-5); 1 for a channel whose activations or weights are all zero.

    Example:
        >>> smoothing_factors(torch.tensor([4.0, 0.0]), torch.tensor([1.0, 2.0]), 0.5)
        tensor([2., 1.])
    """
    s = act_max.clamp(min=1e-5) ** alpha / weight_max.clamp(min=1e-5) ** (1 - alpha)
    return torch.where((act_max > 0) & (weight_max > 0), s, torch.ones_like(s))
