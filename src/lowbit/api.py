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
from .kernels.registry import layout, select_kernel
from .modules import QuantizedLinear
from .primitives.affine import check_finite
from .tensors.base import QuantizedTensor

FilterFn = Callable[[nn.Module, str], bool]
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Handler(Protocol):
    def validate(self, targets: list[tuple[str, nn.Module]], config, module_swap: bool) -> None: ...
    def apply(self, model: nn.Module, targets: list[tuple[str, nn.Module]], config, module_swap: bool) -> None: ...


_HANDLERS: dict[type, Handler] = {}


def register_handler(config_type: type) -> Callable[[Handler], Handler]:
    """Register the handler that applies configs of ``config_type`` (class decorator, instantiated once)."""

    def wrap(handler_cls):
        _HANDLERS[config_type] = handler_cls()
        return handler_cls

    return wrap


def default_filter(module: nn.Module, fqn: str) -> bool:
    """Quantize every nn.Linear (pass a filter_fn to include nn.Embedding or to skip layers)."""
    return isinstance(module, nn.Linear)


def quantize_(model: nn.Module, config: QuantConfig, filter_fn: FilterFn | None = None, *, module_swap: bool = False) -> nn.Module:
    """Quantize ``model`` in place as ``config`` says and return it.

    Args:
        model: any nn.Module; its structure is kept (weights become tensor subclasses).
        config: a config instance such as ``Int8WeightOnly()``.
        filter_fn: ``filter_fn(module, fqn) -> bool`` picks modules; default: every nn.Linear.
        module_swap: replace nn.Linear by :class:`QuantizedLinear` instead of swapping weights.

    Raises:
        TypeError: ``config`` is not a registered config instance.
        ValueError: a selected module or weight cannot take this config; the model is unchanged.

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
    handler = _HANDLERS.get(type(config))
    if handler is None:
        known = ", ".join(t.__name__ for t in _HANDLERS)
        raise TypeError(f"config must be an instance of one of {known}; received {type(config).__name__}")
    filter_fn = filter_fn or default_filter
    targets = [(fqn, m) for fqn, m in model.named_modules() if filter_fn(m, fqn)]
    if not targets:
        warnings.warn(f"quantize_ with {config}: filter_fn selected no module, the model is unchanged", stacklevel=2)
        return model
    handler.validate(targets, config, module_swap)
    handler.apply(model, targets, config, module_swap)
    return model


CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def conv_layout(module: nn.Module) -> dict:
    """``quantize_weight`` arguments for a conv weight: one scale per output channel (axis 0 for Conv
    (C_out, C_in/g, *k); axis 1 within each group for ConvTranspose (C_in, C_out/g, *k)) and the
    conv's groups. Empty for other modules."""
    shape = tuple(module.weight.shape)
    if isinstance(module, CONVS):
        return {"block_size": (1,) + shape[1:], "groups": module.groups}
    if isinstance(module, CONV_TRANSPOSES):
        return {"block_size": (shape[0] // module.groups, 1) + shape[2:], "groups": module.groups}
    return {}


class WeightHandler:
    """Weight-only, dynamic and static configs on the ``weight`` of nn.Linear, nn.Embedding (weight-only
    configs), Conv/ConvTranspose (configs with ``supports_conv``) and of any module a filter_fn selects
    that uses a 2-D weight through ``F.linear``."""

    def validate(self, targets, config, module_swap):
        for fqn, module in targets:
            name = f"{fqn}.weight" if fqn else "weight"
            weight = getattr(module, "weight", None)
            conv = isinstance(module, CONVS + CONV_TRANSPOSES)
            if module_swap and not isinstance(module, nn.Linear):
                raise ValueError(f"module_swap replaces nn.Linear only; filter_fn selected {fqn!r} of type {type(module).__name__}")
            if isinstance(module, nn.Embedding) and not config.supports_embedding:
                raise ValueError(f"{type(config).__name__} quantizes linear weights only; filter_fn selected the nn.Embedding {fqn!r}")
            if conv and (not config.supports_conv or getattr(config, "group_size", None)):
                raise ValueError(f"{config.label()} does not quantize convolutions (per-channel int8/float8 weight-only and "
                                 f"static configs do); filter_fn selected {fqn!r} of type {type(module).__name__}")
            if conv and isinstance(weight, torch.Tensor) and not isinstance(weight, QuantizedTensor):
                if weight.dtype not in _FLOAT_DTYPES:
                    raise ValueError(f"{name}: expected a float32/bfloat16/float16 weight; received {weight.dtype}")
                check_finite(weight.detach(), name)
                continue
            if not isinstance(weight, torch.Tensor):
                raise ValueError(
                    f"{type(config).__name__} quantizes the 2-D `weight` of nn.Linear, nn.Embedding or a module using it "
                    f"through F.linear; filter_fn selected {fqn!r} of type {type(module).__name__}, which has no weight tensor"
                )
            if isinstance(weight, QuantizedTensor):
                raise ValueError(f"{name} is already quantized ({type(weight).__name__}); expected a float weight")
            if weight.dtype not in _FLOAT_DTYPES or weight.dim() != 2:
                raise ValueError(f"{name}: expected a 2-D float32/bfloat16/float16 weight; received {weight.dtype} of shape {tuple(weight.shape)}")
            config.check_weight(weight, name)
            check_finite(weight.detach(), name)
            if isinstance(module, nn.Embedding):
                select_kernel("embedding", config.scheme, weight.device.type, "auto")
            else:
                planned = {"shape": tuple(weight.shape), "block_size": config.block_size_for(weight.shape), "qtype": config.qtype}
                select_kernel("linear", config.scheme, weight.device.type, config.kernel, layout(planned))

    def apply(self, model, targets, config, module_swap):
        done: dict[int, nn.Parameter] = {}  # tied weights are quantized once and stay tied
        for fqn, module in targets:
            if module_swap:
                swapped = QuantizedLinear.from_float(module, config)
                swapped.lowbit_config = config.label()  # the label lowbit.save records
                set_submodule(model, fqn, swapped)
                continue
            key = id(module.weight)
            if key not in done:
                with torch.no_grad():
                    qweight = config.quantize_weight(module.weight.detach(), f"{fqn}.weight", **conv_layout(module))
                done[key] = nn.Parameter(qweight, requires_grad=False)
            module.weight = done[key]
            module.lowbit_config = config.label()


def set_submodule(model: nn.Module, fqn: str, new: nn.Module) -> None:
    if not fqn:
        raise ValueError("module_swap cannot replace the root module itself; wrap it in a container")
    parent, _, name = fqn.rpartition(".")
    setattr(model.get_submodule(parent), name, new)


for _config_type in CONFIGS:
    register_handler(_config_type)(WeightHandler)
