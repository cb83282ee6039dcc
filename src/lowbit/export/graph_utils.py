"""Small graph helpers shared by prepare and convert: attribute access, BatchNorm folding, train/eval."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch.fx import GraphModule, Node

from ..bn_folding import bn_factor, folded_bias, scale_output_channels

aten = torch.ops.aten
CONV_TARGETS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default)
BATCH_NORM = aten.batch_norm.default  # (x, weight, bias, running_mean, running_var, training, momentum, eps, cudnn)
DROPOUT = aten.dropout.default  # (x, p, train)
ADDMM = aten.addmm.default  # transformers' Conv1D: addmm(bias, x, W) with W stored (in, out)


def weight_edge(node: Node) -> tuple[Node, Node]:
    """(input, weight) nodes of a linear, conv or Conv1D addmm node."""
    return (node.args[1], node.args[2]) if node.target is ADDMM else (node.args[0], node.args[1])


def check_graph_module(model, action: str) -> None:
    if not isinstance(model, GraphModule):
        raise TypeError(f"{action} takes the graph of an exported model, torch.export.export(model, args).module(); "
                        f"received {type(model).__name__}")


def attribute(model: GraphModule, target: str) -> torch.Tensor:
    """The tensor a get_attr ``target`` (a dotted path) names."""
    owner, _, name = target.rpartition(".")
    return getattr(model.get_submodule(owner), name)


def add_constant(model: GraphModule, name: str, value: torch.Tensor, before: Node, reuse: bool = False) -> Node:
    """Register ``value`` as a buffer of ``model`` under a fresh name built from ``name`` (``reuse``: the buffer
    already registered under ``name``, one observer's qparams read at several places); a get_attr node for it."""
    base = name.replace(".", "_")
    fresh, i = base, 0
    while hasattr(model, fresh) and not reuse:
        i += 1
        fresh = f"{base}_{i}"
    if not hasattr(model, fresh):
        model.register_buffer(fresh, value)
    value = getattr(model, fresh)
    with model.graph.inserting_before(before):
        node = model.graph.get_attr(fresh)
    node.meta["val"] = value
    return node


def fold_batch_norms(model: GraphModule) -> int:
    """Fold each eval-mode ``batch_norm`` whose input is a conv used only by it into the conv's weight and bias
    with :func:`lowbit.fuse`'s arithmetic (:mod:`lowbit.bn_folding`).
    Returns the number folded."""
    folded = 0
    for bn in [n for n in model.graph.nodes if n.target is BATCH_NORM]:
        conv, weight, bias, mean, var, training, _, eps = bn.args[:8]
        if training or not isinstance(conv, Node) or conv.target not in CONV_TARGETS or len(conv.users) != 1 \
                or conv.args[1].op != "get_attr":
            continue
        w = attribute(model, conv.args[1].target)
        conv_bias = conv.args[2] if len(conv.args) > 2 else None
        mean_v, var_v = attribute(model, mean.target), attribute(model, var.target)
        norm = SimpleNamespace(  # what lowbit.fuse's BatchNorm arithmetic reads of a module
            affine=True, eps=eps, running_mean=mean_v, running_var=var_v,
            weight=attribute(model, weight.target) if weight is not None else torch.ones_like(mean_v),
            bias=attribute(model, bias.target) if bias is not None else torch.zeros_like(mean_v))
        with torch.no_grad():
            factor = bn_factor(norm)
            new_w = scale_output_channels(w, factor)
            new_b = folded_bias(None if conv_bias is None else attribute(model, conv_bias.target), norm, factor)
        args = list(conv.args) + [None] * (3 - len(conv.args))
        args[1] = add_constant(model, f"{conv.args[1].target}_folded", new_w.detach(), conv)
        args[2] = add_constant(model, f"{conv.args[1].target}_folded_bias", new_b.detach(), conv)
        conv.args = tuple(args)
        bn.replace_all_uses_with(conv)
        model.graph.erase_node(bn)
        folded += 1
    model.graph.eliminate_dead_code()
    drop_unused_attributes(model)
    return folded


def drop_unused_attributes(model: GraphModule) -> None:
    """Delete buffers and parameters no get_attr node reads any more (the float weights a fold replaced)."""
    used = {n.target for n in model.graph.nodes if n.op == "get_attr"}
    called = {n.target for n in model.graph.nodes if n.op == "call_module"}
    for name, _ in list(model.named_buffers()) + list(model.named_parameters()):
        owner, _, attr = name.rpartition(".")
        if name not in used and not any(owner == c or owner.startswith(c + ".") for c in called):
            delattr(model.get_submodule(owner), attr)


def set_train_mode(model: GraphModule, train: bool) -> GraphModule:
    """Switch an exported graph's dropout and batch-norm nodes (their mode is an argument, not ``model.training``)
    and its observer / fake-quantizer modules to training or eval."""
    for node in model.graph.nodes:
        if node.target is DROPOUT:
            node.args = (*node.args[:2], train)
        elif node.target is BATCH_NORM:
            node.args = (*node.args[:5], train, *node.args[6:])
    model.recompile()
    for module in model.children():
        module.train(train)
    return model
