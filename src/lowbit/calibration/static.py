"""Static quantization in eager mode: ``prepare`` attaches observers, ``calibrate`` runs data through
the model, ``convert`` freezes the observed activation scales into the weights.

With smoothing (SmoothQuant), a linear layer's activation is quantized as ``x / s`` with per-channel
factors ``s`` that depend on the per-channel ranges of all calibration data. ``calibrate`` therefore
runs the data twice: the first pass records those ranges and fixes ``s``, the second lets the
configured observer watch ``x / s``, so its range is the one the quantizer will see.

The model keeps its structure: a converted nn.Linear is still an nn.Linear whose weight is a
:class:`~lowbit.tensors.StaticActivationTensor` (``convert(..., module_swap=True)`` gives
:class:`~lowbit.QuantizedLinear` modules instead, with identical outputs).
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Iterable

import torch
import torch.nn as nn

from ..algorithms.blocks import progress as show_progress
from ..algorithms.flow import calibrate_algorithm, convert_algorithm, prepare_algorithm, prepared_layers
from ..algorithms.smoothquant import smoothing_factors
from ..configs import STATIC_CONFIGS, QuantConfig
from ..modules import QuantizedLinear
from ..primitives.affine import check_finite
from ..targets import (
    ALGORITHM_ATTR, OBSERVER_ATTR, QAT_ATTR, FilterFn, conv_layout, is_conv1d, linear_weight, module_weight, select_targets, set_submodule,
    refuse_prepared, validate_targets,
)
from ..tensors.from_spec import quantize_block, with_static_activation
from ..specs import ActivationSpec
from .observers import OBSERVERS, NotCalibratedError, Observer, PerChannelMinMaxObserver

CHANNEL_OBSERVER_ATTR = "lowbit_channel_observer"  # until the smoothing factors are fixed
SMOOTHING_ATTR = "lowbit_smoothing"  # the fixed smoothing factors s (K,)


def prepare(model: nn.Module, config: QuantConfig, filter_fn: FilterFn | None = None) -> nn.Module:
    """Attach an activation observer to the input of every selected layer (in place): nn.Linear and
    transformers Conv1D by default; pass a filter_fn to include Conv/ConvTranspose layers. Layers sharing
    a weight with another module stay float (with a warning): each needs its own activation scale.

    Example:
        >>> import lowbit
        >>> model = nn.Sequential(nn.Linear(16, 8))
        >>> _ = lowbit.prepare(model, lowbit.StaticInt8())
        >>> hasattr(model[0], "lowbit_observer")
        True
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"prepare takes a lowbit config; received {type(config).__name__}")
    if not isinstance(config, STATIC_CONFIGS):
        if not config.spec().weight.data_driven:
            names = ", ".join(c.__name__ for c in STATIC_CONFIGS)
            raise TypeError(f"prepare takes a static config ({names}) or one with a data-driven algorithm (gptq, awq, "
                            f"smoothquant); received {config.label()}: apply it with lowbit.quantize_")
        return prepare_algorithm(model, config, filter_fn)
    if any(hasattr(m, QAT_ATTR) or hasattr(m, ALGORITHM_ATTR) for m in model.modules()):
        refuse_prepared(model, "lowbit.prepare")
    targets = select_targets(model, filter_fn, config, "static quantization gives each layer its own activation scale")
    if not targets:
        raise ValueError(f"prepare with {config.label()}: filter_fn selected no module")
    already = [fqn for fqn, m in targets if hasattr(m, OBSERVER_ATTR)]
    if already:
        raise ValueError(f"modules {already[:5]} are already prepared; call lowbit.convert or start from a float model")
    validate_targets(targets, config, module_swap=False)
    spec = config.spec()
    for _, module in targets:
        module.add_module(OBSERVER_ATTR, observer_for(spec.activation))
        if spec.activation.smoothing is not None and (isinstance(module, nn.Linear) or is_conv1d(module)):  # linear layers only
            module.add_module(CHANNEL_OBSERVER_ATTR, PerChannelMinMaxObserver(spec.activation.qtype, axis=-1))
        module._lowbit_static = (config, module.register_forward_pre_hook(_observe_input))
    return model


def observer_for(activation: ActivationSpec) -> Observer:
    """The observer a static activation spec names, for its qtype and symmetry."""
    return OBSERVERS[activation.observer](activation.qtype, activation.symmetric)


def _observe_input(module: nn.Module, args) -> None:
    x = args[0]
    if hasattr(module, CHANNEL_OBSERVER_ATTR):  # smoothing factors not fixed yet: per-channel ranges only
        getattr(module, CHANNEL_OBSERVER_ATTR)(x)
        return
    smoothing = getattr(module, SMOOTHING_ATTR, None)
    getattr(module, OBSERVER_ATTR)(x if smoothing is None else x / smoothing)


def _fix_smoothing(module: nn.Module) -> None:
    """Turn the first pass's per-channel ranges into the factors s; from now on the observer sees x / s."""
    channels = getattr(module, CHANNEL_OBSERVER_ATTR)
    if not channels.observed:  # no data reached the layer: convert reports it
        return
    act_max = torch.maximum(channels.max_val.abs(), channels.min_val.abs())  # (K,)
    weight_max = linear_weight(module).detach().float().abs().amax(0)  # (K,)
    module.register_buffer(SMOOTHING_ATTR, smoothing_factors(act_max, weight_max, module._lowbit_static[0].spec().activation.smoothing))
    delattr(module, CHANNEL_OBSERVER_ATTR)


