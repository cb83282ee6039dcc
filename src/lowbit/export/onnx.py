"""Export a converted graph to an ONNX QDQ model that ONNX Runtime runs with int8 kernels.

``lowbit::quantize_affine`` / ``dequantize_affine`` become ONNX ``QuantizeLinear`` / ``DequantizeLinear``
(per tensor: a scalar scale; per axis: a 1-D scale and ``axis``; blocks along one axis: ``block_size``), and
``choose_qparams_affine`` becomes the ReduceMin / ReduceMax arithmetic of lowbit's formula. The ops between
stay float in the file; ONNX Runtime's graph optimizations fuse ``DequantizeLinear -> MatMul / Gemm / Conv
(-> QuantizeLinear)`` into its int8 kernels (QGemm, QLinearConv, MatMulIntegerToFloat, ...). Rewrites of the
written graph give those kernels the forms they want, with the same numerics: int8 activations are stored as
uint8 with the zero point moved by 128; a Linear's float bias becomes ``DequantizeLinear(int32, input scale x
weight scale)`` (each output moves by at most half that scale); a Linear on dynamically quantized input (no
QDQ fusion takes run-time scales) becomes ``MatMulInteger`` times the two scales. A Conv fuses when its output
(or its ReLU's, with a zero point at the type's minimum) is quantized. Weight-only layers run in ONNX
Runtime's MatMulNBits, which at its default accuracy level 4 quantizes its input per block of 32 (session
option ``session.qdq_matmulnbits_accuracy_level``). Requires the optional packages
``onnx``, ``onnxscript`` and ``onnxruntime`` (``pip install lowbit[onnx]``).
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import torch

from ..primitives.qtypes import get_qtype
from .qdq import CHOOSE_QPARAMS, DEQUANTIZE, QUANTIZE, block_grid

MIN_OPSET = 21  # QuantizeLinear / DequantizeLinear with blocks (per group, per token)
EXPORTABLE_QTYPES = ("int8", "uint8")
_QDQ_OPS = (QUANTIZE, DEQUANTIZE, CHOOSE_QPARAMS)
_STORAGE_QTYPE = {torch.int8: "int8", torch.uint8: "uint8"}


def to_onnx(converted: torch.fx.GraphModule, example_inputs: tuple, path: str | os.PathLike, *,
            opset: Optional[int] = None, dynamic_shapes: Any = None) -> str | os.PathLike:
    """Write ``converted`` (a graph from ``convert_pt2e``) as an ONNX QDQ model to ``path``.

    Args:
        converted: a converted graph holding ``lowbit::quantize_affine`` / ``dequantize_affine`` /
            ``choose_qparams_affine`` nodes (not one lowered to fused kernels).
        example_inputs: positional inputs to trace the graph with.
        path: the ``.onnx`` file to write.
        opset: the ONNX opset, at least 21 (the default).
        dynamic_shapes: as for :func:`torch.export.export`, e.g. a dynamic batch dimension.

    Returns:
        ``path``.

    Example:
        >>> to_onnx(converted, (torch.randn(1, 128, 384),), "model.onnx")  # doctest: +SKIP
        'model.onnx'
    """
    opset = MIN_OPSET if opset is None else int(opset)
    if opset < MIN_OPSET:
        raise ValueError(f"ONNX QDQ export needs opset >= {MIN_OPSET} (blocked QuantizeLinear, output_dtype); "
                         f"received opset={opset}")
    if not isinstance(converted, torch.fx.GraphModule):
        raise TypeError(f"expected a converted torch.fx.GraphModule; received {type(converted).__name__}")
    check_lowbit_ops(converted.graph)
    exported = torch.export.export(converted, tuple(example_inputs), dynamic_shapes=dynamic_shapes)
    check_exportable(exported.graph)
    program = torch.onnx.export(exported, dynamo=True, opset_version=opset, verbose=False,
                                custom_translation_table=_translation_table(opset))
    for rewrite in (_unsigned_activations, _integer_dynamic_matmuls, _integer_biases):
        rewrite(program.model.graph)
    program.save(os.fspath(path))
    return path


def _lowbit_nodes(graph: torch.fx.Graph):
    return [node for node in graph.nodes if node.op == "call_function"
            and isinstance(node.target, torch._ops.OpOverload) and node.target.namespace == "lowbit"]


def check_lowbit_ops(graph: torch.fx.Graph) -> None:
    """Raise ValueError when ``graph`` holds a lowbit op other than the three Q/DQ ops (a lowered graph)."""
    for node in _lowbit_nodes(graph):
        if node.target not in _QDQ_OPS:
            raise ValueError(f"node {node.name} calls {node.target}, a fused kernel of a lowered graph; expected a "
                             f"converted graph whose only lowbit ops are quantize_affine, dequantize_affine and "
                             f"choose_qparams_affine (export the graph convert_pt2e returns, before torch.compile)")


def check_exportable(graph: torch.fx.Graph) -> None:
    """Raise ValueError naming the first Q/DQ node ONNX cannot express, in an exported graph (shapes known)."""
    for node in _lowbit_nodes(graph):
        value = node.args[0].meta["val"]
        if node.target is DEQUANTIZE:
            qtype = _STORAGE_QTYPE.get(value.dtype, str(value.dtype).removeprefix("torch."))
        else:
            qtype = node.args[4] if node.target is QUANTIZE else node.args[2]
        if qtype not in EXPORTABLE_QTYPES:
            raise ValueError(f"node {node.name} quantizes to {qtype}; ONNX export supports {list(EXPORTABLE_QTYPES)}, "
                             f"the types of ONNX Runtime's int8 kernels (its CPU provider runs float8 QDQ as a float "
                             f"Gemm)")
        block_size = node.args[1] if node.target is CHOOSE_QPARAMS else node.args[3]
        try:
            layout = _layout(value.shape, block_size)
        except ValueError as error:
            raise ValueError(f"node {node.name}: {error}") from None
        if node.target is CHOOSE_QPARAMS:
            _check_dynamic(node, layout, value.shape)


def _check_dynamic(node: torch.fx.Node, layout: tuple, shape: Sequence[int]) -> None:
    block_size, symmetric = node.args[1], node.args[3]
    if layout[0] == "blocked" and block_size[layout[1]] not in (-1, shape[layout[1]]):
        raise ValueError(f"node {node.name} chooses dynamic qparams per group of {block_size[layout[1]]} along dim "
                         f"{layout[1]}; ONNX export expects dynamic blocks of whole dimensions (per tensor or per token)")
    if not symmetric:
        raise ValueError(f"node {node.name} chooses asymmetric dynamic qparams; ONNX export expects symmetric ones "
                         f"(e.g. Int8DynamicActivation(act_symmetric=True)): ONNX Runtime 1.32's optimizer "
                         f"miscomputes DequantizeLinear with per-token zero points computed at run time")


def _layout(shape: Sequence, block_size: Sequence[int]) -> tuple:
    """``("tensor",)``, ``("axis", axis)`` or ``("blocked", axis, block)``: how QuantizeLinear states a block
    layout. ONNX scales are per tensor, per index of one axis, or per block along one axis with single elements
    on every other axis. ``shape`` may hold symbolic sizes (not ints): those are taken as larger than 1.
    """
    if len(block_size) != len(shape):
        raise ValueError(f"block_size needs one entry per dimension of shape {tuple(shape)}; received {list(block_size)}")
    single, whole, partial = [], [], []
    for dim, (size, block) in enumerate(zip(shape, block_size)):
        if size == 1 and isinstance(size, int):
            continue
        if block == -1 or block == size:
            whole.append(dim)
        elif block == 1:
            single.append(dim)
        else:
            partial.append(dim)
    if not single and not partial:
        return ("tensor",)
    if len(single) == 1 and not partial:
        return ("axis", single[0])
    if len(partial) == 1 and not whole:
        return ("blocked", partial[0], int(block_size[partial[0]]))
    if not partial and len(whole) == 1:
        return ("blocked", whole[0], shape[whole[0]])
    raise ValueError(f"block_size {list(block_size)} on shape {tuple(shape)} has no ONNX form; expected one scale "
                     f"per tensor, per index of one axis, or per block along one axis with single elements on "
                     f"every other axis")


def _translation_table(opset: int) -> dict:
    """ONNX Script functions for the three Q/DQ ops, as ``torch.onnx.export``'s ``custom_translation_table``."""
    import numpy as np
    from onnxscript import ir
    from onnxscript.values import Opset

    op = Opset("", opset)

    def reshaped(value, shape: Sequence[int]):
        if tuple(value.shape) == tuple(shape):
            return value
        return op.Reshape(value, op.Constant(value=ir.tensor(np.asarray(shape, dtype=np.int64))))

    def qparams(input, scale, zero_point, block_size, storage):
        """The scale and zero point in the shape the layout's ONNX form takes, and its attributes; a zero point
        of zeros in ``storage`` when symmetric (ONNX Runtime's fusions want one stated)."""
        layout = _layout(tuple(input.shape), block_size)
        if layout[0] == "tensor":
            shape, attrs = (), {}
        elif layout[0] == "axis":
            size = input.shape[layout[1]]
            shape, attrs = (size if isinstance(size, int) else -1,), {"axis": layout[1]}
        else:  # the block grid, of the input's rank: a dynamic one (per token) comes in that shape
            attrs = {"axis": layout[1], "block_size": layout[2]}
            shape = None if len(scale.shape) == len(input.shape) else block_grid(tuple(input.shape), block_size)
        if shape is not None:
            scale = reshaped(scale, shape)
            zero_point = None if zero_point is None else reshaped(zero_point, shape)
        if zero_point is not None:
            return scale, zero_point, attrs
        zero = np.zeros((), dtype=np.int8 if storage in (torch.int8, ir.DataType.INT8) else np.uint8)
        if shape is not None and all(n >= 0 for n in shape):
            return scale, op.Constant(value=ir.tensor(np.broadcast_to(zero, shape).copy())), attrs
        return scale, op.ConstantOfShape(op.Shape(scale), value=ir.tensor(zero.reshape(1))), attrs

    def quantize(input, scale, zero_point, block_size, qtype):
        scale, zero_point, attrs = qparams(input, scale, zero_point, block_size, get_qtype(qtype).storage)
        return op.QuantizeLinear(input, scale, zero_point, **attrs)

    def dequantize(input, scale, zero_point, block_size, output_dtype):
        scale, zero_point, attrs = qparams(input, scale, zero_point, block_size, input.dtype)
        output = op.DequantizeLinear(input, scale, zero_point, **attrs)
        return output if output_dtype == ir.DataType.FLOAT else op.Cast(output, to=output_dtype)

    def choose_qparams(input, block_size, qtype, symmetric):
        """lowbit's symmetric formula: ``max(|x|) / qmax`` over each block, NaN / inf ignored, floored at the
        smallest normal float32."""
        qt = get_qtype(qtype)
        storage = ir.DataType.INT8 if qt.storage == torch.int8 else ir.DataType.UINT8
        axes = [d for d, block in enumerate(block_size) if block != 1]
        axes = op.Constant(value=ir.tensor(np.asarray(axes, dtype=np.int64)))
        def const(value: float):
            return op.Constant(value=ir.tensor(np.asarray(value, dtype=np.float32)))

        finite = op.Where(op.Or(op.IsNaN(input), op.IsInf(input)), const(0.0), input)
        low, high = op.ReduceMin(finite, axes, keepdims=1), op.ReduceMax(finite, axes, keepdims=1)
        tiny = const(torch.finfo(torch.float32).tiny)
        scale = op.Max(op.Div(op.Max(high, op.Neg(low)), const(qt.qmax)), tiny)  # symmetric: check_exportable
        zero_point = op.ConstantOfShape(op.Shape(scale), value=ir.tensor(np.zeros(1, dtype=storage.numpy())))
        return scale, zero_point

    return {QUANTIZE: quantize, DEQUANTIZE: dequantize, CHOOSE_QPARAMS: choose_qparams}


