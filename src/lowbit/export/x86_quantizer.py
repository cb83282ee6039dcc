"""The x86 Quantizer: lowbit configs decide how each node of an exported graph is quantized.

``X86Quantizer().set_global(StaticInt8())`` annotates what eager ``prepare``/``quantize_`` would quantize with
the same config, so eager PTQ, QAT and graphs share one description of numerics:

* linear (``aten.linear``), conv1d/2d/3d: the input activation (static or dynamic, as the config says) and
  the weight (per output channel, or per group); a following ReLU, or an add (+ ReLU) of a residual, joins
  the conv/linear's partition so lowering can fuse it; a constant input (a buffer) stays float, its weight
  is still quantized;
* matmul / bmm of two activations (attention): both inputs, static configs only;
* embedding: the weight only, for configs that quantize embeddings (``supports_embedding``), set for them by
  module type, name or op (the global config leaves tables float, as ``quantize_``'s default filter does);
* pooling, cat and flatten between quantized ops: they share their input's qparams.

Overrides: :meth:`set_module_name` (a module and its children) beats :meth:`set_module_type` beats
:meth:`set_object_type` (an aten op or the torch function that makes it) beats :meth:`set_global`; ``None``
leaves the matching nodes float.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from ..calibration.observers import OBSERVERS
from ..configs import QuantConfig
from ..primitives.qtypes import get_qtype
from .graph_utils import ADDMM, attribute, weight_edge
from .annotation import (
    QuantizationSpec, Quantizer, SharedQuantizationSpec, annotate, annotation_of, is_annotated,
)

aten = torch.ops.aten
LINEAR_OPS = (aten.linear.default,)
CONV_OPS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default)
MATMUL_OPS = (aten.matmul.default, aten.bmm.default)
EMBEDDING_OPS = (aten.embedding.default,)
RELU_OPS = (aten.relu.default, aten.relu_.default)
ADD_OPS = (aten.add.Tensor, aten.add_.Tensor)
SHARING_OPS = (aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default, aten.avg_pool1d.default,
               aten.avg_pool2d.default, aten.avg_pool3d.default, aten.adaptive_avg_pool1d.default,
               aten.adaptive_avg_pool2d.default, aten.flatten.using_ints, aten.cat.default)
FUNCTION_OPS = {F.linear: aten.linear.default, F.conv1d: aten.conv1d.default, F.conv2d: aten.conv2d.default,
                F.conv3d: aten.conv3d.default, torch.matmul: aten.matmul.default, torch.bmm: aten.bmm.default,
                F.embedding: aten.embedding.default}


def weight_qspec(config: QuantConfig) -> QuantizationSpec:
    """The weight spec of ``config``: its qtype, per output channel (axis 0) or per group."""
    w = config.spec().weight
    qt = get_qtype(w.qtype)
    bounds = {} if qt.is_float else {"quant_min": int(qt.qmin), "quant_max": int(qt.qmax)}
    if w.granularity == "per_tensor":
        qscheme, axis = (torch.per_tensor_symmetric if w.symmetric else torch.per_tensor_affine), None
    else:
        qscheme, axis = (torch.per_channel_symmetric if w.symmetric else torch.per_channel_affine), 0
    return QuantizationSpec(qt.storage, qscheme=qscheme, ch_axis=axis, group_size=w.group_size, **bounds)


def activation_qspec(config: QuantConfig) -> QuantizationSpec | None:
    """The input-activation spec of ``config`` (None for weight-only configs): dynamic per token / per tensor, or
    static per tensor with the config's observer and smoothing."""
    a = config.spec().activation
    if a is None:
        return None
    qt = get_qtype(a.qtype)
    bounds = {} if qt.is_float else {"quant_min": int(qt.qmin), "quant_max": int(qt.qmax)}
    qscheme = torch.per_tensor_symmetric if a.symmetric else torch.per_tensor_affine
    if a.mode == "dynamic":
        return QuantizationSpec(qt.storage, qscheme=qscheme, is_dynamic=True, per_token=a.granularity == "per_token", **bounds)
    observer = functools.partial(OBSERVERS[a.observer], a.qtype, a.symmetric)
    return QuantizationSpec(qt.storage, observer, qscheme=qscheme, smoothing=a.smoothing,
                            **bounds)


