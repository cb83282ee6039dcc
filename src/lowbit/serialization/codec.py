"""Quantized tensors <-> header entries: a whitelist of lowbit classes, JSON-safe metadata, layout checks.

An entry names its class, outer shape and dtype, its metadata and its inner tensors; an inner tensor is
either the name of a tensor in the file or, for wrappers, a nested entry::

    {"class": "DynamicActivationTensor", "scheme": "int8_dynamic", "shape": [32, 64], "dtype": "float32",
     "meta": {"activation": {"ActivationQuant": {"qtype": "int8", ...}}},
     "tensors": {"weight": {"class": "Int8Tensor", ..., "tensors": {"qdata": "fc.weight::weight::qdata", ...}}}}

Only classes and metadata dataclasses listed here can be rebuilt: a file cannot name code to run.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..modules import QuantizedLinear
from ..primitives.qtypes import QTYPES
from ..tensors import (
    ActivationQuant, DynamicActivationTensor, Float8Tensor, Int4Tensor, Int8Tensor, QuantizedTensor,
    StaticActivationTensor,
)
from ..tensors.blockwise import PACKED_NAMES, BlockQuantizedTensor, with_packing
from .container import CheckpointError, StoredTensor

BLOCK_CLASSES = {cls.__name__: cls for cls in (Int8Tensor, Int4Tensor, Float8Tensor)}
WRAPPER_CLASSES = {cls.__name__: cls for cls in (DynamicActivationTensor, StaticActivationTensor)}
CLASSES = {**BLOCK_CLASSES, **WRAPPER_CLASSES}
WRAPPER_SUFFIXES = {"dynamic": DynamicActivationTensor, "static": StaticActivationTensor}  # of a scheme name
META_DATACLASSES = {"ActivationQuant": ActivationQuant}
SCHEME_QTYPES = {"int8": ("int8",), "int4": ("int4", "uint4"), "float8": ("float8_e4m3fn", "float8_e5m2")}
FLOAT_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.bfloat16, torch.float16)}
SEPARATOR = "::"  # file names of inner tensors: "<entry>::<field>[::<field>...]"


def pack(t: QuantizedTensor) -> QuantizedTensor:
    """Attach the packed layout of this machine's kernel, as quantizing does."""
    if isinstance(t, StaticActivationTensor):
        return StaticActivationTensor.wrap_static(t.weight, t.activation, t.act_scale, t.act_zero_point, t.act_smooth)
    if isinstance(t, DynamicActivationTensor):
        return DynamicActivationTensor.wrap(t.weight, t.activation)
    return with_packing(t)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- encoding ----------------------------------------------------------------------------------
def encode(t: QuantizedTensor, name: str, out: dict[str, torch.Tensor]) -> dict:
    """The header entry of ``t``; its inner tensors (canonical layout) are added to ``out`` by file name."""
    if CLASSES.get(type(t).__name__) is not type(t):
        raise ValueError(f"{name}: lowbit.save writes the lowbit classes {sorted(CLASSES)}; received {type(t).__name__}")
    if isinstance(t, BlockQuantizedTensor):
        t = t.canonical()
    entry = {
        "class": type(t).__name__, "scheme": t.scheme, "shape": list(t.shape), "dtype": dtype_name(t.dtype),
        "meta": {n: _encode_value(getattr(t, n), f"{name}: metadata {n!r}") for n in t.meta_names
                 if n not in t.optional_meta_names or getattr(t, n) is not None},  # unset optional fields stay out
        "tensors": {},
    }
    for field, inner in t.fields().items():
        key = f"{name}{SEPARATOR}{field}"
        if isinstance(inner, QuantizedTensor):
            entry["tensors"][field] = encode(inner, key, out)
        else:
            out[key] = inner
            entry["tensors"][field] = key
    return entry


def _encode_value(value, where: str):
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    if isinstance(value, (tuple, list)):
        return [_encode_value(v, where) for v in value]
    if META_DATACLASSES.get(type(value).__name__) is type(value):
        fields = {f.name: _encode_value(getattr(value, f.name), where) for f in dataclasses.fields(value)}
        return {type(value).__name__: fields}
    raise ValueError(f"{where}: expected None, a bool, int, finite float, str, tuple or one of "
                     f"{sorted(META_DATACLASSES)}; received {value!r}")