@contextlib.contextmanager
def _observing_only(model: nn.Module, observers: list[Observer]):
    """Pause every other observer in ``model`` (prepared layers' and self-observing modules')."""
    paused = [m for m in model.modules() if isinstance(m, Observer) and m.enabled and not any(m is o for o in observers)]
    for observer in paused:
        observer.enabled = False
    try:
        yield
    finally:
        for observer in paused:
            observer.enabled = True


def _prepared(model: nn.Module) -> list[tuple[str, nn.Module]]:
    found = [(fqn, m) for fqn, m in model.named_modules() if hasattr(m, OBSERVER_ATTR)]
    if not found and not _calibrating(model):
        raise ValueError("the model has no observers: call lowbit.prepare(model, config) first")
    return found


def _calibrating(model: nn.Module) -> list[nn.Module]:
    """Modules that observe their own inputs until frozen (``calibrating`` and ``freeze()``, e.g.
    :class:`lowbit.attention.QuantizedSDPA`)."""
    return [m for m in model.modules() if getattr(m, "calibrating", False) and hasattr(m, "freeze")]


def calibrate(model: nn.Module, data: Iterable, max_batches: int | None = None, progress: bool = True) -> int:
    """Run ``data`` through a prepared model in eval mode, without gradients; return the batch count.

    Each batch is passed as ``model(**batch)`` for a dict, ``model(*batch)`` for a tuple or list,
    and ``model(batch)`` otherwise. Layers with smoothing take two passes over the data (a one-shot
    iterator is kept in memory for the second): the first fixes the smoothing factors s from the
    per-channel ranges, the second runs the observers (each sees ``x / s``). A later call keeps s
    and adds its data to the observed ranges.
    """
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be a positive int or None; received {max_batches}")
    if prepared_layers(model):
        return calibrate_algorithm(model, data, max_batches, progress)
    prepared = _prepared(model)
    unsmoothed = [m for _, m in prepared if hasattr(m, CHANNEL_OBSERVER_ATTR)]
    if unsmoothed:
        if iter(data) is data:
            data = list(itertools.islice(data, max_batches))
        with _observing_only(model, [getattr(m, CHANNEL_OBSERVER_ATTR) for m in unsmoothed]):
            _run(model, data, max_batches, progress, "smoothing")
        for module in unsmoothed:
            _fix_smoothing(module)
    return _run(model, data, max_batches, progress, "calibrating")


def _run(model: nn.Module, data: Iterable, max_batches: int | None, progress: bool, desc: str) -> int:
    total = max_batches if max_batches is not None else (len(data) if hasattr(data, "__len__") else None)
    was_training = model.training
    model.eval()
    count = 0
    with torch.inference_mode():
        for batch in show_progress(data, total, progress, desc, unit="batch"):
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
    if prepared_layers(model):
        if module_swap:
            raise ValueError("module_swap is for static configs; a data-driven algorithm's layers keep their modules")
        return convert_algorithm(model)
    prepared, self_observing = _prepared(model), _calibrating(model)
    blind = [fqn for fqn, m in prepared if not getattr(m, OBSERVER_ATTR).observed]
    blind += [fqn for fqn, m in model.named_modules() if m in self_observing and not all(o.observed for o in m.observers)]
    if blind:
        raise NotCalibratedError(
            f"no activations were observed for {blind[:5]}{' ...' if len(blind) > 5 else ''}: "
            f"run lowbit.calibrate(model, data) with data that reaches these layers first (layers with smoothing "
            f"observe only inside lowbit.calibrate, which fixes their smoothing factors first)"
        )
    planned = []
    for fqn, module in prepared:  # quantize everything before changing anything
        config = module._lowbit_static[0]
        spec = config.spec()
        check_finite(module.weight.detach(), f"{fqn}.weight")
        smooth, weight = getattr(module, SMOOTHING_ATTR, None), linear_weight(module).detach()
        if smooth is not None:
            weight = (weight.float() * smooth).to(weight.dtype)
        scale, zero_point = getattr(module, OBSERVER_ATTR).calculate_qparams()
        with torch.no_grad():
            block = quantize_block(weight, spec.weight, kernel=config.kernel, name=f"{fqn}.weight", **conv_layout(module))
        planned.append((fqn, module, with_static_activation(block, spec.activation, scale.float(), zero_point, smooth)))
    for module in self_observing:
        module.freeze()
    for fqn, module, qweight in planned:
        spec = module._lowbit_static[0].spec()  # recorded by lowbit.save
        module._lowbit_static[1].remove()
        del module._lowbit_static
        delattr(module, OBSERVER_ATTR)
        for name in (CHANNEL_OBSERVER_ATTR, SMOOTHING_ATTR):
            if hasattr(module, name):
                delattr(module, name)
        if module_swap and isinstance(module, nn.Linear):
            module = QuantizedLinear.from_quantized_weight(module, qweight)
            set_submodule(model, fqn, module)
        else:
            module.weight = nn.Parameter(module_weight(module, qweight), requires_grad=False)
        module.lowbit_spec = spec
    return model
