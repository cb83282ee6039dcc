"""The modules QAT puts on a layer: a weight fake quantizer and an input (activation) fake quantizer.

Both compute :func:`lowbit.primitives.fake_quantize.fake_quantize_ste` with qparams chosen exactly as the
post-training flows choose them (min/max of the weight's blocks or HQQ's fit of them, the activation's tokens, or a
static moving-average range), or with learned ones (LSQ). Their forward values are what the reference kernels
compute with the same qparams, so a converted model equals the fake-quantized one. Nothing in a forward
reads a tensor's value in Python, so a training step compiles into one graph (except an HQQ fit per call, whose
early stop reads its progress: learn the ranges, which start from HQQ's, to train an ``algorithm="hqq"`` config
compiled).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..calibration.observers import NotCalibratedError, range_qparams
from ..algorithms.smoothquant import smoothing_factors
from ..primitives.affine import choose_qparams
from ..primitives.fake_quantize import fake_quantize_ste, ste_round
from ..primitives.hqq import hqq_qparams
from ..primitives.qtypes import get_qtype
from ..specs import ActivationSpec, WeightSpec

SCALE_FLOOR = torch.finfo(torch.float32).tiny  # the float32 scales' smallest normal, as in choose_qparams


def scaled_gradient(p: torch.Tensor, factor: float) -> torch.Tensor:
    """``p`` in the forward (exactly), its gradient multiplied by ``factor`` in the backward."""
    return p.detach() + (p - p.detach()) * factor


def learned_qparams(scale: nn.Parameter, zero_point: nn.Parameter | None, qtype: str, per_scale: int):
    """LSQ: the learned scale (floored) and integer zero point, their gradients scaled by ``1 / sqrt(n * qmax)``
    for ``n = per_scale`` values sharing a scale."""
    qt = get_qtype(qtype)
    factor = 1.0 / math.sqrt(per_scale * qt.qmax)
    s = scaled_gradient(scale, factor).float().clamp(min=SCALE_FLOOR)
    if zero_point is None:
        return s, None
    return s, ste_round(scaled_gradient(zero_point, factor).float()).clamp(qt.qmin, qt.qmax)


def stored_qparams(scale: torch.Tensor, zero_point: torch.Tensor | None, qtype: str):
    """Learned or chosen qparams as a quantized tensor stores them: float32 scale, zero point in the qtype's storage."""
    zero = None if zero_point is None else zero_point.detach().round().clamp(get_qtype(qtype).qmin, get_qtype(qtype).qmax)
    return scale.detach().float().clamp(min=SCALE_FLOOR), None if zero is None else zero.to(get_qtype(qtype).storage)


