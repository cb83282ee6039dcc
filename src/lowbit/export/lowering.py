"""Lowering: converted Q/DQ graphs rewritten to lowbit's fused int8 kernels (:mod:`lowbit.export.fused_ops`).

:func:`lower` replaces, in a converted graph or in the graph Dynamo captures of one,

- ``linear(dq(q(x)), dq(w_q), b)`` (static, optionally ``q(x / smooth)``) by ``lowbit::qlinear_static``,
- ``linear(dq(q(x, choose_qparams(x))), dq(w_q), b)`` (dynamic) by ``lowbit::qlinear_dynamic``,
- ``conv(dq(q(x)), dq(w_q), b, ...)`` followed by ``relu``, ``add`` or ``add`` then ``relu`` by
  ``lowbit::qconv_static`` with the residual and post-op fused,

for int8 activations and symmetric int8 weights; the dead Q/DQ nodes go. Other patterns (float8, int4 weights,
matmul / bmm of two quantized inputs) stay as they are: the Q/DQ graph computes them in float.

Importing this module registers :data:`LOWERING_PASS` as Inductor's ``pre_grad_custom_pass`` (after any pass
already set), so ``torch.compile(converted)`` lowers with ``torch._inductor.config.freezing`` on or off; each
replacement is counted in ``torch._dynamo.utils.counters["lowbit"]`` by pattern name, and quantized linear / conv
nodes left as they are under ``"not_lowered"``, with a warning (when the pass runs: a
compilation served from Inductor's FX graph cache reuses lowered code without counting). Importing this module
imports Inductor's config (about 1.5 s once per process).
"""

from __future__ import annotations

import operator
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch._inductor.config as inductor_config
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass, get_custom_graph_passes
from torch.fx import Graph, GraphModule, Node

from ..tensors.base import code_fingerprint
from .fused_ops import QCONV_STATIC, QLINEAR_DYNAMIC, QLINEAR_STATIC
from .qdq import CHOOSE_QPARAMS, DEQUANTIZE, QUANTIZE, TRACING_HOOKS