def swapped_weight(module: QuantizedLinear) -> QuantizedTensor:
    """The tensor subclass a :class:`~lowbit.QuantizedLinear` holds as buffers (canonical layout)."""
    base, _, kind = module.scheme.partition("_")
    block = {cls.scheme: cls for cls in BLOCK_CLASSES.values()}.get(base)
    if block is None or (kind and kind not in WRAPPER_SUFFIXES):
        raise ValueError(f"lowbit.save cannot store a QuantizedLinear of scheme {module.scheme!r}")
    tensors, meta = {n: getattr(module, n) for n in module.tensor_names}, module.meta
    outer = {"shape": meta["shape"], "dtype": meta["dtype"]}
    weight = _construct(block, tensors, meta, **outer).canonical()
    return _construct(WRAPPER_SUFFIXES[kind], {**tensors, "weight": weight}, meta, **outer) if kind else weight


def _construct(cls, tensors: dict, meta: dict, **outer) -> QuantizedTensor:
    names = cls.tensor_names + cls.optional_tensor_names
    return cls(**{n: tensors[n] for n in names if n in tensors}, **{n: meta[n] for n in cls.meta_names if n in meta}, **outer)


# -- decoding ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Node:
    """A validated quantized entry: its class, outer shape and dtype, metadata, and inner tensors (file
    tensor names, or nested nodes for wrappers)."""

    cls: type
    shape: tuple[int, ...]
    dtype: torch.dtype
    meta: dict
    fields: dict

    def file_tensors(self) -> list[str]:
        names = []
        for value in self.fields.values():
            names.extend(value.file_tensors() if isinstance(value, Node) else [value])
        return names


def decode(entry, name: str, stored: dict[str, StoredTensor], claimed: set[str], inner: bool = False) -> Node:
    """Validate a quantized entry against the container; file tensors it uses are added to ``claimed``."""
    where = f"tensor {name!r}"
    allowed = BLOCK_CLASSES if inner else CLASSES
    if not isinstance(entry, dict) or entry.get("class") not in allowed:
        received = entry.get("class") if isinstance(entry, dict) else entry
        raise CheckpointError(f"{where}: field 'class': expected one of {sorted(allowed)}; received {received!r}")
    cls = allowed[entry["class"]]
    shape, dtype = entry.get("shape"), entry.get("dtype")
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise CheckpointError(f"{where}: field 'shape': expected a list of non-negative ints; received {shape!r}")
    if dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{where}: field 'dtype': expected one of {sorted(FLOAT_DTYPES)}; received {dtype!r}")
    meta = _decode_meta(cls, entry.get("meta"), where)
    fields = entry.get("tensors")
    names = cls.tensor_names + tuple(n for n in cls.optional_tensor_names if n not in PACKED_NAMES)
    if not isinstance(fields, dict) or not set(cls.tensor_names) <= set(fields) <= set(names):
        got = sorted(fields) if isinstance(fields, dict) else fields
        raise CheckpointError(f"{where}: field 'tensors': expected {list(cls.tensor_names)} and optionally "
                              f"{[n for n in names if n not in cls.tensor_names]}; received {got!r}")
    decoded = {}
    for field, value in fields.items():
        if field == "weight" and cls in WRAPPER_CLASSES.values():
            decoded[field] = decode(value, f"{name}{SEPARATOR}weight", stored, claimed, inner=True)
        elif not isinstance(value, str) or value not in stored or value in claimed:
            problem = "used twice" if value in claimed else "not in the file"
            raise CheckpointError(f"{where}: field 'tensors.{field}': expected the name of an unused file tensor; "
                                  f"received {value!r} ({problem})")
        else:
            claimed.add(value)
            decoded[field] = value
    node = Node(cls, tuple(shape), FLOAT_DTYPES[dtype], meta, decoded)
    if issubclass(cls, BlockQuantizedTensor):
        _check_block_layout(node, where, stored)
    else:
        weight = node.fields["weight"]
        if (weight.shape, weight.dtype) != (node.shape, node.dtype):
            raise CheckpointError(f"{where}: its inner weight should be {list(node.shape)} {dtype}; received "
                                  f"{list(weight.shape)} {dtype_name(weight.dtype)}")
    return node


