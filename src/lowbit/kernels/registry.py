"""Explicit kernel choice: (op, scheme) -> kernels, each with the devices it runs on and a capability check.

A kernel receives plain tensors only: ``fn(x, tensors, meta, bias)`` where ``tensors`` maps the
quantized weight's inner tensor names to tensors and ``meta`` holds its metadata (block_size,
qtype, ...). Tensor subclasses and swapped modules call the same kernel, so they agree exactly.

Preferences: ``"auto"`` picks the highest-priority kernel that can run here, ``"reference"``
dequantizes and uses float ops, and any other name must exist and be runnable here, or the call
raises: a model's numerics never change silently with the machine it runs on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

KernelFn = Callable[..., object]


@dataclass(frozen=True)
class Kernel:
    """One implementation of ``op`` for weights of ``scheme``.

    Attributes:
        op: operation name (``"linear"``, ``"embedding"``, ``"bmm"``).
        scheme: weight scheme (``"int8"``, ``"int4"``, ``"float8"``, ``"int8_dynamic"``, ...).
        name: name users give as ``kernel=`` in a config.
        fn: the implementation, ``fn(x, tensors, meta, bias)``.
        devices: device types it runs on.
        priority: higher wins under ``"auto"``.
        requires: returns None when runnable on a device type, else a reason it is not.
        granularities: weight granularities it handles (see :func:`layout`); None: any.
        qtypes: weight qtype names it handles; None: any.
        pack: ``pack(tensors, meta) -> dict`` run once at quantize/load time; its tensors reach
            ``fn`` as ``tensors["packed"]`` / ``tensors["packed_aux"]``.
    """

    op: str
    scheme: str
    name: str
    fn: KernelFn
    devices: frozenset[str] = field(default_factory=lambda: frozenset({"cpu", "cuda"}))
    priority: int = 0
    requires: Callable[[str], str | None] | None = None
    granularities: frozenset[str] | None = None
    pack: Callable[[dict, dict], dict] | None = None
    qtypes: frozenset[str] | None = None

    def missing(self, device_type: str, weight_layout: str = "any/any") -> str | None:
        """Why this kernel cannot run on ``device_type`` for weights of ``weight_layout``, or None."""
        granularity, qtype = weight_layout.split("/")
        if device_type not in self.devices:
            return f"runs on {sorted(self.devices)}, not {device_type}"
        if self.granularities is not None and not self.granularities & set(granularity.split("+")):
            return f"handles {sorted(self.granularities)} weights, not {granularity}"
        if self.qtypes is not None and qtype not in self.qtypes:
            return f"handles {sorted(self.qtypes)} weights, not {qtype}"
        return self.requires(device_type) if self.requires else None


def layout(meta) -> str:
    """``"granularities/qtype"`` of a weight, naming every granularity its blocks satisfy joined by ``+``
    (a one-row weight is per_tensor and per_row, a per_row weight is per_group with one group):
    per_tensor, per_channel (one scale per output channel of a conv weight with dims > 2), per_row,
    per_group, or other when none holds."""
    shape, block = tuple(meta["shape"]), tuple(meta["block_size"])
    leading_ones = all(b == 1 for b in block[:-1])
    holds = {
        "per_tensor": block == shape,
        "per_channel": len(shape) > 2 and block[0] == 1 and block[1:] == shape[1:],
        "per_row": leading_ones and block[-1] == shape[-1],
        "per_group": leading_ones,
    }
    return f"{'+'.join(name for name, ok in holds.items() if ok) or 'other'}/{meta['qtype']}"


_KERNELS: dict[tuple[str, str], list[Kernel]] = {}
_CHOSEN: dict[tuple[str, str, str, str, str], Kernel] = {}


def register_kernel(
    op: str,
    scheme: str,
    name: str,
    *,
    devices: tuple[str, ...] = ("cpu", "cuda"),
    priority: int = 0,
    requires: Callable[[str], str | None] | None = None,
    granularities: tuple[str, ...] | None = None,
    pack: Callable[[dict, dict], dict] | None = None,
    qtypes: tuple[str, ...] | None = None,
) -> Callable[[KernelFn], KernelFn]:
    """Decorator registering ``fn(x, tensors, meta, bias)`` as kernel ``name`` for (op, scheme).

    Example:
        >>> @register_kernel("linear", "demo", "reference")
        ... def demo_linear(x, tensors, meta, bias):
        ...     return x
    """

    def wrap(fn: KernelFn) -> KernelFn:
        kernels = _KERNELS.setdefault((op, scheme), [])
        if any(k.name == name for k in kernels):
            raise ValueError(f"kernel {name!r} is already registered for ({op!r}, {scheme!r})")
        grans = None if granularities is None else frozenset(granularities)
        types = None if qtypes is None else frozenset(qtypes)
        kernels.append(Kernel(op, scheme, name, fn, frozenset(devices), priority, requires, grans, pack, types))
        kernels.sort(key=lambda k: -k.priority)
        _CHOSEN.clear()
        return fn

    return wrap


def kernel_names(op: str, scheme: str) -> list[str]:
    """Names registered for (op, scheme), highest priority first."""
    return [k.name for k in _KERNELS.get((op, scheme), [])]


def select_kernel(op: str, scheme: str, device_type: str, preference: str = "auto", weight_layout: str = "any/any") -> Kernel:
    """Resolve a kernel preference for a device type and weight layout, raising rather than substituting.

    Example:
        >>> select_kernel("linear", "int8", "cpu", "reference").name
        'reference'
    """
    key = (op, scheme, device_type, preference, weight_layout)
    chosen = _CHOSEN.get(key)
    if chosen is None:
        chosen = _resolve(*key)
        _CHOSEN[key] = chosen
    return chosen


def _resolve(op: str, scheme: str, device_type: str, preference: str, weight_layout: str) -> Kernel:
    kernels = _KERNELS.get((op, scheme))
    if not kernels:
        raise NotImplementedError(f"lowbit has no {op!r} kernel for {scheme!r} weights")
    if preference == "auto":
        for kernel in kernels:
            if kernel.missing(device_type, weight_layout) is None:
                return kernel
        raise RuntimeError(f"no {op!r} kernel for {scheme!r} {weight_layout} weights can run on {device_type}")
    for kernel in kernels:
        if kernel.name == preference:
            reason = kernel.missing(device_type, weight_layout)
            if reason is not None:
                raise RuntimeError(f"kernel {preference!r} for {op} on {scheme!r} weights cannot run here: {reason}")
            return kernel
    raise ValueError(
        f"unknown kernel {preference!r} for {op} on {scheme!r} weights; expected 'auto' or one of "
        f"{kernel_names(op, scheme)}"
    )