def _initializer(graph, name: str, array):
    """Register ``array`` as a new initializer named ``name`` (made unique) and return its value."""
    from onnxscript import ir

    unique, count = name, 0
    while unique in graph.initializers:
        count += 1
        unique = f"{name}_{count}"
    value = ir.Value(name=unique, const_value=ir.tensor(array))
    graph.register_initializer(value)
    return value


def _unsigned_activations(graph) -> None:
    """Store int8 activations as uint8 with the zero point moved by 128 (the same values, rounding and clamp):
    ONNX Runtime 1.32 fails to load a model with int8 activations into a 3-D MatMul + Add when it fuses
    them (its inserted QuantizeLinear gets a uint8 zero point)."""
    import numpy as np
    from onnxscript import ir

    for quantize in list(graph):
        if quantize.op_type != "QuantizeLinear" or len(quantize.inputs) < 3 or quantize.outputs[0].is_graph_output():
            continue
        zero_point = quantize.inputs[2].const_value
        if zero_point is None or zero_point.dtype != ir.DataType.INT8:
            continue
        values = zero_point.numpy()
        consumers = [use.node for use in quantize.outputs[0].uses()]
        if not all(node.op_type == "DequantizeLinear" and len(node.inputs) == 3 and node.inputs[2].const_value is not None
                   and np.array_equal(node.inputs[2].const_value.numpy(), values) for node in consumers):
            continue
        shifted = _initializer(graph, f"{quantize.inputs[2].name}_uint8", (values.astype(np.int16) + 128).astype(np.uint8))
        for node in [quantize, *consumers]:
            old = node.inputs[2]
            node.replace_input_with(2, shifted)
            if old.is_initializer() and not old.uses():
                del graph.initializers[old.name]
        quantize.outputs[0].dtype = ir.DataType.UINT8


