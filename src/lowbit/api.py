"""``quantize_``: validate the whole config against the whole model, then quantize in place.

Handlers are looked up by config type; a handler validates every target module first and only
then changes the model, so an error never leaves a model half-quantized.
"""

from __future__ import annotations

import sys
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
OBSERVER_ATTR = "lowbit_observer"  # the activation observer lowbit.prepare attaches to each layer it prepares


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


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2): a linear layer that stores its weight as
    (in, out) and computes ``addmm(bias, x, weight)``. No Conv1D exists unless transformers is imported."""
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return conv1d is not None and isinstance(module, conv1d)


def default_filter(module: nn.Module, fqn: str) -> bool:
    """Quantize every nn.Linear and transformers ``Conv1D`` (pass a filter_fn to include nn.Embedding or
    convolutions, or to skip layers)."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """``module.weight`` as a linear weight (out, in): a contiguous transposed copy for a Conv1D."""
    return module.weight.t().contiguous() if is_conv1d(module) else module.weight


def module_weight(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """A (quantized) linear weight (out, in) in the layout ``module`` stores: transposed (a view) for a Conv1D."""
    return weight.t() if is_conv1d(module) else weight


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
    handler = _HANDLERS.get(type(config))
    if handler is None:
        known = ", ".join(t.__name__ for t in _HANDLERS)
        raise TypeError(f"config must be an instance of one of {known}; received {type(config).__name__}")
    prepared = [fqn or "<root>" for fqn, m in model.named_modules() if hasattr(m, OBSERVER_ATTR)]
    if prepared:
        raise ValueError(f"the model is prepared for static quantization (observers on {prepared[:5]}): finish with "
                         f"lowbit.calibrate and lowbit.convert, or start from the float model, before quantize_")
    targets = select_targets(model, filter_fn, config, "module_swap gives each layer its own buffers" if module_swap else None)
    if not targets:
        warnings.warn(f"quantize_ with {config}: filter_fn selected no module, the model is unchanged", stacklevel=2)
        return model
    handler.validate(targets, config, module_swap)
    handler.apply(model, targets, config, module_swap)
    return model


def select_targets(model: nn.Module, filter_fn: FilterFn | None, config: QuantConfig,
                   per_layer_state: str | None = None) -> list[tuple[str, nn.Module]]:
    """The modules ``filter_fn`` selects (default: :func:`default_filter`), in model order, with tied weights kept
    tied, warning about what is left float.

    A weight shared by a selected module and others joins them all to the selection when ``config`` quantizes
    each of them; the modules sharing it are dropped with a warning when one cannot take ``config`` or when
    ``per_layer_state`` says why each layer needs a weight of its own (module swap, static activation scales).
    With the default filter, other modules holding 2-D float weights (nn.Embedding excepted: opt in by
    filter_fn) are named in a warning.
    """
    chosen = filter_fn or default_filter
    selected = {id(m): (fqn, m) for fqn, m in model.named_modules() if chosen(m, fqn)}
    kept_float: set[int] = set()
    for group in _shared_weights(model):
        if not any(id(m) in selected and attr == "weight" for _, m, attr in group):
            continue
        reason = per_layer_state or _tie_conflict(group, selected, config)
        names = [f"{fqn}.{attr}" if fqn else attr for fqn, _, attr in group]
        if reason is None:
            selected.update((id(m), (fqn, m)) for fqn, m, _ in group)
            continue
        for _, module, _ in group:
            selected.pop(id(module), None)
            kept_float.add(id(module))
        warnings.warn(f"{' and '.join(map(repr, names))} are one tied weight: they stay float and tied, as {reason}", stacklevel=3)
    order = {id(m): i for i, (_, m) in enumerate(model.named_modules())}
    targets = sorted(selected.values(), key=lambda target: order[id(target[1])])
    if filter_fn is None:
        _warn_left_float(model, {id(m) for _, m in targets} | kept_float)
    return targets


def _shared_weights(model: nn.Module) -> list[list[tuple[str, nn.Module, str]]]:
    """Parameters held in more than one place, each as ``(fqn, module, attribute)`` per distinct holder."""
    holders: dict[int, dict] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        fqn, _, attr = name.rpartition(".")
        module = model.get_submodule(fqn)
        holders.setdefault(id(param), {}).setdefault((id(module), attr), (fqn, module, attr))
    return [list(places.values()) for places in holders.values() if len(places) > 1]


def _tie_conflict(group, selected, config) -> str | None:
    """Why one quantized weight cannot serve every holder in ``group``, or None."""
    for fqn, module, attr in group:
        if attr != "weight":
            return f"{fqn}.{attr} is not a layer's weight" if fqn else f"{attr} is not a layer's weight"
        reason = None if id(module) in selected else unsupported_kind(module, config, module_swap=False)
        if reason is not None:
            return f"{reason} ({fqn!r})"
    return None


def _warn_left_float(model: nn.Module, handled: set[int]) -> None:
    left = [f"{fqn} ({type(m).__name__})" for fqn, m in model.named_modules()
            if id(m) not in handled and not isinstance(m, nn.Embedding) and _float_matrix(getattr(m, "weight", None))]
    if left:
        warnings.warn(f"the default filter quantizes nn.Linear and transformers Conv1D layers; {len(left)} other modules "
                      f"with 2-D weights stay float: {left[:5]}{' ...' if len(left) > 5 else ''}. Pass a filter_fn that "
                      f"selects them to quantize them (as linear weights, applied through F.linear)", stacklevel=4)


def _float_matrix(weight) -> bool:
    return (isinstance(weight, torch.Tensor) and not isinstance(weight, QuantizedTensor) and weight.dim() == 2
            and weight.dtype in _FLOAT_DTYPES)


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


def unsupported_kind(module: nn.Module, config: QuantConfig, module_swap: bool) -> str | None:
    """Why ``config`` does not quantize layers of ``module``'s kind, or None."""
    if module_swap and not isinstance(module, nn.Linear):
        return "module_swap replaces nn.Linear only" + (" (quantize Conv1D without module_swap)" if is_conv1d(module) else "")
    if isinstance(module, nn.Embedding) and not config.supports_embedding:
        return f"{type(config).__name__} quantizes linear weights only, not nn.Embedding"
    if isinstance(module, CONVS + CONV_TRANSPOSES) and (not config.supports_conv or getattr(config, "group_size", None)):
        return f"{config.label()} does not quantize convolutions (per-channel int8/float8 weight-only and static configs do)"
    return None