class WeightFakeQuantizer(nn.Module):
    """Fake-quantizes a layer's weight as a weight spec says, in blocks of ``block_size``.

    Args:
        spec: the base config's weight spec.
        weight: the float weight as the layer applies it ((out, in) for linear layers), for learned qparams' start.
        block_size: the blocks of that weight.
        range_learning: learn scales (and zero points), starting from the spec's choice (:meth:`spec_qparams`),
            instead of choosing them each call.
        transposed: the module stores the weight transposed (transformers' Conv1D keeps (in, out)).
        smoothed: the layer's input is smoothed (static SmoothQuant): the weight's columns are multiplied by the
            factors :meth:`set_smoothing` fixes (ones until then).
        initial_qparams: (scale, float zero point or None) learned qparams start from (e.g. GPTQ's), instead of
            the spec's choice for the weight.
    """

    def __init__(self, spec: WeightSpec, weight: torch.Tensor, block_size, *, range_learning: bool = False,
                 transposed: bool = False, smoothed: bool = False, initial_qparams=None):
        super().__init__()
        self.spec, self.block_size, self.transposed = spec, tuple(block_size), transposed
        self.range_learning = range_learning
        # (K,) SmoothQuant factors multiplying the weight's columns
        self.register_buffer("smoothing", torch.ones(weight.shape[1], device=weight.device) if smoothed else None)
        if range_learning:
            scale, zero_point = initial_qparams or self.spec_qparams(weight)
            self.scale = nn.Parameter(scale)
            self.zero_point = None if zero_point is None else nn.Parameter(zero_point)

    def applied(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight as the layer applies it: (out, in) for a Conv1D's (in, out), its columns smoothed."""
        w = weight.t() if self.transposed else weight
        return w if self.smoothing is None else (w.float() * self.smoothing).to(w.dtype)

    def spec_qparams(self, w: torch.Tensor):
        """(scale, float zero point or None) the spec chooses for ``w``, as the post-training path does: HQQ's fit
        for ``algorithm="hqq"`` (raises on a non-finite weight), else each block's min/max (NaN/inf ignored)."""
        w = w.detach()
        if self.spec.algorithm == "hqq":
            scale, zero_point = hqq_qparams(w, self.block_size, self.spec.qtype, symmetric=self.spec.symmetric)
        else:
            scale, zero_point = choose_qparams(w, self.block_size, self.spec.qtype, symmetric=self.spec.symmetric,
                                               ignore_nonfinite=True)
        return scale, None if zero_point is None else zero_point.float()

    def qparams(self, w: torch.Tensor):
        """(scale, float zero point or None) for the applied weight ``w``."""
        if not self.range_learning:
            return self.spec_qparams(w)
        return learned_qparams(self.scale, self.zero_point, self.spec.qtype, math.prod(self.block_size))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        w = self.applied(weight)
        scale, zero_point = self.qparams(w)
        out = fake_quantize_ste(w, scale, zero_point, self.block_size, self.spec.qtype)
        return out.t() if self.transposed else out

    def convert_qparams(self, w: torch.Tensor):
        """The qparams to quantize the applied weight ``w`` with at convert: the learned ones, or None (the spec's,
        chosen by the post-training path itself)."""
        if not self.range_learning:
            return None
        scale, zero_point = self.qparams(w)
        return stored_qparams(scale, zero_point, self.spec.qtype)

    def set_smoothing(self, smoothing: torch.Tensor, weight: torch.Tensor) -> None:
        """Multiply the weight's columns by ``smoothing`` from now on; learned qparams restart from the spec's choice."""
        self.smoothing.copy_(smoothing)
        if self.range_learning:
            scale, zero_point = self.spec_qparams(self.applied(weight))
            with torch.no_grad():
                self.scale.copy_(scale)
                if zero_point is not None:
                    self.zero_point.copy_(zero_point)

    def extra_repr(self) -> str:
        return f"qtype={self.spec.qtype}, block_size={self.block_size}, range_learning={self.range_learning}"


class ActivationFakeQuantizer(nn.Module):
    """Fake-quantizes a layer's input as an activation spec says.

    Dynamic: qparams from each call's tokens (or whole tensor), as the dynamic kernels choose them. Static: one
    per-tensor range, an exponential moving average (``averaging_constant``) of each training batch's min and max
    (the first batch sets it), as :class:`~lowbit.calibration.MovingAverageMinMaxObserver` computes it, until
    :meth:`freeze`; with ``range_learning`` the frozen range's qparams are then learned. A static spec with
    ``smoothing`` divides the input by SmoothQuant factors fixed from the first batch (``smoothing_pending``).
    """

    def __init__(self, spec: ActivationSpec, *, range_learning: bool = False, averaging_constant: float = 0.01,
                 channels: int | None = None, device: torch.device | None = None):
        super().__init__()
        self.spec = spec
        self.static = spec.mode == "static"
        self.range_learning = range_learning and self.static
        if not self.static:
            return
        self.averaging_constant, self.observing = averaging_constant, True
        self.register_buffer("min_val", torch.tensor(float("inf"), device=device))
        self.register_buffer("max_val", torch.tensor(float("-inf"), device=device))
        self.smoothing_pending = spec.smoothing is not None and channels is not None
        self.register_buffer("smoothing", torch.ones(channels, device=device) if self.smoothing_pending else None)
        if self.range_learning:
            self.scale = nn.Parameter(torch.ones((), device=device))
            self.zero_point = None if spec.symmetric else nn.Parameter(torch.zeros((), device=device))

    @property
    def observed(self) -> bool:
        return bool(self.min_val <= self.max_val)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.static:
            block = self.spec.block_size(x.shape)
            scale, zero_point = choose_qparams(x.detach(), block, self.spec.qtype, symmetric=self.spec.symmetric,
                                               ignore_nonfinite=True)
            return fake_quantize_ste(x, scale, None if zero_point is None else zero_point.float(), block, self.spec.qtype)
        if self.smoothing is not None:
            x = x / self.smoothing.to(x.dtype)
        if self.observing and self.training:
            self._observe(x.detach())
        scale, zero_point = self.qparams(x.numel())
        ones = (1,) * x.dim()
        zero_point = None if zero_point is None else zero_point.reshape(ones)
        return fake_quantize_ste(x, scale.reshape(ones), zero_point, tuple(x.shape), self.spec.qtype)

    def _observe(self, x: torch.Tensor) -> None:
        """Moving-average update without reading values in Python (a batch with NaN or inf leaves the range)."""
        lo, hi = x.amin().float(), x.amax().float()
        first, c = torch.isinf(self.min_val), self.averaging_constant
        new_lo = torch.where(first, lo, self.min_val + c * (lo - self.min_val))
        new_hi = torch.where(first, hi, self.max_val + c * (hi - self.max_val))
        keep = ~(torch.isfinite(lo) & torch.isfinite(hi))
        self.min_val.copy_(torch.where(keep, self.min_val, new_lo))
        self.max_val.copy_(torch.where(keep, self.max_val, new_hi))

    def observed_qparams(self):
        """(scale, zero point) of the observed range, as a post-training observer computes them."""
        return range_qparams(self.min_val, self.max_val, self.spec.qtype, self.spec.symmetric)

    def qparams(self, numel: int):
        if self.range_learning and not self.observing:
            return learned_qparams(self.scale, self.zero_point, self.spec.qtype, numel)
        scale, zero_point = self.observed_qparams()
        return scale, None if zero_point is None else zero_point.float()

    def freeze(self) -> None:
        """Stop updating the range; with range learning, the learned qparams start from it."""
        if not self.static or not self.observing:
            return
        if self.range_learning:
            self._require_observed()
            scale, zero_point = self.observed_qparams()
            with torch.no_grad():
                self.scale.copy_(scale)
                if zero_point is not None:
                    self.zero_point.copy_(zero_point.float())
        self.observing = False

    def convert_qparams(self):
        """The static (scale, zero point) a converted layer keeps: what the forward uses now."""
        self._require_observed()
        scale, zero_point = self.qparams(1)
        return stored_qparams(scale, zero_point, self.spec.qtype)

    def _require_observed(self) -> None:
        if not self.observed:
            raise NotCalibratedError("no activation range was observed: run training-mode forward passes through the "
                                     "prepared model before lowbit.qat.freeze_ranges or the convert step")

    def fix_smoothing(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """SmoothQuant factors from this batch's per-channel maxima and the linear ``weight``'s (out, in) columns."""
        act_max = torch.nan_to_num(x.detach().float(), nan=0.0, posinf=0.0, neginf=0.0).abs().reshape(-1, x.shape[-1]).amax(0)
        weight_max = weight.detach().float().abs().amax(0)
        self.smoothing.copy_(smoothing_factors(act_max, weight_max, self.spec.smoothing))
        self.smoothing_pending = False
        return self.smoothing

    def get_extra_state(self) -> dict:
        """A static quantizer's phase travels with its state_dict (frozen or observing, smoothing fixed or not)."""
        return {"observing": self.observing, "smoothing_pending": self.smoothing_pending} if self.static else {}

    def set_extra_state(self, state: dict) -> None:
        if self.static:
            self.observing, self.smoothing_pending = bool(state["observing"]), bool(state["smoothing_pending"])

    def extra_repr(self) -> str:
        return f"{self.spec.mode} {self.spec.qtype} {self.spec.granularity}, range_learning={self.range_learning}"