def _zeros(value) -> bool:
    """Whether ``value`` is a zero point of zeros (an initializer, or ConstantOfShape of a zero)."""
    import numpy as np

    if value is None:
        return True
    if value.const_value is not None:
        return not np.any(value.const_value.numpy())
    node = value.producer()
    return node is not None and node.op_type == "ConstantOfShape" and not np.any(node.attributes["value"].as_tensor().numpy())


def _integer_dynamic_matmuls(graph) -> None:
    """Compute ``MatMul(DequantizeLinear(QuantizeLinear(x, dynamic scale)), DequantizeLinear(int8 weight))`` as
    ``MatMulInteger(q, weight) * input scale * weight scale``, for symmetric activations quantized per tensor
    or per row (per token) and weights per tensor or per output channel: ONNX Runtime has no QDQ fusion for
    activation scales computed at run time. The int32 sum is exact, so only float rounding changes."""
    import numpy as np
    from onnxscript import ir

    for matmul in list(graph):
        if matmul.op_type != "MatMul":
            continue
        input_dq, weight = matmul.inputs[0].producer(), matmul.inputs[1]
        quantize = input_dq.inputs[0].producer() if input_dq is not None and input_dq.op_type == "DequantizeLinear" else None
        if quantize is None or quantize.op_type != "QuantizeLinear" or quantize.inputs[1].const_value is not None \
                or not _zeros(input_dq.inputs[2] if len(input_dq.inputs) > 2 else None):
            continue
        rank = len(matmul.inputs[0].shape or ())
        if input_dq.attributes.get_int("block_size", 0) and input_dq.attributes.get_int("axis", 1) % max(rank, 1) != rank - 1:
            continue  # blocks along another axis than the reduced one
        transposed = weight.producer() is not None and weight.producer().op_type == "Transpose"
        weight_dq = weight.producer().inputs[0].producer() if transposed else weight.producer()
        if weight_dq is None or weight_dq.op_type != "DequantizeLinear" or weight_dq.inputs[0].const_value is None \
                or weight_dq.inputs[1].const_value is None or weight_dq.attributes.get_int("block_size", 0) \
                or not _zeros(weight_dq.inputs[2] if len(weight_dq.inputs) > 2 else None):
            continue
        values, weight_scale = weight_dq.inputs[0].const_value.numpy(), weight_dq.inputs[1].const_value.numpy()
        output_axis = 0 if transposed else 1
        if values.ndim != 2 or weight_scale.size > 1 and weight_dq.attributes.get_int("axis", 1) != output_axis:
            continue
        integer_weight = _initializer(graph, f"{weight_dq.inputs[0].name}_kn", values.T.copy() if transposed else values)
        column_scale = _initializer(graph, f"{weight_dq.inputs[1].name}_columns", weight_scale.reshape(-1))
        product = ir.node("MatMulInteger", [quantize.outputs[0], integer_weight])
        as_float = ir.node("Cast", [product.outputs[0]], attributes={"to": ir.DataType.FLOAT})
        row_scaled = ir.node("Mul", [as_float.outputs[0], input_dq.inputs[1]])
        scaled = ir.node("Mul", [row_scaled.outputs[0], column_scale])
        graph.insert_before(matmul, [product, as_float, row_scaled, scaled])
        output = matmul.outputs[0]
        output.replace_all_uses_with(scaled.outputs[0])
        for node in (matmul, input_dq, weight.producer() if transposed else None, weight_dq):
            if node is not None and not any(value.uses() for value in node.outputs):
                graph.remove(node, safe=True)
        scaled.outputs[0].name, scaled.outputs[0].shape, scaled.outputs[0].dtype = output.name, output.shape, output.dtype


