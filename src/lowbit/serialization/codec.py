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
from ..specs import ActivationQuant
from ..tensors import QuantizedTensor
from ..tensors.activation import WRAPPERS, DynamicActivationTensor, StaticActivationTensor
from ..tensors.blockwise import PACKED_NAMES, BlockQuantizedTensor, with_packing
from ..tensors.schemes import SCHEMES, get_scheme, scheme_for
from ..tensors.smoothed import SmoothedTensor
from .container import CheckpointError, StoredTensor, shown

WRAPPER_CLASSES = {cls.__name__: cls for cls in (*WRAPPERS.values(), SmoothedTensor)}


def block_classes() -> dict[str, type]:
    """The weight tensor classes of the registered schemes, by name (read at each use: registering a scheme
    makes its tensors savable and loadable)."""
    return {scheme.tensor.__name__: scheme.tensor for scheme in SCHEMES.values()}


def classes() -> dict[str, type]:
    """Every class a header entry may name."""
    return {**block_classes(), **WRAPPER_CLASSES}

META_DATACLASSES = {"ActivationQuant": ActivationQuant}
RUNTIME_META = ("kernel",)  # chosen where the model runs: files of format 1 hold it, later ones do not
FLOAT_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.bfloat16, torch.float16)}
SEPARATOR = "::"  # file names of inner tensors: "<entry>::<field>[::<field>...]"


