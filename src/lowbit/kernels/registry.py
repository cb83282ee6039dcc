"""Explicit kernel choice: (op, scheme) -> kernels, each with the devices it runs on and capability checks.

A kernel receives plain tensors only: ``fn(x, tensors, meta, bias)`` where ``tensors`` maps the
quantized weight's inner tensor names to tensors and ``meta`` holds its metadata (block_size,
qtype, ...) plus the call's (``activation``, a convolution's ``conv``). Tensor subclasses and
swapped modules call the same kernel, so they agree exactly.

A kernel is chosen per call from three checks: the device (``devices``, ``requires``), the weight's
layout (``granularities``, ``qtypes``) and the call (``accepts``, on the :class:`Call`: how activations
are quantized, which convolution). A kernel never substitutes another inside itself: one that cannot
take a call is not chosen for it.

Preferences name a kernel per op: ``"auto"`` picks the highest-priority kernel that can take the
call (among those whose ``auto_min_weights`` the weight reaches: a kernel measured to pay off only on large
weights), ``"reference"`` dequantizes and uses float ops, and any other name must be able to take the
call or it raises: a model's numerics never change silently with the machine it runs on. A name
that another op of the scheme has but this op does not (``"avx512"`` for a convolution, ``"onednn"``
for a float8 linear) means ``"auto"`` for this op; a name no op of the scheme has raises.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

KernelFn = Callable[..., object]


class Call(NamedTuple):
    """What an ``accepts`` check may read about a call; selections are cached by it, so checks read nothing else.

    Attributes:
        activation: how the call quantizes activations (an ``ActivationQuant``: qtype, granularity,
            symmetric) for dynamic and static schemes; None for weight-only ones and when packing.
        conv: the convolution function (``F.conv2d``, ``F.conv_transpose2d``, ...) of a conv call;
            None for other ops and when packing.
        string_padding: the convolution's padding is ``"same"`` / ``"valid"`` rather than numbers.
    """

    activation: Any = None
    conv: Callable | None = None
    string_padding: bool = False


NO_CALL = Call()


def call_of(meta) -> Call:
    """The :class:`Call` of a kernel meta dict (weight meta plus the call's ``activation`` / ``conv``)."""
    conv = meta.get("conv")
    if conv is None:
        activation = meta.get("activation")
        return NO_CALL if activation is None else Call(activation)
    func, args, kwargs = conv  # F.conv*(x, w, b, stride, padding, ...): padding is args[1]
    padding = kwargs["padding"] if "padding" in kwargs else args[1] if len(args) > 1 else 0
    return Call(meta.get("activation"), func, isinstance(padding, str))


@dataclass(frozen=True)
class Kernel:
    """One implementation of ``op`` for weights of ``scheme``.

    Attributes:
        op: operation name (``"linear"``, ``"embedding"``, ``"bmm"``, ``"conv"``).
        scheme: weight scheme (``"int8"``, ``"int4"``, ``"float8"``, ``"int8_dynamic"``, ...).
        name: name users give as ``kernel=`` in a config.
        fn: the implementation, ``fn(x, tensors, meta, bias)``.
        devices: device types it runs on.
        priority: higher wins under ``"auto"``.
        requires: returns None when runnable on a device type, else a reason it is not.
        granularities: weight granularities it handles (see :func:`layout`); None: any.
        group_sizes: whether it takes a per-group weight's group size (``group_sizes(g) -> bool``); None: any.
        qtypes: weight qtype names it handles; None: any.
        pack: ``pack(tensors, meta) -> dict`` run once at quantize/load time; its tensors reach
            ``fn`` as ``tensors["packed"]`` / ``tensors["packed_aux"]``. It may return ``"qdata": None``
            to drop the canonical values while its layout holds them; then ``unpack`` is required.
        unpack: ``unpack(tensors, meta) -> {"qdata": ...}``: the canonical values rebuilt from the packed
            layout (for files, views, gradients and other kernels; see :func:`unpacked`).
        auto_min_weights: ``"auto"`` passes this kernel over for weights of fewer elements (where it was
            measured slower than the next one); named, it takes any size.
        accepts: returns None when it takes a :class:`Call`, else what it takes and what the call has;
            a property the call leaves None (packing, other ops) is not judged.
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
    accepts: Callable[[Call], str | None] | None = None
    group_sizes: Callable[[int], bool] | None = None
    unpack: Callable[[dict, dict], dict] | None = None
    auto_min_weights: int = 0

    def missing(self, device_type: str, weight_layout: Layout | None = None) -> str | None:
        """Why this kernel cannot run on ``device_type`` for weights of ``weight_layout`` (None: any), or None."""
        if device_type not in self.devices:
            return f"runs on {sorted(self.devices)}, not {device_type}"
        if weight_layout is not None:
            if self.granularities is not None and not self.granularities & weight_layout.granularities:
                return f"handles {sorted(self.granularities)} weights, not {weight_layout.granularity_names}"
            if self.qtypes is not None and weight_layout.qtype not in self.qtypes:
                return f"handles {sorted(self.qtypes)} weights, not {weight_layout.qtype}"
            group = weight_layout.group_size
            if self.group_sizes is not None and group is not None and not self.group_sizes(group):
                return f"does not take groups of {group} input features"
        return self.requires(device_type) if self.requires else None

    def declines(self, call: Call) -> str | None:
        """Why this kernel cannot take ``call``, or None."""
        return None if self.accepts is None else self.accepts(call)


@dataclass(frozen=True)
class Layout:
    """A weight's granularities (every one its blocks satisfy) and qtype name."""

    granularities: frozenset[str]
    qtype: str
    group_size: int | None = None  # the block length along the last dim of a per-group weight
    numel: int | None = None  # elements of the weight

    @property
    def granularity_names(self) -> str:
        return "+".join(sorted(self.granularities)) or "other"


def layout(meta) -> Layout:
    """The :class:`Layout` of a weight, naming every granularity its blocks satisfy (a one-row weight is
    per_tensor and per_row, a per_row weight is per_group with one group): per_tensor, per_channel (one scale
    per output channel of a conv weight with dims > 2), per_row, per_group; none holds for other blocks.

    Example:
        >>> sorted(layout({"shape": (4, 64), "block_size": (1, 64), "qtype": "int8"}).granularities)
        ['per_group', 'per_row']
    """
    shape, block = tuple(meta["shape"]), tuple(meta["block_size"])
    leading_ones = all(b == 1 for b in block[:-1])
    holds = {
        "per_tensor": block == shape,
        "per_channel": len(shape) > 2 and block[0] == 1 and block[1:] == shape[1:],
        "per_row": leading_ones and block[-1] == shape[-1],
        "per_group": leading_ones,
    }
    return Layout(frozenset(name for name, ok in holds.items() if ok), meta["qtype"], block[-1] if leading_ones else None,
                  math.prod(shape))


_KERNELS: dict[tuple[str, str], list[Kernel]] = {}
_CHOSEN: dict[tuple, Kernel] = {}


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
    accepts: Callable[[Call], str | None] | None = None,
    group_sizes: Callable[[int], bool] | None = None,
    unpack: Callable[[dict, dict], dict] | None = None,
    auto_min_weights: int = 0,
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
        kernels.append(Kernel(op, scheme, name, fn, frozenset(devices), priority, requires, grans, pack, types, accepts,
                              group_sizes, unpack, auto_min_weights))
        kernels.sort(key=lambda k: -k.priority)
        _CHOSEN.clear()
        return fn

    return wrap


def kernel_names(op: str, scheme: str, device_type: str | None = None) -> list[str]:
    """Names registered for (op, scheme) (for ``device_type`` only, when given), highest priority first."""
    return [k.name for k in _KERNELS.get((op, scheme), []) if device_type is None or device_type in k.devices]


def select_kernel(op: str, scheme: str, device_type: str, preference: str = "auto", meta=None) -> Kernel:
    """The kernel ``preference`` names for this call, raising rather than substituting.

    ``meta`` is the dict the kernel receives (the weight's ``shape``, ``block_size`` and ``qtype``, plus
    the call's ``activation`` / ``conv``); without it only the device is judged. Runs on every call:
    the choice is cached by the weight's shape, block and qtype and the :class:`Call`.

    Example:
        >>> select_kernel("linear", "int8", "cpu", "reference").name
        'reference'
    """
    if meta is None:
        key = (op, scheme, device_type, preference, None, None, None, NO_CALL)
    else:
        key = (op, scheme, device_type, preference, tuple(meta["shape"]), tuple(meta["block_size"]), meta["qtype"],
               call_of(meta))
    chosen = _CHOSEN.get(key)
    if chosen is None:
        chosen = _CHOSEN[key] = _resolve(op, scheme, device_type, preference, None if meta is None else layout(meta),
                                         key[-1])
    return chosen


def _resolve(op: str, scheme: str, device_type: str, preference: str, weight_layout: Layout | None, call: Call) -> Kernel:
    kernels = _KERNELS.get((op, scheme))
    if not kernels:
        raise NotImplementedError(f"lowbit has no {op!r} kernel for {scheme!r} weights")
    named = next((k for k in kernels if k.name == preference), None)
    if named is not None:
        what = f"kernel {preference!r} for {op} on {scheme!r} weights"
        reason = named.missing(device_type, weight_layout)
        if reason is not None:
            raise RuntimeError(f"{what} cannot run here: {reason}")
        reason = named.declines(call)
        if reason is not None:
            raise RuntimeError(f"{what} cannot take this call: {reason}")
        return named
    if preference != "auto" and not _named_for_scheme(preference, scheme):
        raise ValueError(
            f"unknown kernel {preference!r} for {op} on {scheme!r} weights; expected 'auto' or one of "
            f"{kernel_names(op, scheme)}"
        )
    for kernel in kernels:  # "auto", or a name of another op's kernel
        too_small = weight_layout is not None and (weight_layout.numel or 0) < kernel.auto_min_weights
        if not too_small and kernel.missing(device_type, weight_layout) is None and kernel.declines(call) is None:
            return kernel
    which = "" if weight_layout is None else f"{weight_layout.granularity_names} {weight_layout.qtype} "
    raise RuntimeError(f"no {op!r} kernel for {scheme!r} {which}weights can take this call on {device_type}")


def unpacked(tensors: dict, meta: dict) -> dict:
    """``tensors`` with the canonical ``qdata``: as they are when they hold it, else rebuilt by the ``unpack`` of
    the kernel that packed them (``meta["packed_for"]``) — the weight's values are never lost to a kernel layout."""
    if tensors.get("qdata") is not None:
        return tensors
    return {**tensors, **packer(meta).unpack(tensors, meta)}


def packer(meta: dict) -> Kernel:
    """The kernel whose layout a packed weight holds (``meta["packed_for"]``: scheme and kernel name)."""
    scheme, name = meta["packed_for"]
    return next(k for (_, s), kernels in _KERNELS.items() if s == scheme for k in kernels if k.name == name and k.pack)


def _named_for_scheme(name: str, scheme: str) -> bool:
    """Whether some op of ``scheme`` has a kernel called ``name``."""
    return any(s == scheme and any(k.name == name for k in kernels) for (_, s), kernels in _KERNELS.items())
