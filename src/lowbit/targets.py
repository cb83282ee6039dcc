"""What a flow quantizes in a model: target selection (filter_fn, tied weights), per-module weight layouts, and
validation of a config against every target before anything changes. Shared by ``quantize_`` and the static
flow (and the coming QAT and export flows), so they select and refuse the same modules.
"""

from __future__ import annotations

import sys
import warnings
from typing import Callable

import torch
import torch.nn as nn

from .configs import QuantConfig
from .kernels.registry import select_kernel
from .primitives.affine import check_finite
from .tensors.base import QuantizedTensor

FilterFn = Callable[[nn.Module, str], bool]
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OBSERVER_ATTR = "lowbit_observer"  # the activation observer lowbit.prepare attaches to each layer it prepares
QAT_ATTR = "lowbit_qat"  # the base config QAT's prepare step records on each layer it prepares
ALGORITHM_ATTR = "lowbit_algorithm"  # a data-driven weight algorithm's state (lowbit.algorithms.flow) until convert


def refuse_prepared(model: nn.Module, action: str) -> None:
    """Raise ValueError if a flow prepared modules of ``model`` and has not converted them yet: static (observers),
    a data-driven weight algorithm, or QAT (fake quantizers)."""
    static = [fqn or "<root>" for fqn, m in model.named_modules() if hasattr(m, OBSERVER_ATTR)]
    qat = [fqn or "<root>" for fqn, m in model.named_modules() if hasattr(m, QAT_ATTR)]
    algorithm = [fqn or "<root>" for fqn, m in model.named_modules() if hasattr(m, ALGORITHM_ATTR)]
    if algorithm:
        raise ValueError(f"the model is prepared for a data-driven weight algorithm (on {algorithm[:5]}): finish with "
                         f"lowbit.calibrate and lowbit.convert, or start from the float model, before {action}")
    if static:
        raise ValueError(f"the model is prepared for static quantization (observers on {static[:5]}): finish with "
                         f"lowbit.calibrate and lowbit.convert, or start from the float model, before {action}")
    if qat:
        raise ValueError(f"the model is prepared for QAT (fake quantizers on {qat[:5]}): finish with "
                         f"quantize_(model, QATConfig(base_config, step='convert')), or start from the float model, "
                         f"before {action}")


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


def select_targets(model: nn.Module, filter_fn: FilterFn | None, config: QuantConfig,
                   per_layer_state: str | None = None, stacklevel: int = 3) -> list[tuple[str, nn.Module]]:
    """The modules ``filter_fn`` selects (default: :func:`default_filter`), in model order, with tied weights kept
    tied, warning about what is left float.

    A weight shared by a selected module and others joins them all to the selection when ``config`` quantizes
    each of them; the modules sharing it are dropped with a warning when one cannot take ``config`` or when
    ``per_layer_state`` says why each layer needs a weight of its own (module swap, static activation scales).
    Warnings point ``stacklevel`` frames up (the user's call of the public function that selects).
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
        warnings.warn(f"{' and '.join(map(repr, names))} are one tied weight: they stay float and tied, as {reason}", stacklevel=stacklevel)
    order = {id(m): i for i, (_, m) in enumerate(model.named_modules())}
    targets = sorted(selected.values(), key=lambda target: order[id(target[1])])
    if filter_fn is None:
        _warn_left_float(model, {id(m) for _, m in targets} | kept_float, stacklevel + 1)
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


def _warn_left_float(model: nn.Module, handled: set[int], stacklevel: int) -> None:
    left = [f"{fqn} ({type(m).__name__})" for fqn, m in model.named_modules()
            if id(m) not in handled and not isinstance(m, nn.Embedding) and _float_matrix(getattr(m, "weight", None))]
    if left:
        warnings.warn(f"the default filter quantizes nn.Linear and transformers Conv1D layers; {len(left)} other modules "
                      f"with 2-D weights stay float: {left[:5]}{' ...' if len(left) > 5 else ''}. Pass a filter_fn that "
                      f"selects them to quantize them (as linear weights, applied through F.linear)", stacklevel=stacklevel)


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
    if isinstance(module, CONVS + CONV_TRANSPOSES) and not config.supports_conv:
        return f"{config.label()} does not quantize convolutions (per-channel int8/intx/float8 weight-only and static configs do)"
    if isinstance(module, CONVS + CONV_TRANSPOSES) and getattr(config, "group_size", None):
        return (f"{config.label()} does not quantize convolutions with a group size: convolution weights take one scale "
                f"per output channel; pass group_size=None")
    return None


def validate_targets(targets: list[tuple[str, nn.Module]], config: QuantConfig, module_swap: bool) -> None:
    """Raise ValueError unless ``config`` can quantize the ``weight`` of every target: nn.Linear, transformers
    Conv1D, nn.Embedding (weight-only configs), Conv/ConvTranspose (configs with ``supports_conv``) and any module
    a filter_fn selects that uses a 2-D weight through ``F.linear``. Nothing is changed."""
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
            planned = {"shape": tuple(weight.shape), "block_size": conv_layout(module)["block_size"], "qtype": config.qtype}
            select_kernel("conv", config.scheme, weight.device.type, config.kernel, planned)  # the kernel the weight packs for
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
            activation = getattr(config.spec().activation, "quant", None)  # what the call's kernels are judged on
            select_kernel("linear", config.scheme, weight.device.type, config.kernel, {**planned, "activation": activation})


def set_submodule(model: nn.Module, fqn: str, new: nn.Module) -> None:
    if not fqn:
        raise ValueError("module_swap cannot replace the root module itself; wrap it in a container")
    parent, _, name = fqn.rpartition(".")
    setattr(model.get_submodule(parent), name, new)