def pack(t: QuantizedTensor) -> QuantizedTensor:
    """Attach the packed layout of this machine's kernel, as quantizing does (``packed_for`` names it)."""
    if isinstance(t, SmoothedTensor):
        return t.with_weight(pack(t.weight))
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
    known = classes()
    if known.get(type(t).__name__) is not type(t):
        raise ValueError(f"{name}: lowbit.save writes the lowbit classes {sorted(known)}; received {type(t).__name__}")
    if isinstance(t, BlockQuantizedTensor):
        t = t.canonical()
    entry = {
        "class": type(t).__name__, "scheme": t.scheme, "shape": list(t.shape), "dtype": dtype_name(t.dtype),
        "meta": {n: _encode_value(getattr(t, n), f"{name}: metadata {n!r}") for n in t.meta_names
                 if n not in RUNTIME_META and (n not in t.optional_meta_names or getattr(t, n) is not None)},  # unset optional fields stay out
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
    scheme = SCHEMES.get(module.scheme)
    if scheme is None:
        raise ValueError(f"lowbit.save cannot store a QuantizedLinear of scheme {module.scheme!r}")
    tensors, meta = {n: getattr(module, n) for n in module.tensor_names}, module.meta
    outer = {"shape": meta["shape"], "dtype": meta["dtype"]}
    weight = _construct(scheme.tensor, tensors, meta, **outer).canonical()
    if scheme.activation == "none":
        return weight
    return _construct(WRAPPERS[scheme.activation], {**tensors, "weight": weight}, meta, **outer)


def _construct(cls, tensors: dict, meta: dict, **outer) -> QuantizedTensor:
    names = cls.tensor_names + cls.optional_tensor_names
    return cls(**{n: tensors[n] for n in names if n in tensors}, **{n: meta[n] for n in cls.meta_names if n in meta}, **outer)


# -- decoding ----------------------------------------------------------------------------------
ENTRY_FIELDS = ("class", "scheme", "shape", "dtype", "meta", "tensors")
TOP_FIELDS = ("spec", "config", "module")  # top-level entries only: the spec (format 2) or config label (format 1), a module swap
SCALE_DTYPES = tuple(FLOAT_DTYPES.values())
POSITIVE_FIELDS = ("scale", "act_scale", "act_smooth")  # scales and smoothing divisors
META_TYPES = {  # metadata field -> (accepts the JSON value, what is expected); meanings are checked with the layout
    "qtype": (lambda v: isinstance(v, str), "a qtype name"),
    "block_size": (lambda v: isinstance(v, list) and all(type(b) is int for b in v), "a list of ints"),
    "packed_dim": (lambda v: v is None or type(v) is int, "an int or null"),
    "kernel": (lambda v: isinstance(v, str), "a kernel name"),
    "groups": (lambda v: v is None or type(v) is int, "an int or null"),
    "packed_for": (lambda v: v is None, "null (files hold the canonical layout)"),
    "packed_transposed": (lambda v: v is None, "null (files hold the canonical layout)"),
    "transposed": (lambda v: type(v) is bool, "a bool (a smoothed weight stored (in, out))"),
}
JSON_TYPES = {"str": str, "bool": bool}  # annotations of ActivationQuant's fields


@dataclass(frozen=True)
class Node:
    """A validated quantized entry: its name, class, outer shape and dtype, metadata, and inner tensors
    (file tensor names, or nested nodes for wrappers)."""

    name: str
    cls: type
    shape: tuple[int, ...]
    dtype: torch.dtype
    meta: dict
    fields: dict

    @property
    def scheme(self) -> str:
        """The scheme of the tensor this entry builds, e.g. ``"int8_static"``."""
        if self.cls is SmoothedTensor:
            return self.fields["weight"].scheme
        if self.cls in WRAPPER_CLASSES.values():
            return scheme_for(self.fields["weight"].cls.scheme, self.cls.mode).name
        return self.cls.scheme

    @property
    def block(self) -> "Node":
        """The block-quantized weight inside any wrappers (a smoothed weight may wrap a dynamic one)."""
        weight = self.fields.get("weight")
        return self if weight is None else weight.block

    def file_tensors(self) -> list[str]:
        names = []
        for value in self.fields.values():
            names.extend(value.file_tensors() if isinstance(value, Node) else [value])
        return names


@dataclass(frozen=True)
class Inner:
    """What a scheme asks of one inner tensor: shape, dtypes, and whether it must be there (True), must
    not (False) or may (None); ``why`` explains its presence in messages."""

    shape: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    present: bool | None = True
    why: str = ""


def decode(entry, name: str, stored: dict[str, StoredTensor], claimed: set[str], inner: bool = False, kernel: str = "auto",
           version: int = 2, allowed: dict[str, type] | None = None) -> Node:
    """Validate a quantized entry against the container (the type of every field, the scheme's metadata,
    the presence, shape and dtype of each inner tensor); file tensors it uses are added to ``claimed``. The
    node's tensors will prefer ``kernel`` (a run-time choice: a format-1 file's kernel field is not used)."""
    where = f"tensor {name!r}"
    allowed = allowed or (block_classes() if inner else classes())
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: expected a JSON object as header entry; received {shown(entry)}")
    optional = () if inner else TOP_FIELDS
    if not set(ENTRY_FIELDS) <= set(entry) <= set(ENTRY_FIELDS + optional):
        raise CheckpointError(f"{where}: expected the fields {list(ENTRY_FIELDS)} and optionally {list(optional)}; "
                              f"received {shown(sorted(entry))}")
    cls = allowed.get(entry["class"]) if isinstance(entry["class"], str) else None
    if cls is None:
        raise CheckpointError(f"{where}: field 'class': expected one of {sorted(allowed)}; received {shown(entry['class'])}")
    shape, dtype = entry["shape"], entry["dtype"]
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise CheckpointError(f"{where}: field 'shape': expected a list of non-negative ints; received {shown(shape)}")
    if not isinstance(dtype, str) or dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{where}: field 'dtype': expected one of {sorted(FLOAT_DTYPES)}; received {shown(dtype)}")
    meta = _decode_meta(cls, entry["meta"], where, version)
    if "kernel" in cls.meta_names:
        meta["kernel"] = kernel
    fields = entry["tensors"]
    names = cls.tensor_names + tuple(n for n in cls.optional_tensor_names if n not in PACKED_NAMES)
    if not isinstance(fields, dict) or not set(cls.tensor_names) <= set(fields) <= set(names):
        got = sorted(fields) if isinstance(fields, dict) else fields
        raise CheckpointError(f"{where}: field 'tensors': expected {list(cls.tensor_names)} and optionally "
                              f"{[n for n in names if n not in cls.tensor_names]}; received {shown(got)}")
    decoded = {}
    for field, value in fields.items():
        if field == "weight" and cls in WRAPPER_CLASSES.values():
            # a smoothed weight wraps a weight-only or dynamic one; other wrappers wrap a block-quantized weight
            inside = {**block_classes(), DynamicActivationTensor.__name__: DynamicActivationTensor} if cls is SmoothedTensor else None
            decoded[field] = decode(value, f"{name}{SEPARATOR}weight", stored, claimed, inner=True, kernel=kernel,
                                    version=version, allowed=inside)
        elif not isinstance(value, str) or value not in stored or value in claimed:
            problem = "not a string" if not isinstance(value, str) else "used twice" if value in claimed else "not in the file"
            raise CheckpointError(f"{where}: field 'tensors.{field}': expected the name of an unused file tensor; "
                                  f"received {shown(value)} ({problem})")
        else:
            claimed.add(value)
            decoded[field] = value
    node = Node(name, cls, tuple(shape), FLOAT_DTYPES[dtype], meta, decoded)
    if entry["scheme"] != node.scheme:
        raise CheckpointError(f"{where}: field 'scheme': expected {node.scheme!r} (the scheme of this {cls.__name__}); "
                              f"received {shown(entry['scheme'])}")
    layout = _block_layout(node, where) if issubclass(cls, BlockQuantizedTensor) else _wrapper_layout(node, where)
    _check_inner(node, layout, stored, where)
    return node


def _decode_meta(cls, meta, where: str, version: int) -> dict:
    """Format 1 names each tensor's kernel (read and not used); later formats hold none."""
    stored = [n for n in cls.meta_names if version == 1 or n not in RUNTIME_META]
    required = [n for n in stored if n not in cls.optional_meta_names + RUNTIME_META]
    optional = [n for n in stored if n not in required]
    if not isinstance(meta, dict) or not set(required) <= set(meta) <= set(stored):
        got = sorted(meta) if isinstance(meta, dict) else meta
        raise CheckpointError(f"{where}: field 'meta': expected {required} and optionally {optional}; "
                              f"received {shown(got)}")
    decoded = {}
    for name, value in meta.items():
        if name == "activation":
            decoded[name] = _decode_activation(value, f"{where}: field 'meta.activation'")
            continue
        accepts, expected = META_TYPES[name]
        if not accepts(value):
            raise CheckpointError(f"{where}: field 'meta.{name}': expected {expected}; received {shown(value)}")
        decoded[name] = tuple(value) if name == "block_size" else value
    return decoded


def _decode_activation(value, where: str) -> ActivationQuant:
    types = {f.name: JSON_TYPES[f.type] for f in dataclasses.fields(ActivationQuant)}
    fields = value.get("ActivationQuant") if isinstance(value, dict) and len(value) == 1 else None
    if not isinstance(fields, dict) or set(fields) != set(types) or any(type(fields[k]) is not t for k, t in types.items()):
        expected = ", ".join(f"{k!r}: {t.__name__}" for k, t in types.items())
        raise CheckpointError(f"{where}: expected {{'ActivationQuant': {{{expected}}}}}; received {shown(value)}")
    try:
        return ActivationQuant(**fields)
    except ValueError as error:
        raise CheckpointError(f"{where}: invalid ActivationQuant: {error}") from None


def _block_layout(node: Node, where: str) -> dict[str, Inner]:
    """The documented layout: qdata has the outer shape (halved along packed_dim for 4-bit qtypes), scale and
    zero_point have ``shape[i] // block_size[i]`` entries along each dim; unsigned qtypes have a zero point
    of their storage dtype, symmetric ones none."""
    shape, meta = node.shape, node.meta
    qtypes = get_scheme(node.cls.scheme).qtypes
    if meta["qtype"] not in qtypes:
        raise CheckpointError(f"{where}: field 'meta.qtype': expected one of {list(qtypes)} for {node.cls.__name__}; "
                              f"received {shown(meta['qtype'])}")
    qtype, block = QTYPES[meta["qtype"]], meta["block_size"]
    if len(block) != len(shape) or not all(b > 0 for b in block) or any(s % b for s, b in zip(shape, block)):
        raise CheckpointError(f"{where}: field 'meta.block_size': expected {len(shape)} positive ints dividing the "
                              f"shape {list(shape)}; received {shown(block)}")
    packed_dim = meta["packed_dim"]
    if qtype.packed != (packed_dim is not None) or (qtype.packed and not 0 <= packed_dim < len(shape)):
        expected = f"a dim of the {len(shape)}-d shape" if qtype.packed else "None"
        raise CheckpointError(f"{where}: field 'meta.packed_dim': expected {expected} for {qtype.name}; received {packed_dim!r}")
    groups = meta.get("groups")
    if groups is not None and (groups < 1 or len(shape) < 3 or shape[0] % groups):
        raise CheckpointError(f"{where}: field 'meta.groups': expected null or a convolution's groups (a positive int "
                              f"dividing dim 0 of a weight of 3 or more dims); received {groups} for shape {list(shape)}")
    qshape = tuple(-(-s * qtype.bits // 8) if d == packed_dim else s for d, s in enumerate(shape))  # bit-packed bytes
    blocks = tuple(s // b for s, b in zip(shape, block))
    unsigned = not qtype.is_float and qtype.qmin == 0
    why = f"{qtype.name} values are offset by a zero point" if unsigned else f"{qtype.name} is symmetric"
    return {"qdata": Inner(qshape, (torch.uint8,) if qtype.packed else (qtype.storage,)),
            "scale": Inner(blocks, SCALE_DTYPES),
            "zero_point": Inner(blocks, (qtype.storage,), unsigned, why)}


def _wrapper_layout(node: Node, where: str) -> dict[str, Inner]:
    """A wrapper holds a weight of its own shape and dtype whose qtype its activations share; a static one
    adds a 0-d activation scale, a 0-d zero point for asymmetric activations and, for a linear layer,
    optional smoothing divisors (one per input channel)."""
    weight = node.fields["weight"]
    if (weight.shape, weight.dtype) != (node.shape, node.dtype):
        raise CheckpointError(f"{where}: its inner weight should be {list(node.shape)} {dtype_name(node.dtype)}; received "
                              f"{list(weight.shape)} {dtype_name(weight.dtype)}")
    if node.cls is SmoothedTensor:
        return _smoothed_layout(node, where)
    activation = node.meta["activation"]
    static = node.cls.mode == "static"
    if activation.qtype != weight.meta["qtype"] or (static and activation.granularity != "per_tensor"):
        granularity = " and granularity 'per_tensor' (static)" if static else ""
        raise CheckpointError(f"{where}: field 'meta.activation': expected the weight's qtype {weight.meta['qtype']!r}"
                              f"{granularity}; received {activation}")
    if not static:
        return {}
    act_qtype, linear = QTYPES[activation.qtype], len(node.shape) == 2 and weight.meta.get("groups") is None
    block = weight.meta["block_size"]
    inputs = node.shape[0] if linear and block[1] == 1 < block[0] else node.shape[-1]  # Conv1D weights are (in, out)
    why = "the activations are symmetric" if activation.symmetric else "asymmetric activations are offset by a zero point"
    return {"act_scale": Inner((), SCALE_DTYPES),
            "act_zero_point": Inner((), (act_qtype.storage,), not activation.symmetric, why),
            "act_smooth": Inner((inputs,), SCALE_DTYPES, None if linear else False,
                                "smoothing divides the input channels of a linear layer")}


def _smoothed_layout(node: Node, where: str) -> dict[str, Inner]:
    """A smoothed weight is a 2-D linear weight, (out, in) or, transposed, (in, out), with one divisor per input."""
    if len(node.shape) != 2:
        raise CheckpointError(f"{where}: a SmoothedTensor is a 2-D linear weight; received shape {list(node.shape)}")
    inputs = node.shape[0] if node.meta["transposed"] else node.shape[1]
    return {"act_smooth": Inner((inputs,), (torch.float32,), True, "smoothing divides the input channels")}


def _check_inner(node: Node, layout: dict[str, Inner], stored: dict[str, StoredTensor], where: str) -> None:
    for field, want in layout.items():
        file_name = node.fields.get(field)
        if want.present is not None and (file_name is not None) != want.present:
            expected = f"a {field} tensor" if want.present else f"no {field}"
            received = repr(file_name) if file_name is not None else "none"
            raise CheckpointError(f"{where}: field 'tensors.{field}': expected {expected} ({want.why}); received {received}")
        got = stored.get(file_name) if file_name is not None else None
        if got is not None and (got.shape != want.shape or got.dtype not in want.dtypes):
            dtypes = "/".join(dtype_name(d) for d in want.dtypes)
            raise CheckpointError(f"{where}: field 'tensors.{field}' ({file_name!r}): expected shape {list(want.shape)} "
                                  f"{dtypes}; received {list(got.shape)} {dtype_name(got.dtype)}")


def check_values(node: Node, data: dict[str, torch.Tensor]) -> None:
    """Raise CheckpointError unless the scales and smoothing divisors read for ``node`` are finite and
    positive and its zero points lie in their qtype's range (``data``: file tensors by name)."""
    for field, value in node.fields.items():
        if isinstance(value, Node):
            check_values(value, data)
            continue
        t = data[value]
        if field in POSITIVE_FIELDS:
            bad, expected = ~(torch.isfinite(t) & (t > 0)), "finite positive values"
        elif field in ("zero_point", "act_zero_point"):
            qtype = QTYPES[node.meta["qtype"] if field == "zero_point" else node.meta["activation"].qtype]
            bad, expected = (t < qtype.qmin) | (t > qtype.qmax), f"values in [{qtype.qmin}, {qtype.qmax}] ({qtype.name})"
        else:
            continue
        if bool(bad.any()):
            index = tuple(bad.nonzero()[0].tolist())
            raise CheckpointError(f"tensor {node.name!r}: field 'tensors.{field}' ({value!r}): expected {expected}; "
                                  f"received {t[index].item()} at index {list(index)} ({int(bad.sum())} of "
                                  f"{t.numel()} values are not)")


def build(node: Node, data: dict[str, torch.Tensor]) -> QuantizedTensor:
    """Construct the tensor of ``node`` from its file tensors (unpacked; see :func:`pack`)."""
    fields = {f: build(v, data) if isinstance(v, Node) else data[v] for f, v in node.fields.items()}
    return node.cls(**fields, **node.meta, shape=node.shape, dtype=node.dtype)