def _decode_meta(cls, meta, where: str) -> dict:
    required = [n for n in cls.meta_names if n not in cls.optional_meta_names]
    if not isinstance(meta, dict) or not set(required) <= set(meta) <= set(cls.meta_names):
        got = sorted(meta) if isinstance(meta, dict) else meta
        raise CheckpointError(f"{where}: field 'meta': expected {required} and optionally {list(cls.optional_meta_names)}; "
                              f"received {got!r}")
    return {n: _decode_value(v, f"{where}: field 'meta.{n}'") for n, v in meta.items()}


def _decode_value(value, where: str):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return tuple(_decode_value(v, where) for v in value)
    if isinstance(value, dict) and len(value) == 1:
        (kind, fields), = value.items()
        cls = META_DATACLASSES.get(kind)
        names = {f.name for f in dataclasses.fields(cls)} if cls else set()
        if cls is not None and isinstance(fields, dict) and set(fields) == names:
            try:
                return cls(**{k: _decode_value(v, where) for k, v in fields.items()})
            except (TypeError, ValueError) as error:
                raise CheckpointError(f"{where}: invalid {kind}: {error}") from None
    raise CheckpointError(f"{where}: expected a JSON scalar, a list or one of {sorted(META_DATACLASSES)} with "
                          f"its fields; received {value!r}")


def _check_block_layout(node: Node, where: str, stored: dict[str, StoredTensor]) -> None:
    """The documented layout: qdata has the outer shape (halved along packed_dim for 4-bit qtypes), scale and
    zero_point have ``shape[i] // block_size[i]`` entries along each dim."""
    shape, meta = node.shape, node.meta
    qtypes = SCHEME_QTYPES[node.cls.scheme]
    if meta["qtype"] not in qtypes:
        raise CheckpointError(f"{where}: field 'meta.qtype': expected one of {list(qtypes)} for {node.cls.__name__}; "
                              f"received {meta['qtype']!r}")
    qtype, block = QTYPES[meta["qtype"]], meta["block_size"]
    if (not isinstance(block, tuple) or len(block) != len(shape) or not all(type(b) is int and b > 0 for b in block)
            or any(s % b for s, b in zip(shape, block))):
        raise CheckpointError(f"{where}: field 'meta.block_size': expected {len(shape)} positive ints dividing the "
                              f"shape {list(shape)}; received {block!r}")
    packed_dim = meta["packed_dim"]
    if qtype.packed != (type(packed_dim) is int) or (qtype.packed and not 0 <= packed_dim < len(shape)):
        expected = f"a dim of the {len(shape)}-d shape" if qtype.packed else "None"
        raise CheckpointError(f"{where}: field 'meta.packed_dim': expected {expected} for {qtype.name}; received {packed_dim!r}")
    if meta.get("packed_for") is not None:
        raise CheckpointError(f"{where}: field 'meta.packed_for': expected None (files hold the canonical layout); "
                              f"received {meta['packed_for']!r}")
    qshape = tuple(s // 2 if d == packed_dim else s for d, s in enumerate(shape))
    blocks = tuple(s // b for s, b in zip(shape, block))
    expected = {"qdata": (qshape, (torch.uint8,) if qtype.packed else (qtype.storage,)),
                "scale": (blocks, tuple(FLOAT_DTYPES.values())), "zero_point": (blocks, None)}
    for field, file_name in node.fields.items():
        want_shape, want_dtypes = expected[field]
        got = stored[file_name]
        if got.shape != want_shape or (want_dtypes and got.dtype not in want_dtypes):
            dtypes = "/".join(dtype_name(d) for d in want_dtypes) if want_dtypes else "any dtype"
            raise CheckpointError(f"{where}: inner tensor {field!r} ({file_name!r}): expected shape {list(want_shape)} "
                                  f"{dtypes}; received {list(got.shape)} {dtype_name(got.dtype)}")


def build(node: Node, data: dict[str, torch.Tensor]) -> QuantizedTensor:
    """Construct the tensor of ``node`` from its file tensors (unpacked; see :func:`pack`)."""
    fields = {f: build(v, data) if isinstance(v, Node) else data[v] for f, v in node.fields.items()}
    return node.cls(**fields, **node.meta, shape=node.shape, dtype=node.dtype)
