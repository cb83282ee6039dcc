"""Static quantization in eager mode: ``prepare`` attaches observers, ``calibrate`` runs data through
the model, ``convert`` freezes the observed activation scales into the weights.

The model keeps its structure: a converted nn.Linear is still an nn.Linear whose weight is a
:class:`~lowbit.tensors.StaticActivationTensor` (``convert(..., module_swap=True)`` gives
:class:`~lowbit.QuantizedLinear` modules instead, with identical outputs).
"""

from __future__ import annotations

import sys
from typing import Iterable

import torch
import torch.nn as nn

from ..api import FilterFn, WeightHandler, set_submodule, conv_layout, default_filter
from ..configs import STATIC_CONFIGS, QuantConfig
from ..modules import QuantizedLinear
from ..primitives.affine import check_finite
from ..tensors import ActivationQuant, StaticActivationTensor
from .observers import OBSERVERS, MinMaxObserver, NotCalibratedError, PerChannelMinMaxObserver

OBSERVER_ATTR = "lowbit_observer"
CHANNEL_OBSERVER_ATTR = "lowbit_channel_observer"


def prepare(model: nn.Module, config: QuantConfig, filter_fn: FilterFn | None = None) -> nn.Module:
    """Attach an activation observer to the input of every selected layer (in place): nn.Linear by
    default; pass a filter_fn to include Conv/ConvTranspose layers.

    Example:
        >>> import lowbit
        >>> model = nn.Sequential(nn.Linear(16, 8))
        >>> _ = lowbit.prepare(model, lowbit.StaticInt8())
        >>> hasattr(model[0], "lowbit_observer")
        True
    """
    if not isinstance(config, STATIC_CONFIGS):
        names = ", ".join(c.__name__ for c in STATIC_CONFIGS)
        raise TypeError(f"prepare takes a static config ({names}); received {type(config).__name__}")
    targets = [(fqn, m) for fqn, m in model.named_modules() if (filter_fn or default_filter)(m, fqn)]
    if not targets:
        raise ValueError(f"prepare with {config.label()}: filter_fn selected no module")
    already = [fqn for fqn, m in targets if hasattr(m, OBSERVER_ATTR)]
    if already:
        raise ValueError(f"modules {already[:5]} are already prepared; call lowbit.convert or start from a float model")
    WeightHandler().validate(targets, config, module_swap=False)
    for _, module in targets:
        module.add_module(OBSERVER_ATTR, OBSERVERS[config.observer](config.act_qtype, config.act_symmetric))
        if config.smoothing is not None and isinstance(module, nn.Linear):  # smoothing: linear layers only
            module.add_module(CHANNEL_OBSERVER_ATTR, PerChannelMinMaxObserver(config.act_qtype, axis=-1))
        module._lowbit_static = (config, module.register_forward_pre_hook(_observe_input))
    return model


def _observe_input(module: nn.Module, args) -> None:
    getattr(module, OBSERVER_ATTR)(args[0])
    if hasattr(module, CHANNEL_OBSERVER_ATTR):
        getattr(module, CHANNEL_OBSERVER_ATTR)(args[0])


