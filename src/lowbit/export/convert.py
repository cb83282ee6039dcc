"""``convert_pt2e``: observers and fake quantizers become quantize / dequantize nodes, weights int8 constants.

Everything is computed first (every observer's qparams, every quantized weight), then the graph is rewritten,
so a missing calibration raises :class:`~lowbit.NotCalibratedError` with the graph unchanged. Weights are
quantized with lowbit's primitives exactly as the eager flows quantize them (min/max per block, or the learned
qparams of a QAT fake quantizer), and stored as buffers read by ``lowbit::dequantize_affine``; the node shapes
are described in :mod:`lowbit.export.qdq`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from ..calibration.observers import NotCalibratedError, Observer
from ..primitives.affine import check_finite, choose_qparams, quantize
from ..primitives.qtypes import get_qtype
from ..qat.fake_quantizers import ActivationFakeQuantizer, WeightFakeQuantizer
from .annotation import (
    DerivedQuantizationSpec, QuantizationSpec, annotation_of,
)
from .graph_utils import (
    ADDMM, add_constant, attribute, check_graph_module, drop_unused_attributes, fold_batch_norms, set_train_mode, weight_edge,
)
from .prepare import OBSERVER_PREFIX, PT2E_KEY, SmoothingObserver
from .qdq import CHOOSE_QPARAMS, DEQUANTIZE, QUANTIZE, resolve_block_size


@dataclass
class _Quantized:
    """A planned activation edge (qparams for a quantize/dequantize pair) or weight (values + qparams)."""

    qtype: str
    block: list[int]
    scale: torch.Tensor | None  # None: dynamic, chosen per call
    zero_point: torch.Tensor | None
    values: torch.Tensor | None = None  # quantized weight
    smooth: torch.Tensor | None = None  # SmoothQuant divisor of the activation
    symmetric: bool = True
    node: Node | None = None  # a weight's dequantize node, once written (consumers of a shared weight reuse it)


def convert_pt2e(model: GraphModule) -> GraphModule:
    """Turn a calibrated (or QAT-trained) prepared graph into a quantized one for inference, in place (its remaining
    float parameters, e.g. biases, no longer require grad); returns it.

    Raises:
        NotCalibratedError: an observer saw no data (the graph is unchanged).
    """
    check_graph_module(model, "convert_pt2e")
    if PT2E_KEY not in model.meta:
        raise ValueError("convert_pt2e takes a graph returned by prepare_pt2e or prepare_qat_pt2e; received one that "
                         "was not prepared (or is already converted)")
    _check_calibrated(model)
    if model.meta[PT2E_KEY]["qat"]:
        set_train_mode(model, False)
        fold_batch_norms(model)
    smoothing = _smoothing_plan(model)
    activations = _activation_plan(model, smoothing)
    weights = _weight_plan(model, smoothing)
    spec_edges = _spec_edge_plan(model)
    for node, plan in activations.items():
        _rewrite_activation(model, node, plan)
    for (producer, consumer), plan in weights.items():
        _rewrite_weight(model, producer, consumer, plan)
    for producer, consumer, plan in spec_edges:
        dq = _qdq(model, producer, plan, f"{consumer.name}_{producer.name}", producer.meta["val"].dtype, consumer)
        consumer.replace_input_with(producer, dq)
    for node in [n for n in model.graph.nodes if n.op == "call_module" and n.target.startswith(OBSERVER_PREFIX)]:
        model.graph.erase_node(node)
    for name in [n for n, _ in model.named_children() if n.startswith(OBSERVER_PREFIX)]:
        delattr(model, name)
    for node in model.graph.nodes:
        node.meta.pop("quantization_annotation", None)
    model.graph.eliminate_dead_code()
    drop_unused_attributes(model)
    del model.meta[PT2E_KEY]
    for parameter in model.parameters():  # an inference graph: compiled plain calls need no backward
        parameter.requires_grad_(False)
    model.graph.lint()
    model.recompile()
    return model


def _observer_nodes(model: GraphModule) -> list[tuple[Node, torch.nn.Module]]:
    return [(n, model.get_submodule(n.target)) for n in model.graph.nodes
            if n.op == "call_module" and n.target.startswith(OBSERVER_PREFIX)]


def _check_calibrated(model: GraphModule) -> None:
    blind = sorted({n.target for n, m in _observer_nodes(model)
                    if isinstance(m, Observer) and not m.observed
                    or isinstance(m, ActivationFakeQuantizer) and m.static and not m.observed})
    if blind:
        raise NotCalibratedError(f"observers {blind[:5]}{' ...' if len(blind) > 5 else ''} saw no data: call the prepared "
                                 f"graph on calibration inputs (or train it, for QAT) before convert_pt2e")


def _weight_of(model: GraphModule, consumer: Node) -> torch.Tensor:
    """The (out, in) weight of a linear or Conv1D addmm node."""
    weight = weight_edge(consumer)[1]
    if weight.op == "call_module":  # a QAT weight fake quantizer
        weight = weight.args[0]
    value = attribute(model, weight.target)
    return value.t() if consumer.target is ADDMM else value


def _smoothing_plan(model: GraphModule) -> dict[Node, torch.Tensor]:
    """consumer linear -> its SmoothQuant factors s."""
    plan = {}
    for node, module in _observer_nodes(model):
        if isinstance(module, SmoothingObserver):
            for consumer in node.users:
                plan[consumer] = module.smoothing(_weight_of(model, consumer))
    return plan


def _activation_plan(model: GraphModule, smoothing: dict[Node, torch.Tensor]) -> dict[Node, _Quantized]:
    plan = {}
    for node, module in _observer_nodes(model):
        rank = node.args[0].meta["val"].dim()
        if isinstance(module, SmoothingObserver):
            (consumer,) = node.users
            smooth = smoothing[consumer]
            scale, zero_point = module.smoothed_qparams(smooth)
            plan[node] = _Quantized(module.qtype, [-1] * rank, scale, zero_point, smooth=smooth)
        elif isinstance(module, Observer):
            scale, zero_point = module.calculate_qparams()
            plan[node] = _Quantized(module.qtype, [-1] * rank, scale, zero_point)
        elif isinstance(module, ActivationFakeQuantizer):
            spec = module.spec
            if module.static:
                scale, zero_point = module.convert_qparams()
                plan[node] = _Quantized(spec.qtype, [-1] * rank, scale, zero_point)
            else:
                block = [1] * (rank - 1) + [-1] if spec.granularity == "per_token" else [-1] * rank
                plan[node] = _Quantized(spec.qtype, block, None, None, symmetric=spec.symmetric)
    return plan


def _weight_plan(model: GraphModule, smoothing: dict[Node, torch.Tensor]) -> dict[tuple[Node, Node], _Quantized]:
    """(weight node, consumer) -> the quantized weight; shared by consumers with the same spec and no smoothing."""
    plan, done = {}, {}
    for consumer in model.graph.nodes:
        annotation = annotation_of(consumer)
        if annotation is None:
            continue
        for producer, spec in annotation.input_qspec_map.items():
            edge_input = _edge_input(consumer, producer)
            fake = model.get_submodule(edge_input.target) if edge_input.op == "call_module" else None
            if producer.op != "get_attr" or not isinstance(spec, QuantizationSpec) or spec.is_dynamic:
                continue
            weight = attribute(model, producer.target).detach()
            smooth = smoothing.get(consumer)
            key = (producer, id(spec), None if smooth is None else id(smooth))
            if key in done:
                plan[(edge_input, consumer)] = done[key]
                continue
            check_finite(weight, producer.target)
            if smooth is not None:  # the input channels: columns of (out, in), rows of Conv1D's (in, out)
                factor = smooth[:, None] if consumer.target is ADDMM else smooth
                weight = (weight.float() * factor).to(weight.dtype)
            block = resolve_block_size(weight.shape, spec.block_size(weight.dim()))
            learned = fake.convert_qparams(weight) if isinstance(fake, WeightFakeQuantizer) else None
            if learned is not None:
                scale, zero_point = learned
            else:
                scale, zero_point = choose_qparams(weight, block, spec.qtype, symmetric=spec.symmetric, name=producer.target)
            values = quantize(weight, scale, zero_point, block, spec.qtype)
            done[key] = plan[(edge_input, consumer)] = _Quantized(spec.qtype, spec.block_size(weight.dim()), scale,
                                                                  zero_point, values=values)
    return plan


def _edge_input(consumer: Node, producer: Node) -> Node:
    """The node ``consumer`` reads for ``producer`` now: an observer / fake quantizer call on it, or itself."""
    for node in consumer.all_input_nodes:
        if node is producer or node.op == "call_module" and node.target.startswith(OBSERVER_PREFIX) and node.args[0] is producer:
            return node
    raise ValueError(f"{consumer.name} no longer reads {producer.name}: the graph changed after prepare_pt2e")


def _qdq(model: GraphModule, x: Node, plan: _Quantized, name: str, out_dtype: torch.dtype, before: Node,
         reuse: bool = False) -> Node:
    """quantize -> dequantize of ``x`` (with a dynamic choose_qparams when the plan has no scale); ``reuse``: the
    qparams buffers named ``name`` may exist already (one shared observer)."""
    graph = model.graph
    if plan.smooth is not None:
        smooth = add_constant(model, f"{name}_smooth", plan.smooth, before)
        with graph.inserting_before(before):
            x = graph.call_function(torch.ops.aten.div.Tensor, (x, smooth))
    if plan.scale is None:
        with graph.inserting_before(before):
            qparams = graph.call_function(CHOOSE_QPARAMS, (x, plan.block, plan.qtype, plan.symmetric))
            scale = graph.call_function(operator.getitem, (qparams, 0))
            zero_point = graph.call_function(operator.getitem, (qparams, 1))
    else:
        scale = add_constant(model, f"{name}_scale", plan.scale.float(), before, reuse)
        zero_point = None if plan.zero_point is None else add_constant(model, f"{name}_zero_point", plan.zero_point,
                                                                      before, reuse)
    with graph.inserting_before(before):
        q = graph.call_function(QUANTIZE, (x, scale, zero_point, plan.block, plan.qtype))
        return graph.call_function(DEQUANTIZE, (q, scale, zero_point, plan.block, out_dtype))


def _rewrite_activation(model: GraphModule, node: Node, plan: _Quantized) -> None:
    x = node.args[0]
    dq = _qdq(model, x, plan, f"act{node.target.removeprefix(OBSERVER_PREFIX)}", x.meta["val"].dtype, node, reuse=True)
    node.replace_all_uses_with(dq)


def _rewrite_weight(model: GraphModule, edge_input: Node, consumer: Node, plan: _Quantized) -> None:
    weight_node = edge_input.args[0] if edge_input.op == "call_module" else edge_input
    dtype = attribute(model, weight_node.target).dtype
    cached = plan.node
    if cached is None:
        graph = model.graph
        values = add_constant(model, f"{weight_node.target}_q", plan.values, consumer)
        scale = add_constant(model, f"{weight_node.target}_scale", plan.scale.float(), consumer)
        zero_point = None if plan.zero_point is None else add_constant(model, f"{weight_node.target}_zero_point",
                                                                      plan.zero_point, consumer)
        with graph.inserting_before(consumer):
            cached = graph.call_function(DEQUANTIZE, (values, scale, zero_point, plan.block, dtype))
        plan.node = cached
    consumer.replace_input_with(edge_input, cached)


def _spec_edge_plan(model: GraphModule) -> list[tuple[Node, Node, _Quantized]]:
    """Dynamic edges (qparams per call) and derived specs (qparams from other edges' observers):
    (producer, consumer, plan)."""
    plan = []
    for consumer in list(model.graph.nodes):
        annotation = annotation_of(consumer)
        if annotation is None:
            continue
        for producer, spec in annotation.input_qspec_map.items():
            rank = producer.meta["val"].dim()
            if isinstance(spec, QuantizationSpec) and spec.is_dynamic and _edge_input(consumer, producer) is producer:
                plan.append((producer, consumer, _Quantized(spec.qtype, spec.block_size(rank), None, None,
                                                            symmetric=spec.symmetric)))
                continue
            if isinstance(spec, DerivedQuantizationSpec):
                observers = [model.get_submodule(_observer_for(model, e).target) for e in spec.derived_from]
                scale, zero_point = spec.derive_qparams_fn(observers)
            else:
                continue
            qt = spec.qtype
            zero_point = None if spec.symmetric else torch.as_tensor(zero_point).to(get_qtype(qt).storage)
            plan.append((producer, consumer, _Quantized(qt, [-1] * rank, torch.as_tensor(scale).float(), zero_point)))
    return plan


def _observer_for(model: GraphModule, edge_or_node) -> Node:
    if isinstance(edge_or_node, tuple):
        producer, consumer = edge_or_node
        return _edge_input(consumer, producer)
    users = [u for u in edge_or_node.users if u.op == "call_module" and u.target.startswith(OBSERVER_PREFIX)]
    if not users:
        raise ValueError(f"a DerivedQuantizationSpec refers to {edge_or_node.name}, which has no observer")
    return users[0]
