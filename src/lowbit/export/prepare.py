"""``prepare_pt2e`` / ``prepare_qat_pt2e``: put observers (or fake quantizers) where a Quantizer's annotations say.

The graph is first cleaned (dead code removed: an unused pooler or branch would otherwise leave observers that
never see data) and its eval-mode BatchNorms folded into the convolutions before them, with the arithmetic of
:func:`lowbit.fuse`. Each quantized activation edge gets an observer module called in the graph
(``lowbit_observer_<i>``); edges that read the same tensor with the same spec share one, as do
:class:`SharedQuantizationSpec` edges. Weights need no observer: convert quantizes them from their values.
A static spec with ``smoothing`` (SmoothQuant) on a linear's input gets a :class:`SmoothingObserver` of its own.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
from torch.fx import GraphModule, Node

from ..calibration.observers import MinMaxObserver, Observer, PerChannelMinMaxObserver, range_qparams
from ..algorithms.smoothquant import smoothing_factors
from ..primitives.qtypes import get_qtype
from ..qat.fake_quantizers import ActivationFakeQuantizer, WeightFakeQuantizer
from ..specs import ActivationSpec, weight_spec
from .annotation import (
    DerivedQuantizationSpec, FixedQParamsQuantizationSpec, QuantizationSpec, Quantizer, SharedQuantizationSpec,
    annotation_of,
)
from .graph_utils import attribute, check_graph_module, fold_batch_norms
from .qdq import resolve_block_size

OBSERVER_PREFIX = "lowbit_observer_"
PT2E_KEY = "lowbit_pt2e"  # gm.meta: {"qat": bool}


class SmoothingObserver(Observer):
    """Observes a linear's input per channel; convert derives the SmoothQuant factors ``s`` from these ranges
    and the weight, and the per-tensor range of ``x / s`` from them exactly (``min_c(min_c / s_c)``), as the
    eager flow's two calibration passes with a min/max observer compute it.
    """

    def __init__(self, qtype: str, symmetric: bool, alpha: float):
        super().__init__(qtype, symmetric)
        self.alpha = alpha
        self.channels = PerChannelMinMaxObserver(qtype, symmetric, axis=-1)

    @property
    def observed(self) -> bool:
        return self.channels.observed

    def observe(self, x: torch.Tensor) -> None:
        self.channels.observe(x)

    def smoothing(self, weight: torch.Tensor) -> torch.Tensor:
        """The factors s (K,) for the linear ``weight`` (out, in)."""
        act_max = torch.maximum(self.channels.max_val.abs(), self.channels.min_val.abs())
        return smoothing_factors(act_max, weight.detach().float().abs().amax(0), self.alpha)

    def smoothed_qparams(self, smooth: torch.Tensor):
        """(scale, zero point) of ``x / s`` over everything observed."""
        lo = (self.channels.min_val / smooth).amin()
        hi = (self.channels.max_val / smooth).amax()
        return range_qparams(lo, hi, self.qtype, self.symmetric)


class FixedQParamsObserver(Observer):
    """The qparams of a :class:`FixedQParamsQuantizationSpec` (e.g. a sigmoid's [0, 1) range): observes nothing."""

    def __init__(self, spec: FixedQParamsQuantizationSpec):
        super().__init__(spec.qtype, spec.symmetric)
        self.register_buffer("scale", torch.tensor(float(spec.scale)))
        self.register_buffer("zero_point", None if self.symmetric else torch.tensor(int(spec.zero_point), dtype=get_qtype(spec.qtype).storage))

    @property
    def observed(self) -> bool:
        return True

    def observe(self, x: torch.Tensor) -> None:
        pass

    def calculate_qparams(self):
        return self.scale, self.zero_point


def prepare_pt2e(model: GraphModule, quantizer: Quantizer) -> GraphModule:
    """Annotate ``model`` (from ``torch.export.export(m, args).module()``) with ``quantizer`` and insert
    observers; calibrate by calling the result, then :func:`convert_pt2e`.

    Example:
        >>> import lowbit
        >>> from lowbit.export import X86Quantizer, convert_pt2e
        >>> model = torch.nn.Sequential(torch.nn.Linear(16, 8)).eval()
        >>> graph = torch.export.export(model, (torch.randn(2, 16),)).module()
        >>> prepared = prepare_pt2e(graph, X86Quantizer().set_global(lowbit.StaticInt8()))
        >>> _ = prepared(torch.randn(4, 16))
        >>> converted = convert_pt2e(prepared)
    """
    return _prepare(model, quantizer, qat=False)


def prepare_qat_pt2e(model: GraphModule, quantizer: Quantizer) -> GraphModule:
    """As :func:`prepare_pt2e`, with lowbit's QAT fake quantizers (straight-through rounding) instead of
    observers: train the result, then :func:`convert_pt2e`. Static ranges are moving averages updated in
    training mode (:func:`lowbit.export.move_exported_model_to_train`); BatchNorm is not folded (it trains),
    convert folds it before quantizing the weights."""
    return _prepare(model, quantizer, qat=True)


def _prepare(model: GraphModule, quantizer: Quantizer, qat: bool) -> GraphModule:
    check_graph_module(model, "prepare_pt2e")
    if PT2E_KEY in model.meta:
        raise ValueError("this graph is already prepared: calibrate it and call convert_pt2e, or export the float model again")
    if not isinstance(quantizer, Quantizer):
        raise TypeError(f"expected a lowbit.export.Quantizer (e.g. X86Quantizer()); received {type(quantizer).__name__}")
    model.graph.eliminate_dead_code()
    if not qat:
        fold_batch_norms(model)
    model = quantizer.transform_for_annotation(model)
    quantizer.annotate(model)
    quantizer.validate(model)
    _check_specs(model, qat)
    _Inserter(model, qat).run()
    model.meta[PT2E_KEY] = {"qat": qat}
    model.graph.lint()
    model.recompile()
    return model


def _check_specs(model: GraphModule, qat: bool) -> None:
    """Refuse what cannot be honoured before changing anything."""
    for node in model.graph.nodes:
        annotation = annotation_of(node)
        for spec in [] if annotation is None else [*annotation.input_qspec_map.values(), annotation.output_qspec]:
            if not isinstance(spec, QuantizationSpec) or spec.smoothing is None:
                continue
            if qat:
                raise ValueError(f"{node.name}: graph QAT does not smooth activations; use a config with smoothing=None "
                                 f"(e.g. StaticInt8(smoothing=None)) or eager QAT (lowbit.QATConfig)")
            made = spec.observer_or_fake_quant_ctr() if spec.observer_or_fake_quant_ctr is not None else MinMaxObserver()
            if type(made) is not MinMaxObserver:
                raise ValueError(f"{node.name}: smoothing in the graph flow needs the min/max observer (one calibration "
                                 f"pass gives the range of x / s exactly); received {type(made).__name__}. Use "
                                 f"StaticInt8(observer='minmax') or smoothing=None")


class _Inserter:
    """Inserts one module call per observed tensor and rewires the annotated edges to it."""

    def __init__(self, model: GraphModule, qat: bool):
        self.model, self.qat, self.count = model, qat, 0
        self.edge_nodes: dict[tuple[Node, Node], Node] = {}  # (producer, consumer) -> observer node
        self.output_nodes: dict[Node, Node] = {}  # producer -> its output observer node
        self.shared: dict[tuple, Node] = {}  # (producer, observer kind) -> observer node, implicit sharing
        self.deferred: list[tuple[Node, Node]] = []  # edges from a producer whose output is observed

    def run(self) -> None:
        annotated = [n for n in self.model.graph.nodes if annotation_of(n) is not None]
        for node in annotated:  # plain specs first: shared ones refer to them
            annotation = annotation_of(node)
            for producer, spec in annotation.input_qspec_map.items():
                if isinstance(spec, QuantizationSpec):
                    self._edge(producer, node, spec, annotation.allow_implicit_sharing)
                elif isinstance(spec, FixedQParamsQuantizationSpec):
                    self.edge_nodes[(producer, node)] = self._call(producer, FixedQParamsObserver(spec), node)
        for node in annotated:  # in graph order: a shared output refers to an input edge, maybe of an earlier output
            annotation = annotation_of(node)
            for producer, spec in annotation.input_qspec_map.items():
                if isinstance(spec, SharedQuantizationSpec):
                    self._shared_edge(producer, node, spec)
                elif spec is not None and not isinstance(spec, (QuantizationSpec, FixedQParamsQuantizationSpec,
                                                                 DerivedQuantizationSpec)):
                    raise TypeError(f"{node.name}: unknown spec type {type(spec).__name__}")
            output = annotation.output_qspec
            if isinstance(output, SharedQuantizationSpec):
                self._output(node, self._module_of(output.edge_or_node))
            elif isinstance(output, QuantizationSpec):
                self._output(node, self._make(output, node, None))
            elif isinstance(output, FixedQParamsQuantizationSpec):
                self._output(node, FixedQParamsObserver(output))

    def _output(self, node: Node, module: nn.Module) -> None:
        """Observe ``node``'s output for all its users; edges deferred to it read that observer."""
        call = self.output_nodes[node] = self._call(node, module)
        for producer, consumer in [e for e in self.deferred if e[0] is node]:
            self.edge_nodes[(producer, consumer)] = call

    def _edge(self, producer: Node, consumer: Node, spec: QuantizationSpec, sharing: bool) -> None:
        if spec.is_dynamic and not self.qat:
            return  # convert inserts choose_qparams / quantize / dequantize
        if producer.op == "get_attr":
            if self.qat:
                self.edge_nodes[(producer, consumer)] = self._call(producer, self._make(spec, producer, consumer), consumer)
            return  # post-training weights are quantized from their values at convert
        if _has_output_spec(producer):  # implicit sharing: the consumer reads the producer's output observer
            self.deferred.append((producer, consumer))
            return
        key = (producer, _maker_key(spec.observer_or_fake_quant_ctr), spec.qtype, spec.symmetric, spec.is_dynamic)
        if sharing and spec.smoothing is None and key in self.shared:
            self.edge_nodes[(producer, consumer)] = self.shared[key]
            consumer.replace_input_with(producer, self.shared[key])
        else:
            observer = self._call(producer, self._make(spec, producer, consumer), consumer)
            self.edge_nodes[(producer, consumer)] = observer
            if spec.smoothing is None:
                self.shared[key] = observer

    def _shared_edge(self, producer: Node, consumer: Node, spec: SharedQuantizationSpec) -> None:
        module = self._module_of(spec.edge_or_node)
        self.edge_nodes[(producer, consumer)] = self._call(producer, module, consumer)

    def _module_of(self, edge_or_node) -> nn.Module:
        node = self.edge_nodes.get(edge_or_node) if isinstance(edge_or_node, tuple) else self.output_nodes.get(edge_or_node)
        if node is None:
            raise ValueError(f"a SharedQuantizationSpec refers to {edge_or_node}, which has no quantization spec of its own")
        return self.model.get_submodule(node.target)

    def _make(self, spec: QuantizationSpec, producer: Node, consumer: Node | None) -> nn.Module:
        if not self.qat:
            if spec.smoothing is not None:
                return SmoothingObserver(spec.qtype, spec.symmetric, spec.smoothing)
            if spec.observer_or_fake_quant_ctr is not None:
                return spec.observer_or_fake_quant_ctr()
            return MinMaxObserver(spec.qtype, spec.symmetric)
        if producer.op == "get_attr":
            weight = attribute(self.model, producer.target)
            granular = weight_spec(_scheme(spec), spec.qtype, spec.group_size, per_tensor=spec.ch_axis is None)
            return WeightFakeQuantizer(granular, weight, resolve_block_size(weight.shape, spec.block_size(weight.dim())))
        granularity = "per_token" if spec.per_token else "per_tensor"
        mode = "dynamic" if spec.is_dynamic else "static"
        activation = ActivationSpec(mode, spec.qtype, granularity, spec.symmetric, None if spec.is_dynamic else "moving_average")
        val = producer.meta.get("val")
        return ActivationFakeQuantizer(activation, device=None if val is None else val.device)

    def _call(self, producer: Node, module: nn.Module, consumer: Node | None = None) -> Node:
        """Call ``module`` on ``producer``'s output; rewire ``consumer`` (or every other user) to the call."""
        name = next((n for n, m in self.model.named_children() if m is module), None)
        if name is None:
            name = f"{OBSERVER_PREFIX}{self.count}"
            self.count += 1
            self.model.add_module(name, module)
        with self.model.graph.inserting_after(producer):
            call = self.model.graph.call_module(name, (producer,))
        call.meta["val"] = producer.meta.get("val")
        if consumer is not None:
            consumer.replace_input_with(producer, call)
        else:
            producer.replace_all_uses_with(call, delete_user_cb=lambda user: user is not call)
        return call


def _has_output_spec(node: Node) -> bool:
    annotation = annotation_of(node)
    return annotation is not None and isinstance(annotation.output_qspec, (QuantizationSpec, SharedQuantizationSpec,
                                                                           FixedQParamsQuantizationSpec))


def _maker_key(maker):
    """Observer makers that build alike compare equal (``functools.partial`` of one class and arguments)."""
    if isinstance(maker, functools.partial):
        return maker.func, maker.args, tuple(sorted(maker.keywords.items()))
    return maker


def _scheme(spec: QuantizationSpec) -> str:
    """The weight scheme name of a weight spec (what WeightSpec records; fake quantization reads only the qtype)."""
    if spec.dtype.is_floating_point:
        return "float8"
    return {8: "int8", 4: "int4"}.get(get_qtype(spec.qtype).bits, "intx")
