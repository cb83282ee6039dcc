"""``QATConfig``: quantization-aware training of any lowbit config, in two ``quantize_`` steps."""

from __future__ import annotations

from dataclasses import dataclass

from ..configs import QuantConfig

QAT_STEPS = ("prepare", "convert")


@dataclass(frozen=True)
class QATConfig:
    """Train a model to be quantized as ``base_config`` says, then quantize it.

    ``quantize_(model, QATConfig(base, step="prepare"))`` puts fake quantizers on the layers ``base`` would
    quantize: each weight is fake-quantized with the base spec's qtype and blocks; inputs are fake-quantized
    per call (dynamic configs) or with a moving-average range that :func:`lowbit.qat.freeze_ranges` freezes
    (static configs). Rounding has a straight-through gradient. After training,
    ``quantize_(model, QATConfig(base, step="convert"))`` quantizes each layer with exactly the qparams the
    fake quantizers last used, so the converted model computes what the trained one did.

    Args:
        base_config: any lowbit config (weight-only, dynamic or static). Its ``kernel`` applies at convert.
        step: ``"prepare"`` or ``"convert"``.
        range_learning: learn the scales and zero points (LSQ: gradients scaled by ``1 / sqrt(n * qmax)``),
            starting from the min/max ones (weights) or the frozen observed range (static activations).

    Example:
        >>> import torch, lowbit
        >>> from lowbit.qat import QATConfig
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 8))
        >>> _ = lowbit.quantize_(model, QATConfig(lowbit.Int4WeightOnly(group_size=32)))
        >>> model(torch.randn(2, 64)).sum().backward()  # train as usual
        >>> _ = lowbit.quantize_(model, QATConfig(lowbit.Int4WeightOnly(group_size=32), step="convert"))
        >>> type(model[0].weight).__name__
        'Int4Tensor'
    """

    base_config: QuantConfig
    step: str = "prepare"
    range_learning: bool = False

    def __post_init__(self):
        if not isinstance(self.base_config, QuantConfig):
            raise TypeError(f"QATConfig base_config must be a lowbit config such as Int8DynamicActivation(); received "
                            f"{type(self.base_config).__name__}")
        if self.step not in QAT_STEPS:
            raise ValueError(f"QATConfig step must be one of {QAT_STEPS}; received {self.step!r}")
        if not isinstance(self.range_learning, bool):
            raise ValueError(f"QATConfig range_learning must be True or False; received {self.range_learning!r}")

    def label(self) -> str:
        return f"QATConfig({self.base_config.label()}, step={self.step!r}, range_learning={self.range_learning})"
