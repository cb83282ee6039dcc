"""Config labels in checkpoint headers: parsed strictly (never evaluated) and checked against the tensor.

A label is what :meth:`QuantConfig.label` writes, e.g. ``Int4WeightOnly(group_size=32)`` or
``StaticFloat8(float8_dtype=torch.float8_e5m2)``: a known config class called with keyword arguments
whose values are ``None``, ``True``, ``False``, ints, floats, single-quoted strings or torch dtypes.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from ..configs import CONFIGS, STATIC_CONFIGS, Float8DynamicActivation, Int8DynamicActivation, QuantConfig
from ..tensors import ActivationQuant
from .codec import Node
from .container import CheckpointError, shown

CONFIG_CLASSES = {cls.__name__: cls for cls in CONFIGS + STATIC_CONFIGS}
MAX_LABEL = 1000  # characters; lowbit's labels are far shorter
_CALL = re.compile(r"([A-Za-z_]\w*)\((.*)\)", re.DOTALL)
_ARGUMENT = re.compile(r"([A-Za-z_]\w*)=(None|True|False|'[^'\\]*'|-?\d+(?:\.\d+)?(?:e[-+]?\d+)?|torch\.\w+)")
_TORCH_DTYPES = {str(v): v for v in vars(torch).values() if isinstance(v, torch.dtype)}
_CONSTANTS = {"None": None, "True": True, "False": False}
_ANNOTATIONS = {  # a config field's annotation (a string) -> whether a parsed value has that type
    "None": lambda v: v is None, "bool": lambda v: type(v) is bool, "int": lambda v: type(v) is int,
    "float": lambda v: type(v) in (int, float), "str": lambda v: type(v) is str,
    "torch.dtype": lambda v: isinstance(v, torch.dtype),
}


def parse_label(label: str, where: str) -> QuantConfig:
    """The config a label names, constructed (and so validated) with its arguments.

    Raises:
        CheckpointError: not a call of a known config class with keyword arguments of the field types.

    Example:
        >>> parse_label("Int4WeightOnly(group_size=32)", "tensor 'fc.weight'")
        Int4WeightOnly(group_size=32, symmetric=False, kernel='auto')
    """
    where = f"{where}: field 'config'"
    call = _CALL.fullmatch(label) if len(label) <= MAX_LABEL else None
    cls = CONFIG_CLASSES.get(call.group(1)) if call else None
    if cls is None:
        raise CheckpointError(f"{where}: expected a label such as 'Int8WeightOnly()' naming one of {sorted(CONFIG_CLASSES)}; "
                              f"received {shown(label)}")
    kwargs, text, position = {}, call.group(2), 0
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    while position < len(text):
        argument = _ARGUMENT.match(text, position)
        if argument is None or argument.group(1) in kwargs:
            raise CheckpointError(f"{where}: expected keyword arguments name=value (each once) with None, a bool, number, "
                                  f"quoted string or torch dtype; received {shown(label)}")
        name, value = argument.group(1), _value(argument.group(2), where)
        if name not in types or not any(_ANNOTATIONS[t.strip()](value) for t in types[name].split("|")):
            expected = f"a {types[name]}" if name in types else f"one of the fields {list(types)}"
            raise CheckpointError(f"{where}: argument {name!r} of {cls.__name__}: expected {expected}; received {value!r}")
        kwargs[name], position = value, argument.end()
        if position < len(text):
            if not text.startswith(", ", position) or position + 2 == len(text):
                raise CheckpointError(f"{where}: expected ', ' between arguments; received {shown(label)}")
            position += 2
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{where}: invalid {cls.__name__}: {error}") from None


def _value(token: str, where: str):
    if token in _CONSTANTS:
        return _CONSTANTS[token]
    if token.startswith("'"):
        return token[1:-1]
    if token.startswith("torch."):
        if token not in _TORCH_DTYPES:
            raise CheckpointError(f"{where}: expected a torch dtype; received {token!r}")
        return _TORCH_DTYPES[token]
    return float(token) if "." in token or "e" in token else int(token)


def check_label(label: str, node: Node, where: str) -> None:
    """Raise CheckpointError unless the config ``label`` names would have made ``node``'s tensor: the same
    scheme (so class), qtype, block size, activation quantization and smoothing."""
    config = parse_label(label, where)
    weight = node.fields.get("weight", node)
    smoothing = getattr(config, "smoothing", None) is not None
    checks = (  # (what, what the config allows, what the tensor has)
        ("scheme", (config.scheme,), node.scheme),
        ("qtype", (config.qtype,), weight.meta["qtype"]),
        ("block_size", _block_sizes(config, weight.shape, weight.meta.get("groups")), weight.meta["block_size"]),
        ("activation", (_activation(config),), node.meta.get("activation")),
        ("act_smooth", ("present", "absent") if smoothing else ("absent",), "present" if "act_smooth" in node.fields else "absent"),
    )
    for what, allowed, received in checks:
        if received not in allowed:
            expected = " or ".join(map(str, allowed)) if allowed else "none (it does not quantize such a weight)"
            raise CheckpointError(f"{where}: field 'config': the label {label!r} gives {what} {expected}; the tensor has "
                                  f"{what} {received}")


def _block_sizes(config: QuantConfig, shape: tuple[int, ...], groups: int | None) -> tuple[tuple[int, ...], ...]:
    """The block sizes ``config`` may give a weight of ``shape``: per group or channel for a linear or embedding
    weight (or its transpose: transformers' Conv1D stores (in, out)), one block per output channel of a Conv or
    ConvTranspose weight (as api.conv_layout does)."""
    if groups is not None:
        if not config.supports_conv or getattr(config, "group_size", None):
            return ()
        return (1, *shape[1:]), (shape[0] // groups, 1, *shape[2:])
    sizes = []
    for flip in (False, True) if len(shape) == 2 else (False,):
        try:
            block = tuple(config.block_size_for(shape[::-1] if flip else shape))
        except ValueError:  # the group size does not divide the shape
            continue
        sizes.append(block[::-1] if flip else block)
    return tuple(sizes)


def _activation(config: QuantConfig) -> ActivationQuant | None:
    """How ``config`` quantizes activations (None: weight-only)."""
    if isinstance(config, STATIC_CONFIGS):
        return ActivationQuant(config.act_qtype, "per_tensor", config.act_symmetric)
    if isinstance(config, Float8DynamicActivation):
        return ActivationQuant(config.qtype, "per_token" if config.granularity == "per_row" else "per_tensor", True)
    if isinstance(config, Int8DynamicActivation):
        return ActivationQuant("int8", "per_token", config.act_symmetric)
    return None