def _module_stack(node: Node) -> list[tuple[str, str]]:
    """(fqn, qualified type name) of the modules a node was traced in, innermost last."""
    return [(fqn, kind if isinstance(kind, str) else f"{kind.__module__}.{kind.__qualname__}")
            for fqn, kind in (node.meta.get("nn_module_stack") or {}).values()]


def _type_name(module_type: type) -> str:
    return f"{module_type.__module__}.{module_type.__qualname__}"


def _is_weight(node) -> bool:
    return isinstance(node, Node) and node.op == "get_attr"


def _is_activation(node) -> bool:
    return isinstance(node, Node) and node.op != "get_attr" and isinstance(node.meta.get("val"), torch.Tensor) \
        and node.meta["val"].is_floating_point()


class X86Quantizer(Quantizer):
    """Annotates exported graphs for lowbit's x86 kernels from lowbit configs.

    Example:
        >>> import lowbit
        >>> from lowbit.export import X86Quantizer, prepare_pt2e
        >>> model = torch.nn.Sequential(torch.nn.Linear(16, 8)).eval()
        >>> graph = torch.export.export(model, (torch.randn(2, 16),)).module()
        >>> prepared = prepare_pt2e(graph, X86Quantizer().set_global(lowbit.StaticInt8()))
    """

    def __init__(self):
        self.global_config: QuantConfig | None = None
        self.module_name_configs: dict[str, QuantConfig | None] = {}
        self.module_type_configs: dict[str, QuantConfig | None] = {}
        self.object_type_configs: dict = {}

    def set_global(self, config: QuantConfig | None) -> "X86Quantizer":
        self.global_config = _check_config(config)
        return self

    def set_module_name(self, name: str, config: QuantConfig | None) -> "X86Quantizer":
        """``config`` for the module at ``name`` (a dotted path of the exported model) and its children."""
        if not isinstance(name, str):
            raise TypeError(f"module name must be a str; received {type(name).__name__}")
        self.module_name_configs[name] = _check_config(config)
        return self

    def set_module_type(self, module_type: type, config: QuantConfig | None) -> "X86Quantizer":
        """``config`` for nodes traced inside modules of ``module_type`` (e.g. ``torch.nn.Linear``)."""
        if not isinstance(module_type, type):
            raise TypeError(f"module type must be a class; received {module_type!r}")
        self.module_type_configs[_type_name(module_type)] = _check_config(config)
        return self

    def set_object_type(self, op, config: QuantConfig | None) -> "X86Quantizer":
        """``config`` for one op: an aten op (``torch.ops.aten.linear.default``) or the function that makes it
        (``torch.nn.functional.linear``, ``torch.matmul``, ...)."""
        target = FUNCTION_OPS.get(op, op)
        if target not in LINEAR_OPS + CONV_OPS + MATMUL_OPS + EMBEDDING_OPS:
            raise ValueError(f"set_object_type takes a linear, conv, matmul/bmm or embedding op or function; received {op!r}")
        self.object_type_configs[target] = _check_config(config)
        return self

    def config_for(self, node: Node, use_global: bool = True) -> QuantConfig | None:
        """The config that applies to ``node`` (None: keep it float); ``use_global=False``: overrides only."""
        stack = _module_stack(node)
        names = [(len(name), name) for name in self.module_name_configs
                 if any(fqn == name or fqn.startswith(name + ".") or name == "" for fqn, _ in stack)]
        if names:
            return self.module_name_configs[max(names)[1]]
        for _, kind in reversed(stack):
            if kind in self.module_type_configs:
                return self.module_type_configs[kind]
        if node.target in self.object_type_configs:
            return self.object_type_configs[node.target]
        return self.global_config if use_global else None

    def annotate(self, model: GraphModule) -> GraphModule:
        nodes = [n for n in model.graph.nodes if n.op == "call_function" and not is_annotated(n)]
        for node in nodes:
            config = self.config_for(node)
            if config is None or is_annotated(node):
                continue
            if node.target in LINEAR_OPS + CONV_OPS + (ADDMM,):
                self._annotate_weighted(model, node, config)
            elif node.target in EMBEDDING_OPS and _is_weight(node.args[0]):
                config = self.config_for(node, use_global=False)  # tables are quantized on request, as quantize_'s filter does
                if config is not None and config.supports_embedding:
                    annotate(node, {node.args[0]: weight_qspec(config)})
            elif node.target in MATMUL_OPS:
                act = activation_qspec(config)
                if act is not None and not act.is_dynamic and all(_is_activation(a) for a in node.args[:2]):
                    plain = replace(act, smoothing=None)
                    annotate(node, {node.args[0]: plain, node.args[1]: plain})
        for node in reversed(nodes):  # consumers first, so chains of pooling/flatten share along
            if node.target in SHARING_OPS and not is_annotated(node):
                self._annotate_sharing(node)
        return model

    def _annotate_weighted(self, model: GraphModule, node: Node, config: QuantConfig) -> None:
        x, weight = weight_edge(node)
        if not _is_weight(weight) or (node.target in CONV_OPS and not config.supports_conv):
            return  # a computed weight stays float
        w_spec, value = weight_qspec(config), attribute(model, weight.target)
        if node.target is ADDMM:  # per output channel = per column of the stored (in, out) weight
            if w_spec.group_size is not None or value.dim() != 2:
                return  # groups run along the stored weight's rows: not a layout the graph ops express here
            w_spec, value = replace(w_spec, ch_axis=1 if w_spec.ch_axis is not None else None), value.t()
        config.check_weight(value, weight.target)
        act = activation_qspec(config)
        if act is not None and node.target in CONV_OPS:  # SmoothQuant is for linear layers
            act = replace(act, smoothing=None)
        inputs = {weight: w_spec}
        if act is not None and _is_activation(x):
            inputs[x] = act
        annotate(node, inputs)
        self._annotate_epilogue(node)

    def _annotate_epilogue(self, node: Node) -> None:
        """A ReLU, or a residual add (+ ReLU), right after the op joins its partition (no qparams between)."""
        users = list(node.users)
        if len(users) != 1:
            return
        (user,) = users
        if user.target in ADD_OPS and len(user.args) == 2 and all(isinstance(a, Node) for a in user.args):
            annotate(user)
            after = list(user.users)
            if len(after) == 1 and after[0].target in RELU_OPS:
                annotate(after[0])
        elif user.target in RELU_OPS:
            annotate(user)

    def _annotate_sharing(self, node: Node) -> None:
        """Pooling / cat / flatten whose output feeds a quantized input: observe its input(s), share the qparams."""
        spec = next((a.input_qspec_map[node] for a in map(annotation_of, node.users)
                     if a is not None and isinstance(a.input_qspec_map.get(node), QuantizationSpec)
                     and not a.input_qspec_map[node].is_dynamic), None)
        if spec is None:
            return
        inputs = node.args[0] if node.target is aten.cat.default else [node.args[0]]
        if not all(_is_activation(a) for a in inputs):
            return
        plain = replace(spec, smoothing=None)
        first = (inputs[0], node)
        specs = {inputs[0]: plain, **{a: SharedQuantizationSpec(first) for a in inputs[1:]}}
        annotate(node, specs, output=SharedQuantizationSpec(first))

    def validate(self, model: GraphModule) -> None:
        for node in model.graph.nodes:
            annotation = annotation_of(node)
            if annotation is None:
                continue
            for edge_input in annotation.input_qspec_map:
                if edge_input not in node.all_input_nodes:
                    raise ValueError(f"{node.name}: an input spec names {edge_input.name}, which is not an input of it")


def _check_config(config):
    if config is not None and not isinstance(config, QuantConfig):
        raise TypeError(f"expected a lowbit config (e.g. lowbit.StaticInt8()) or None; received {type(config).__name__}")
    if config is not None and hasattr(config, "base_config"):
        raise TypeError("QATConfig is for eager models; for graphs use prepare_qat_pt2e with the base config")
    spec = None if config is None else config.spec()
    graph_ready = spec is None or spec.weight.algorithm == "rtn" or spec.weight.algorithm == "smoothquant" and \
        spec.activation.mode == "static"
    if not graph_ready:
        raise ValueError(f"graphs quantize weights by round to nearest, with SmoothQuant for static activations; received "
                         f"{config.label()}: run its algorithm in eager mode (lowbit.prepare / calibrate / convert) first")
    return config