def quantize_module_weight(module: nn.Module, config: QuantConfig, name: str) -> torch.Tensor:
    """``module``'s weight quantized as ``config`` says, in the layout the module stores."""
    weight = linear_weight(module).detach()
    return module_weight(module, config.quantize_weight(weight, name, **conv_layout(module)))


class WeightHandler:
    """Weight-only, dynamic and static configs on the ``weight`` of nn.Linear, transformers Conv1D,
    nn.Embedding (weight-only configs), Conv/ConvTranspose (configs with ``supports_conv``) and of any
    module a filter_fn selects that uses a 2-D weight through ``F.linear``."""

    def validate(self, targets, config, module_swap):
        for fqn, module in targets:
            name = f"{fqn}.weight" if fqn else "weight"
            weight = getattr(module, "weight", None)
            conv = isinstance(module, CONVS + CONV_TRANSPOSES)
            reason = unsupported_kind(module, config, module_swap)
            if reason is not None:
                raise ValueError(f"{reason}; filter_fn selected {fqn!r} of type {type(module).__name__}")
            if not isinstance(weight, torch.Tensor):
                raise ValueError(
                    f"{type(config).__name__} quantizes the 2-D `weight` of nn.Linear, nn.Embedding or a module using it "
                    f"through F.linear; filter_fn selected {fqn!r} of type {type(module).__name__}, which has no weight tensor"
                )
            if isinstance(weight, QuantizedTensor):
                raise ValueError(f"{name} is already quantized ({type(weight).__name__}); expected a float weight")
            if weight.device.type == "meta":
                raise ValueError(f"{name} is on the meta device: meta weights hold no values and cannot be quantized; to "
                                 f"get a quantized model without float weights, build it on the meta device and fill it "
                                 f"from a checkpoint written by lowbit.save with lowbit.load(model, file)")
            if conv:
                if weight.dtype not in _FLOAT_DTYPES:
                    raise ValueError(f"{name}: expected a float32/bfloat16/float16 weight; received {weight.dtype}")
                check_finite(weight.detach(), name)
                continue
            if weight.dtype not in _FLOAT_DTYPES or weight.dim() != 2:
                raise ValueError(f"{name}: expected a 2-D float32/bfloat16/float16 weight; received {weight.dtype} of shape {tuple(weight.shape)}")
            linear = weight.t() if is_conv1d(module) else weight  # (out, in)
            config.check_weight(linear, name)
            check_finite(weight.detach(), name)
            if isinstance(module, nn.Embedding):
                select_kernel("embedding", config.scheme, weight.device.type, "auto")
            else:
                planned = {"shape": tuple(linear.shape), "block_size": config.block_size_for(linear.shape), "qtype": config.qtype}
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
                    done[key] = nn.Parameter(quantize_module_weight(module, config, f"{fqn}.weight"), requires_grad=False)
            module.weight = done[key]
            module.lowbit_config = config.label()


def set_submodule(model: nn.Module, fqn: str, new: nn.Module) -> None:
    if not fqn:
        raise ValueError("module_swap cannot replace the root module itself; wrap it in a container")
    parent, _, name = fqn.rpartition(".")
    setattr(model.get_submodule(parent), name, new)


for _config_type in CONFIGS:
    register_handler(_config_type)(WeightHandler)