def _integer_biases(graph) -> None:
    """Give each float bias of a Gemm / MatMul + Add whose inputs are dequantized (per tensor x per tensor or
    per output channel, scales stated as initializers) as ``DequantizeLinear(int32, input scale x weight
    scale)``: ONNX Runtime fuses such layers into QGemm only with that bias form. Rounding moves each output by
    at most half its bias scale; a bias that does not fit int32 stays float."""
    import numpy as np
    from onnxscript import ir

    for node in list(graph):
        if node.op_type == "Gemm" and len(node.inputs) == 3 and node.attributes.get_int("transA", 0) == 0:
            layer, bias_index = node, 2
            weight_axis = 0 if node.attributes.get_int("transB", 0) else 1
        elif node.op_type == "Add" and node.inputs[0].producer() is not None \
                and node.inputs[0].producer().op_type == "MatMul":
            layer, bias_index, weight_axis = node.inputs[0].producer(), 1, 1
        else:
            continue
        input_dq, weight = layer.inputs[0].producer(), layer.inputs[1]
        if weight.producer() is not None and weight.producer().op_type == "Transpose" \
                and list(weight.producer().attributes.get_ints("perm", [1, 0])) == [1, 0]:
            weight, weight_axis = weight.producer().inputs[0], 1 - weight_axis
        weight_dq, bias = weight.producer(), node.inputs[bias_index]
        if input_dq is None or weight_dq is None or input_dq.op_type != "DequantizeLinear" \
                or weight_dq.op_type != "DequantizeLinear" or bias.const_value is None:
            continue
        input_scale, weight_scale = input_dq.inputs[1].const_value, weight_dq.inputs[1].const_value
        if input_scale is None or weight_scale is None or input_scale.numpy().size != 1:
            continue
        weight_scale = weight_scale.numpy()
        if weight_scale.ndim > 1 or weight_scale.size > 1 and weight_dq.attributes.get_int("axis", 1) != weight_axis:
            continue
        values = bias.const_value.numpy()
        scale = np.broadcast_to(input_scale.numpy().reshape(()) * weight_scale, values.shape).astype(np.float32)
        quantized = np.round(values.astype(np.float64) / scale)
        if values.ndim != 1 or not np.all(np.abs(quantized) <= np.iinfo(np.int32).max):
            continue
        inputs = [_initializer(graph, f"{bias.name}_int32", quantized.astype(np.int32)),
                  _initializer(graph, f"{bias.name}_scale", scale)]
        dequantize = ir.node("DequantizeLinear", inputs, attributes={"axis": 0}, name=f"{bias.name}_dequantize")
        graph.insert_before(layer, dequantize)
        node.replace_input_with(bias_index, dequantize.outputs[0])
        if bias.is_initializer() and not bias.uses():
            del graph.initializers[bias.name]