def _smoothing(module: nn.Module, config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SmoothQuant factors s (K,), the smoothed weight W * s and the range (lo, hi) of x / s."""
    channels = getattr(module, CHANNEL_OBSERVER_ATTR)
    weight = module.weight.detach().float()
    act_max = torch.maximum(channels.max_val.abs(), channels.min_val.abs())  # (K,)
    weight_max = weight.abs().amax(0)  # (K,)
    alpha = config.smoothing
    s = act_max.clamp(min=1e-5) ** alpha / weight_max.clamp(min=1e-5) ** (1 - alpha)
    s = torch.where((act_max > 0) & (weight_max > 0), s, torch.ones_like(s))
    return s, (weight * s).to(module.weight.dtype), ((channels.min_val / s).min(), (channels.max_val / s).max())


def _prepared(model: nn.Module) -> list[tuple[str, nn.Module]]:
    found = [(fqn, m) for fqn, m in model.named_modules() if hasattr(m, OBSERVER_ATTR)]
    if not found and not _calibrating(model):
        raise ValueError("the model has no observers: call lowbit.prepare(model, config) first")
    return found


def _calibrating(model: nn.Module) -> list[nn.Module]:
    """Modules that observe their own inputs until frozen (``calibrating`` and ``freeze()``, e.g.
    :class:`lowbit.attention.QuantizedSDPA`)."""
    return [m for m in model.modules() if getattr(m, "calibrating", False) and hasattr(m, "freeze")]


def _progress(iterable, total: int | None, enabled: bool):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        return iterable
    return tqdm(iterable, total=total, desc="calibrating", unit="batch", file=sys.stderr)


def calibrate(model: nn.Module, data: Iterable, max_batches: int | None = None, progress: bool = True) -> int:
    """Run ``data`` through a prepared model in eval mode, without gradients; return the batch count.

    Each batch is passed as ``model(**batch)`` for a dict, ``model(*batch)`` for a tuple or list,
    and ``model(batch)`` otherwise.
    """
    _prepared(model)
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be a positive int or None; received {max_batches}")
    total = max_batches if max_batches is not None else (len(data) if hasattr(data, "__len__") else None)
    was_training = model.training
    model.eval()
    count = 0
    with torch.inference_mode():
        for batch in _progress(data, total, progress):
            if max_batches is not None and count >= max_batches:
                break
            if isinstance(batch, dict):
                model(**batch)
            elif isinstance(batch, (tuple, list)):
                model(*batch)
            else:
                model(batch)
            count += 1
    model.train(was_training)
    return count


def convert(model: nn.Module, module_swap: bool = False) -> nn.Module:
    """Freeze observed activation scales and quantize the weights of every prepared layer (in place).
    With ``module_swap`` the linear layers become :class:`~lowbit.QuantizedLinear` (convolutions keep
    their quantized weight).

    Raises:
        NotCalibratedError: a layer's observer saw no data; nothing is changed.
    """
    prepared, self_observing = _prepared(model), _calibrating(model)
    blind = [fqn for fqn, m in prepared if not getattr(m, OBSERVER_ATTR).observed]
    blind += [fqn for fqn, m in model.named_modules() if m in self_observing and not all(o.observed for o in m.observers)]
    if blind:
        raise NotCalibratedError(
            f"no activations were observed for {blind[:5]}{' ...' if len(blind) > 5 else ''}: "
            f"run lowbit.calibrate(model, data) with data that reaches these layers first"
        )
    planned = []
    for fqn, module in prepared:  # quantize everything before changing anything
        config = module._lowbit_static[0]
        check_finite(module.weight.detach(), f"{fqn}.weight")
        observer, smooth, weight = getattr(module, OBSERVER_ATTR), None, module.weight.detach()
        if hasattr(module, CHANNEL_OBSERVER_ATTR):
            smooth, weight, (lo, hi) = _smoothing(module, config)
            observer = MinMaxObserver(config.act_qtype, config.act_symmetric)
            observer.update(lo, hi)
        scale, zero_point = observer.calculate_qparams()
        activation = ActivationQuant(config.act_qtype, "per_tensor", config.act_symmetric)
        with torch.no_grad():
            qweight = config.quantize_weight(weight, f"{fqn}.weight", **conv_layout(module))
        planned.append((fqn, module, StaticActivationTensor.wrap_static(qweight, activation, scale.float(), zero_point, smooth)))
    for module in self_observing:
        module.freeze()
    for fqn, module, qweight in planned:
        label = module._lowbit_static[0].label()  # recorded by lowbit.save
        module._lowbit_static[1].remove()
        del module._lowbit_static
        delattr(module, OBSERVER_ATTR)
        if hasattr(module, CHANNEL_OBSERVER_ATTR):
            delattr(module, CHANNEL_OBSERVER_ATTR)
        if module_swap and isinstance(module, nn.Linear):
            module = QuantizedLinear.from_quantized_weight(module, qweight)
            set_submodule(model, fqn, module)
        else:
            module.weight = nn.Parameter(qweight, requires_grad=False)
        module.lowbit_config = label
    return model
