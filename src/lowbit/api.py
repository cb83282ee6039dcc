"""``quantize_``: validate the whole config against the whole model, then quantize in place.

Handlers are looked up by config type; a handler validates every target module first and only
then changes the model, so an error never leaves a model half-quantized.
"""

from __future__ import annotations

import warnings
from typing import Callable, Protocol

import torch
import torch.nn as nn

from .configs import CONFIGS, STATIC_CONFIGS, QuantConfig
from .modules import QuantizedLinear
from .qat import QATConfig, QATHandler
from .targets import (
    FilterFn, conv_layout, default_filter, linear_weight, module_weight, refuse_prepared, select_targets, set_submodule,
    validate_targets,
)
from .tensors.from_spec import quantize_weight


class Handler(Protocol):
    def targets(self, model: nn.Module, config, filter_fn: FilterFn | None, module_swap: bool) -> list[tuple[str, nn.Module]]: ...
    def validate(self, targets: list[tuple[str, nn.Module]], config, module_swap: bool) -> None: ...
    def apply(self, model: nn.Module, targets: list[tuple[str, nn.Module]], config, module_swap: bool) -> None: ...


_HANDLERS: dict[type, Handler] = {}


def register_handler(config_type: type) -> Callable[[Handler], Handler]:
    """Register the handler that applies configs of ``config_type`` (class decorator, instantiated once)."""

    def wrap(handler_cls):
        _HANDLERS[config_type] = handler_cls()
        return handler_cls

    return wrap


def quantize_(model: nn.Module, config: QuantConfig, filter_fn: FilterFn | None = None, *, module_swap: bool = False) -> nn.Module:
    """Quantize ``model`` in place as ``config`` says and return it.

    Tied weights stay tied: a weight shared by a selected module and others is quantized once and
    shared when the config quantizes every module using it (``Int8WeightOnly`` on a language model's
    head tied to its nn.Embedding quantizes both); otherwise (a dynamic config and an embedding, or
    ``module_swap``) the modules sharing it stay float, with a warning naming them.

    Args:
        model: any nn.Module; its structure is kept (weights become tensor subclasses).
        config: a config instance such as ``Int8WeightOnly()``.
        filter_fn: ``filter_fn(module, fqn) -> bool`` picks modules; default: every nn.Linear and
            transformers ``Conv1D`` (GPT-2), warning about other modules with 2-D weights it leaves float.
        module_swap: replace nn.Linear by :class:`QuantizedLinear` instead of swapping weights.

    Raises:
        TypeError: ``config`` is not a registered config instance.
        ValueError: a selected module or weight cannot take this config (a weight on the meta device
            included), or the model is prepared for static quantization; the model is unchanged.

    Example:
        >>> import lowbit
        >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
        >>> _ = lowbit.quantize_(model, lowbit.Int8WeightOnly())
        >>> type(model[0].weight).__name__
        'Int8Tensor'
    """
    if isinstance(config, STATIC_CONFIGS):
        raise ValueError(
            f"{config.label()} needs calibration data: lowbit.prepare(model, config); lowbit.calibrate(model, data); "
            f"lowbit.convert(model)"
        )
    if isinstance(config, QuantConfig) and config.spec().weight.data_driven:
        raise ValueError(
            f"{config.label()} chooses weights from calibration data: lowbit.prepare(model, config); "
            f"lowbit.calibrate(model, data); lowbit.convert(model)"
        )
    handler = _HANDLERS.get(type(config))
    if handler is None:
        known = ", ".join(t.__name__ for t in _HANDLERS)
        raise TypeError(f"config must be an instance of one of {known}; received {type(config).__name__}")
    targets = handler.targets(model, config, filter_fn, module_swap)
    if not targets:
        warnings.warn(f"quantize_ with {config}: filter_fn selected no module, the model is unchanged", stacklevel=2)
        return model
    handler.validate(targets, config, module_swap)
    handler.apply(model, targets, config, module_swap)
    return model


def quantize_module_weight(module: nn.Module, config: QuantConfig, name: str) -> torch.Tensor:
    """``module``'s weight quantized as ``config``'s spec says, in the layout the module stores."""
    weight = linear_weight(module).detach()
    return module_weight(module, quantize_weight(weight, config.spec(), kernel=config.kernel, name=name, **conv_layout(module)))


class WeightHandler:
    """Weight-only and dynamic configs on the ``weight`` of the modules :func:`lowbit.targets.validate_targets`
    accepts."""

    def targets(self, model, config, filter_fn, module_swap):
        refuse_prepared(model, "quantize_")
        return select_targets(model, filter_fn, config, "module_swap gives each layer its own buffers" if module_swap else None,
                              stacklevel=4)

    def validate(self, targets, config, module_swap):
        validate_targets(targets, config, module_swap)

    def apply(self, model, targets, config, module_swap):
        done: dict[int, nn.Parameter] = {}  # tied weights are quantized once and stay tied
        for fqn, module in targets:
            if module_swap:
                swapped = QuantizedLinear.from_float(module, config)
                swapped.lowbit_spec = config.spec()  # the spec lowbit.save records
                set_submodule(model, fqn, swapped)
                continue
            key = id(module.weight)
            if key not in done:
                with torch.no_grad():
                    done[key] = nn.Parameter(quantize_module_weight(module, config, f"{fqn}.weight"), requires_grad=False)
            module.weight = done[key]
            module.lowbit_spec = config.spec()


for _config_type in CONFIGS:
    register_handler(_config_type)(WeightHandler)
register_handler(QATConfig)(QATHandler)
