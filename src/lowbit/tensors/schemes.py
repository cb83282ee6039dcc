"""The scheme registry: each weight scheme's tensor class, value types, activation modes and kernels' names.

A scheme name is what the kernel registry is keyed by: a weight scheme (``"int8"``) and, for each activation
mode it supports, a scheme of its own (``"int8_dynamic"``, ``"int8_static"``), each named once here by
:func:`register_scheme` and looked up by name or by ``(weight scheme, activation mode)``: nothing splits or
joins scheme names. Registering a scheme also registers its reference kernels, so a new weight scheme is one
tensor file (its class and one ``register_scheme`` call) plus one config.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

from ..kernels import reference
from ..kernels.registry import register_kernel
from ..primitives.qtypes import get_qtype

ACTIVATION_MODES = ("none", "dynamic", "static")
REFERENCE_KERNELS = {"none": reference.WEIGHT_ONLY, "dynamic": reference.DYNAMIC, "static": reference.STATIC}
REFERENCE_PRIORITY = -100


@dataclass(frozen=True)
class Scheme:
    """One registered scheme.

    Attributes:
        name: the kernel registry's key, e.g. ``"int8_dynamic"``.
        weight: the weight scheme underneath (``"int8"``; the scheme itself for weight-only schemes).
        tensor: the block-quantized tensor class of the weight.
        qtypes: the value types its weights may have.
        activation: ``"none"`` (weight-only), ``"dynamic"`` or ``"static"``.
        ops: the ops it has kernels for (at least the reference ones).
    """

    name: str
    weight: str
    tensor: type
    qtypes: tuple[str, ...]
    activation: str
    ops: tuple[str, ...]

    @property
    def bits(self) -> tuple[int, ...]:
        """The bit widths of its qtypes."""
        return tuple(sorted({get_qtype(q).bits for q in self.qtypes}))

    @property
    def stored_fields(self) -> tuple[str, ...]:
        """The weight's inner tensors a checkpoint holds (its canonical layout: no kernel-packed fields)."""
        names = self.tensor.tensor_names + self.tensor.optional_tensor_names
        return tuple(n for n in names if n not in self.tensor.packed_names)


_SCHEMES: dict[str, Scheme] = {}
_BY_PARTS: dict[tuple[str, str], Scheme] = {}
SCHEMES = MappingProxyType(_SCHEMES)


def register_scheme(tensor: type, qtypes: tuple[str, ...], *, dynamic: str | None = None, static: str | None = None,
                    conv: bool = False) -> type:
    """Register ``tensor``'s weight scheme (``tensor.scheme``) and the activation schemes named by ``dynamic``
    and ``static``, with their reference kernels (linear, bmm and embedding for weights, plus conv when
    ``conv``; linear for dynamic activations; linear and conv for static ones). Returns ``tensor``.

    Example:
        >>> SCHEMES["int8_dynamic"].weight, SCHEMES["int8_dynamic"].activation
        ('int8', 'dynamic')
    """
    for qtype in qtypes:
        get_qtype(qtype)
    for mode, name in (("none", tensor.scheme), ("dynamic", dynamic), ("static", static)):
        if name is None:
            continue
        if name in _SCHEMES:
            raise ValueError(f"scheme {name!r} is already registered")
        ops = tuple(op for op in REFERENCE_KERNELS[mode] if op != "conv" or conv)
        scheme = Scheme(name, tensor.scheme, tensor, tuple(qtypes), mode, ops)
        for op in ops:
            register_kernel(op, name, "reference", priority=REFERENCE_PRIORITY)(REFERENCE_KERNELS[mode][op])
        _SCHEMES[name] = _BY_PARTS[(tensor.scheme, mode)] = scheme
    return tensor


def get_scheme(name: str) -> Scheme:
    """The scheme registered as ``name``."""
    scheme = _SCHEMES.get(name)
    if scheme is None:
        raise ValueError(f"unknown scheme {name!r}; expected one of {sorted(_SCHEMES)}")
    return scheme


def scheme_for(weight_scheme: str, activation: str) -> Scheme:
    """The scheme of ``weight_scheme`` weights with ``activation`` (``"none"``, ``"dynamic"``, ``"static"``)."""
    scheme = _BY_PARTS.get((weight_scheme, activation))
    if scheme is None:
        offered = sorted(mode for weight, mode in _BY_PARTS if weight == weight_scheme)
        raise ValueError(f"{weight_scheme!r} weights have no {activation!r} activation scheme; registered: {offered}")
    return scheme