aten = torch.ops.aten
_CONVS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default)
_RELUS = (aten.relu.default, aten.relu_.default)
_SCHEMAS = {  # argument names and defaults of the ops the patterns read
    QUANTIZE: (("input", "scale", "zero_point", "block_size", "qtype"), {}),
    DEQUANTIZE: (("input", "scale", "zero_point", "block_size", "output_dtype"), {}),
    CHOOSE_QPARAMS: (("input", "block_size", "qtype", "symmetric"), {}),
    aten.linear.default: (("input", "weight", "bias"), {"bias": None}),
    aten.div.Tensor: (("self", "other"), {}),
    aten.add.Tensor: (("self", "other", "alpha"), {"alpha": 1}),
    **{conv: (("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
              {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}) for conv in _CONVS},
}


def _is(node: Any, *targets) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def _args(node: Node) -> dict[str, Any]:
    """``node``'s arguments by name (positional, keyword or default)."""
    names, defaults = _SCHEMAS[node.target]
    return {**defaults, **dict(zip(names, node.args)), **node.kwargs}


def _value(node: Any):
    """The example tensor (fake or real) a node stands for, where the graph records one."""
    if not isinstance(node, Node):
        return None
    value = node.meta.get("val", node.meta.get("example_value"))
    if value is None and node.op == "get_attr" and node.graph.owning_module is not None:
        value = node.graph.owning_module
        for name in node.target.split("."):
            value = getattr(value, name, None)
    return value if isinstance(value, torch.Tensor) else None


def _constant(node: Any) -> bool:
    """A buffer: a ``get_attr`` node, or a placeholder in the graph Dynamo captures of a converted module."""
    return isinstance(node, Node) and node.op in ("get_attr", "placeholder")


def _dtype(node: Any) -> Optional[torch.dtype]:
    value = _value(node)
    return None if value is None else value.dtype


@dataclass
class _Weight:
    w_q: Node
    scale: Node
    block: list[int]
    dq: Node


def _int8_weight(dq: Any) -> Optional[_Weight]:
    """``dequantize_affine(w_q, scale, None, block, float32)`` of a symmetric int8 weight buffer."""
    if not _is(dq, DEQUANTIZE):
        return None
    a = _args(dq)
    if not (_constant(a["input"]) and _constant(a["scale"]) and a["zero_point"] is None):
        return None
    if _dtype(a["input"]) != torch.int8 or a["output_dtype"] != torch.float32:
        return None
    return _Weight(a["input"], a["scale"], list(a["block_size"]), dq)


@dataclass
class _StaticInput:
    x: Node
    scale: Node
    zero_point: Optional[Node]
    smooth: Optional[Node]
    nodes: tuple[Node, ...]  # dq, q (, div): erased once unused


def _static_input(dq: Any) -> Optional[_StaticInput]:
    """``dq(q(x [/ smooth], s, zp, [-1]*rank, "int8"), s, zp, [-1]*rank, float32)`` with buffer qparams."""
    if not _is(dq, DEQUANTIZE) or not _is(_args(dq)["input"], QUANTIZE):
        return None
    d, q = _args(dq), _args(_args(dq)["input"])
    same = q["scale"] is d["scale"] and q["zero_point"] is d["zero_point"] and list(q["block_size"]) == list(d["block_size"])
    if not same or q["qtype"] != "int8" or d["output_dtype"] != torch.float32 or any(b != -1 for b in d["block_size"]):
        return None
    if not _constant(d["scale"]) or not (d["zero_point"] is None or _constant(d["zero_point"])):
        return None
    x, smooth, nodes = q["input"], None, (dq, d["input"])
    if _is(x, aten.div.Tensor) and _constant(_args(x)["other"]) and len(x.users) == 1:
        value = _value(_args(x)["other"])
        if value is not None and value.dim() == 1:  # SmoothQuant's (K,) divisors
            x, smooth, nodes = _args(x)["self"], _args(x)["other"], nodes + (x,)
    return _StaticInput(x, d["scale"], d["zero_point"], smooth, nodes)


@dataclass
class _DynamicInput:
    x: Node
    granularity: str
    symmetric: bool
    nodes: tuple[Node, ...]  # dq, q, getitems, choose_qparams


def _dynamic_input(dq: Any) -> Optional[_DynamicInput]:
    """``dq(q(x, s, zp, block, "int8"), s, zp, block, float32)`` with ``s, zp = choose_qparams(x, block, "int8", sym)``
    and a per-token ([1, ..., 1, -1]) or per-tensor ([-1, ...]) block."""
    if not _is(dq, DEQUANTIZE) or not _is(_args(dq)["input"], QUANTIZE):
        return None
    d, q = _args(dq), _args(_args(dq)["input"])
    scale, zero = d["scale"], d["zero_point"]
    if not (_is(scale, operator.getitem) and _is(zero, operator.getitem) and scale.args[0] is zero.args[0]):
        return None
    choose = scale.args[0]
    if not _is(choose, CHOOSE_QPARAMS) or scale.args[1] != 0 or zero.args[1] != 1:
        return None
    c, block = _args(choose), list(d["block_size"])
    same = q["scale"] is scale and q["zero_point"] is zero and c["input"] is q["input"]
    if not same or list(q["block_size"]) != block or list(c["block_size"]) != block:
        return None
    if q["qtype"] != "int8" or c["qtype"] != "int8" or d["output_dtype"] != torch.float32:
        return None
    if all(b == -1 for b in block):
        granularity = "per_tensor"
    elif block[-1] == -1 and all(b == 1 for b in block[:-1]):
        granularity = "per_token"
    else:
        return None
    return _DynamicInput(c["input"], granularity, bool(c["symmetric"]), (dq, d["input"], scale, zero, choose))


def _replace(graph: Graph, last: Node, target, args: tuple, dead: tuple[Node, ...]) -> None:
    """Put ``target(*args)`` in place of ``last`` (the pattern's final node), then erase the pattern's nodes that
    nothing uses any more (a Q/DQ pair shared with another consumer stays for it)."""
    with graph.inserting_before(last):
        fused = graph.call_function(target, args)
    fused.meta.update({k: v for k, v in last.meta.items() if k in ("val", "example_value", "stack_trace", "nn_module_stack")})
    last.replace_all_uses_with(fused)
    for node in dict.fromkeys((last,) + dead):  # users before what they use
        if not node.users:
            graph.erase_node(node)


def _lower_linear(graph: Graph, linear: Node) -> Optional[str]:
    a = _args(linear)
    weight = _int8_weight(a["weight"])
    if weight is None or not (a["bias"] is None or _constant(a["bias"])):
        return None
    static = _static_input(a["input"])
    if static is not None:
        args = (static.x, static.scale, static.zero_point, static.smooth, weight.w_q, weight.scale, weight.block, a["bias"])
        _replace(graph, linear, QLINEAR_STATIC, args, static.nodes + (weight.dq,))
        return "linear_static"
    dynamic = _dynamic_input(a["input"])
    if dynamic is not None:
        args = (dynamic.x, dynamic.granularity, dynamic.symmetric, weight.w_q, weight.scale, weight.block, a["bias"])
        _replace(graph, linear, QLINEAR_DYNAMIC, args, dynamic.nodes + (weight.dq,))
        return "linear_dynamic"
    return None


def _only_user(node: Node) -> Optional[Node]:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _conv_epilogue(conv: Node) -> tuple[tuple[Node, ...], Optional[Node], str]:
    """``conv``'s fusable epilogue: the pattern's nodes from ``conv`` on (``add``, ``relu`` or ``add`` then ``relu``
    after it), the residual added (same shape as the result) and the post-op."""
    chain, other = (conv,), None
    user = _only_user(conv)
    if _is(user, aten.add.Tensor) and _args(user)["alpha"] == 1:
        a = _args(user)
        residual = a["other"] if a["self"] is conv else a["self"]
        values = _value(residual), _value(user)
        if isinstance(residual, Node) and residual is not conv and None not in values and values[0].shape == values[1].shape:
            chain, other, user = chain + (user,), residual, _only_user(user)
    if _is(user, *_RELUS):
        return chain + (user,), other, "relu"
    return chain, other, "none"


def _lower_conv(graph: Graph, conv: Node) -> Optional[str]:
    a = _args(conv)
    weight, static = _int8_weight(a["weight"]), _static_input(a["input"])
    if weight is None or static is None or static.smooth is not None or not (a["bias"] is None or _constant(a["bias"])):
        return None
    x, w = _value(static.x), _value(weight.w_q)
    if x is None or w is None or x.dim() != w.dim() or isinstance(a["padding"], str):
        return None  # unbatched input or string padding: the fused op takes neither
    dims = w.dim() - 2
    stride, padding, dilation = ([v] * dims if isinstance(v, int) else list(v) for v in (a["stride"], a["padding"], a["dilation"]))
    chain, other, post_op = _conv_epilogue(conv)
    args = (static.x, static.scale, static.zero_point, weight.w_q, weight.scale, weight.block, a["bias"], stride, padding,
            dilation, a["groups"], other, post_op)
    _replace(graph, chain[-1], QCONV_STATIC, args, chain[-2::-1] + static.nodes + (weight.dq,))
    return "conv_static" + ("_add" if other is not None else "") + ("_relu" if post_op == "relu" else "")


def lower_graph(graph: Graph) -> dict[str, int]:
    """Rewrite ``graph`` in place (see the module docstring); returns the number of replacements per pattern."""
    found: Counter[str] = Counter()
    for node in list(graph.nodes):  # a pattern erases only nodes before it and post-ops, never a linear or conv after it
        name = None
        if _is(node, aten.linear.default):
            name = _lower_linear(graph, node)
        elif _is(node, *_CONVS):
            name = _lower_conv(graph, node)
        if name is not None:
            found[name] += 1
            counters["lowbit"][name] += 1
    left = [n for n in graph.nodes if _is(n, aten.linear.default, *_CONVS) and any(_is(a, DEQUANTIZE) for a in n.args[:2])]
    if left:
        counters["lowbit"]["not_lowered"] += len(left)
        warnings.warn(f"{len(left)} quantized linear/conv nodes ({', '.join(n.name for n in left[:5])}"
                      f"{', ...' if len(left) > 5 else ''}) have no fused lowbit kernel (lowering takes int8 activations "
                      f"and symmetric int8 weights): they run as dequantize + float op", stacklevel=2)
    return dict(found)


def lower(gm: GraphModule) -> dict[str, int]:
    """Replace the Q/DQ patterns of a converted graph module with lowbit's fused int8 ops (in place, recompiled);
    returns the number of replacements per pattern (``"linear_static"``, ``"linear_dynamic"``, ``"conv_static"``,
    ``"conv_static_relu"``, ``"conv_static_add"``, ``"conv_static_add_relu"``).

    Example:
        >>> import lowbit.export.lowering as lowering
        >>> gm = torch.fx.symbolic_trace(torch.nn.Linear(4, 2))
        >>> lowering.lower(gm)  # a float graph: nothing to lower
        {}
    """
    if not isinstance(gm, GraphModule):
        raise TypeError(f"lower takes a torch.fx.GraphModule (a converted graph); received {type(gm).__name__}")
    found = lower_graph(gm.graph)
    gm.recompile()
    return found


class LoweringPass(CustomGraphPass):
    """:func:`lower_graph` as an Inductor pre-grad pass; its ``uuid`` (lowbit's source hash) keys the FX graph cache."""

    def __call__(self, graph: Graph) -> None:
        lower_graph(graph)

    def uuid(self) -> str:
        return code_fingerprint()


LOWERING_PASS = LoweringPass()


def register() -> None:
    """Set :data:`LOWERING_PASS` as Inductor's ``pre_grad_custom_pass``, after any pass already set (once). It runs
    again whenever a compilation traces a Q/DQ op: a library that sets the slot later (torchao's x86 quantizer does
    so on import) keeps its pass and lowbit's."""
    current = get_custom_graph_passes(inductor_config.pre_grad_custom_pass)
    if not any(isinstance(p, LoweringPass) for p in current):
        inductor_config.pre_grad_custom_pass = current + (LOWERING_PASS,) if current else LOWERING_PASS


register()
TRACING_HOOKS.append(register)
