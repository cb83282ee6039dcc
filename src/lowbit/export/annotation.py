"""What a Quantizer writes on a graph: quantization specs per edge and node, with torch.ao's names.

A :class:`Quantizer` annotates an exported graph by storing a :class:`QuantizationAnnotation` in
``node.meta["quantization_annotation"]``: a spec for each input edge that is quantized
(``input_qspec_map``) and optionally for the node's output. ``prepare_pt2e`` turns the specs into
observers (or fake quantizers), ``convert_pt2e`` into quantize/dequantize nodes. The names and fields are
those torch.ao / torchao users know, so a port is an import change; specs made from lowbit configs
(:func:`lowbit.export.x86_quantizer.config_qspecs`) also carry lowbit's extras (``group_size``,
``smoothing``).

Example:
    >>> spec = QuantizationSpec(torch.int8, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_affine)
    >>> spec.qtype, spec.symmetric
    ('int8', False)
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Callable, Union

import torch
from torch.fx import GraphModule, Node

from ..primitives.qtypes import QTYPES

ANNOTATION_KEY = "quantization_annotation"
EdgeOrNode = Union[tuple[Node, Node], Node]
SYMMETRIC_QSCHEMES = (torch.per_tensor_symmetric, torch.per_channel_symmetric)
PER_CHANNEL_QSCHEMES = (torch.per_channel_symmetric, torch.per_channel_affine)


class QuantizationSpecBase(abc.ABC):  # noqa: B024 - a marker base, as in torch.ao
    """Base of every spec kind."""


def _qtype_name(dtype: torch.dtype, quant_min, quant_max, symmetric: bool) -> str:
    """The lowbit qtype of a torch.ao range; a symmetric [-qmax, qmax] is the signed qtype (its -qmax - 1 is never
    produced by a symmetric scale)."""
    matches = [qt for qt in QTYPES.values() if qt.storage == dtype]
    for qt in matches:
        if qt.is_float or (quant_min is None and qt.bits == 8) or (qt.qmin, qt.qmax) == (quant_min, quant_max) \
                or symmetric and qt.qmin < 0 and (-qt.qmax, qt.qmax) == (quant_min, quant_max):
            return qt.name
    raise ValueError(f"no lowbit qtype stores {dtype} with range [{quant_min}, {quant_max}]; expected one of "
                     f"{sorted((str(q.storage).removeprefix('torch.'), q.qmin, q.qmax) for q in QTYPES.values() if not q.is_float)}")


class _RangeFields:
    """qtype and symmetry derived from ``dtype``, ``quant_min``/``quant_max`` and ``qscheme``."""

    @property
    def qtype(self) -> str:
        return _qtype_name(self.dtype, self.quant_min, self.quant_max, self.symmetric)

    @property
    def symmetric(self) -> bool:
        return self.dtype.is_floating_point or self.qscheme in SYMMETRIC_QSCHEMES


@dataclass(eq=False)
class QuantizationSpec(QuantizationSpecBase, _RangeFields):
    """How a tensor is quantized: value type and range, granularity, and the observer that picks qparams.

    Attributes:
        dtype: storage dtype (``torch.int8``, ``torch.uint8``, ``torch.float8_e4m3fn``, ...).
        observer_or_fake_quant_ctr: makes the observer (or fake quantizer) of a static activation; None
            picks lowbit's min/max observer. Weights are quantized from their values at convert (min/max per
            block, the eager flows' rule) unless an observer is given.
        quant_min, quant_max: the integer range (e.g. 0, 15 for uint4 in uint8); None: the dtype's.
        qscheme: ``torch.per_tensor_affine`` / ``_symmetric`` or ``torch.per_channel_affine`` / ``_symmetric``.
        ch_axis: the channel axis of per-channel specs (0 for Linear/Conv weights, 1 for ConvTranspose).
        is_dynamic: qparams computed per call from the tensor itself (the whole tensor, or per token).
        per_token: lowbit: a dynamic activation with one scale per token (row of the last dimension).
        group_size: lowbit: per-group weights (``group_size`` consecutive input features share qparams).
        smoothing: lowbit: SmoothQuant strength alpha of a static activation feeding a linear, or None.
    """

    dtype: torch.dtype
    observer_or_fake_quant_ctr: Callable | None = None
    quant_min: int | None = None
    quant_max: int | None = None
    qscheme: torch.qscheme | None = None
    ch_axis: int | None = None
    is_dynamic: bool = False
    per_token: bool = False
    group_size: int | None = None
    smoothing: float | None = None

    def __post_init__(self):
        _ = self.qtype  # raises for a dtype/range lowbit cannot store
        if self.qscheme is not None and self.qscheme not in SYMMETRIC_QSCHEMES + (torch.per_tensor_affine, torch.per_channel_affine):
            raise ValueError(f"qscheme must be per_tensor/per_channel affine/symmetric; received {self.qscheme}")
        if (self.qscheme in PER_CHANNEL_QSCHEMES) != (self.ch_axis is not None):
            raise ValueError(f"ch_axis goes with a per-channel qscheme; received qscheme={self.qscheme}, ch_axis={self.ch_axis}")
        if self.per_token and not self.is_dynamic:
            raise ValueError("per_token qparams are dynamic ones; received per_token=True with is_dynamic=False")
        if self.smoothing is not None and (self.is_dynamic or not 0 <= self.smoothing <= 1):
            raise ValueError(f"smoothing is an alpha in [0, 1] for static activations; received {self.smoothing!r}")

    def block_size(self, rank: int) -> list[int]:
        """The block (``-1``: whole dimension) of a tensor of ``rank`` dims under this spec."""
        if self.group_size is not None:
            return [1] * (rank - 1) + [self.group_size]
        if self.per_token:
            return [1] * (rank - 1) + [-1]
        if self.ch_axis is None:
            return [-1] * rank
        axis = self.ch_axis % rank
        return [1 if d == axis else -1 for d in range(rank)]


@dataclass(eq=False)
class FixedQParamsQuantizationSpec(QuantizationSpecBase, _RangeFields):
    """A tensor quantized with fixed qparams (e.g. a sigmoid's output in [0, 1]): no observer."""

    dtype: torch.dtype
    scale: float
    zero_point: int
    quant_min: int | None = None
    quant_max: int | None = None
    qscheme: torch.qscheme | None = None
    is_dynamic: bool = False

    def __post_init__(self):
        if not self.scale > 0:
            raise ValueError(f"a fixed scale must be positive; received {self.scale!r}")


@dataclass(eq=False)
class SharedQuantizationSpec(QuantizationSpecBase):
    """Use the qparams of another edge ``(producer, consumer)`` or of a node's output (cat, pooling)."""

    edge_or_node: EdgeOrNode


@dataclass(eq=False)
class DerivedQuantizationSpec(QuantizationSpecBase, _RangeFields):
    """qparams computed from other edges' observers at convert, e.g. a bias scale = input scale x weight
    scale: ``derive_qparams_fn(observers) -> (scale, zero_point)``."""

    derived_from: list[EdgeOrNode]
    derive_qparams_fn: Callable
    dtype: torch.dtype
    quant_min: int | None = None
    quant_max: int | None = None
    qscheme: torch.qscheme | None = None
    ch_axis: int | None = None
    is_dynamic: bool = False


@dataclass
class QuantizationAnnotation:
    """The specs of a node: one per quantized input edge, and its output's (or None)."""

    input_qspec_map: dict[Node, QuantizationSpecBase | None] = field(default_factory=dict)
    output_qspec: QuantizationSpecBase | None = None
    allow_implicit_sharing: bool = True
    _annotated: bool = False


class Quantizer(abc.ABC):
    """A backend's rules: which nodes to quantize and how. ``prepare_pt2e`` calls
    :meth:`transform_for_annotation`, :meth:`annotate` then :meth:`validate`."""

    def transform_for_annotation(self, model: GraphModule) -> GraphModule:
        """Rewrite the graph before annotation (e.g. decompositions); the default keeps it."""
        return model

    @abc.abstractmethod
    def annotate(self, model: GraphModule) -> GraphModule:
        """Write :class:`QuantizationAnnotation` s into ``node.meta["quantization_annotation"]``."""

    @abc.abstractmethod
    def validate(self, model: GraphModule) -> None:
        """Raise if the annotations cannot be honoured."""


def annotation_of(node: Node) -> QuantizationAnnotation | None:
    return node.meta.get(ANNOTATION_KEY)


def is_annotated(node: Node) -> bool:
    annotation = annotation_of(node)
    return annotation is not None and annotation._annotated


def annotate(node: Node, inputs: dict[Node, QuantizationSpecBase | None] | None = None, output=None) -> None:
    """Mark ``node`` annotated with ``inputs`` (edge specs) and ``output`` (its output's spec)."""
    node.meta[ANNOTATION_KEY] = QuantizationAnnotation(dict(inputs or {}), output, _annotated=True)
