"""ONNX QDQ export: ONNX Runtime runs converted graphs with int8 kernels and matches them within one
activation quantization step."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("onnxscript")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from lowbit.export.onnx import to_onnx  # noqa: E402

lowbit_ops = torch.ops.lowbit
FLOAT_LAYERS = {"MatMul", "Gemm", "Conv", "FusedConv", "FusedGemm", "FusedMatMul"}
INT8_LAYERS = {"QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "MatMulInteger", "QLinearConv",
               "DynamicQuantizeMatMul", "MatMulNBits"}


def quantized_weight(shape, block):
    """A symmetric int8 weight with one scale per output channel: (int8 values, float32 scales on the grid)."""
    weight = torch.randn(shape)
    scale = weight.abs().amax(dim=tuple(range(1, len(shape))), keepdim=True) / 127
    return torch.round(weight / scale).to(torch.int8), scale


def qdq(x, scale, zero_point):
    """A static per-tensor int8 activation edge of a converted graph."""
    block = [-1] * x.dim()
    q = lowbit_ops.quantize_affine(x, scale, zero_point, block, "int8")
    return lowbit_ops.dequantize_affine(q, scale, zero_point, block, torch.float32)


class StaticLinear(torch.nn.Module):
    """The converted graph of a StaticInt8 Linear: per-tensor int8 input (optionally smoothed, optionally with
    a zero point), per-channel int8 weight, float bias."""

    def __init__(self, smoothing=False, zero_point=False, in_features=64, out_features=48):
        super().__init__()
        self.smoothing, self.asymmetric = smoothing, zero_point
        weight, scale = quantized_weight((out_features, in_features), [1, -1])
        self.register_buffer("weight_q", weight)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", torch.randn(out_features))
        self.register_buffer("input_scale", torch.tensor(4.0 / 127))
        self.register_buffer("input_zero_point", torch.tensor(-5, dtype=torch.int8))
        self.register_buffer("smooth", torch.rand(in_features) + 0.5)

    def forward(self, x):
        if self.smoothing:
            x = torch.ops.aten.div.Tensor(x, self.smooth)
        x = qdq(x, self.input_scale, self.input_zero_point if self.asymmetric else None)
        weight = lowbit_ops.dequantize_affine(self.weight_q, self.weight_scale, None, [1, -1], torch.float32)
        return F.linear(x, weight, self.bias)

    def tolerance(self):
        """Per output feature: one step of the (smoothed) input on every input (rounding may differ at ties)
        times the dequantized weight it meets, plus half a step of the int32 bias (scale input_scale x
        weight_scale), over float32 accumulation."""
        weight = self.weight_q.float() * self.weight_scale
        step = self.input_scale * weight.abs().sum(dim=1)
        return step + 0.5 * self.input_scale * self.weight_scale.flatten() + 1e-5


class ConvReLUNet(torch.nn.Module):
    """Conv2d -> ReLU whose output edge feeds a Linear (after flatten, sharing its qparams): the converted graph
    of a quantizer that annotates conv + relu and its consumer."""

    def __init__(self):
        super().__init__()
        weight, scale = quantized_weight((8, 3, 3, 3), [1, -1, -1, -1])
        self.register_buffer("conv_q", weight)
        self.register_buffer("conv_scale", scale)
        self.register_buffer("conv_bias", torch.randn(8) * 0.1)
        self.register_buffer("input_scale", torch.tensor(3.0 / 127))
        # an asymmetric observer after ReLU: min 0 gives zero point qmin
        self.register_buffer("relu_scale", torch.tensor(6.0 / 255))
        self.register_buffer("relu_zero_point", torch.tensor(-128, dtype=torch.int8))
        weight, scale = quantized_weight((10, 8 * 6 * 6), [1, -1])
        self.register_buffer("fc_q", weight)
        self.register_buffer("fc_scale", scale)
        self.register_buffer("fc_bias", torch.randn(10) * 0.1)

    def forward(self, x):
        x = qdq(x, self.input_scale, None)
        weight = lowbit_ops.dequantize_affine(self.conv_q, self.conv_scale, None, [1, -1, -1, -1], torch.float32)
        x = torch.relu(F.conv2d(x, weight, self.conv_bias))
        x = qdq(x, self.relu_scale, self.relu_zero_point)
        x = qdq(torch.flatten(x, 1), self.relu_scale, self.relu_zero_point)
        weight = lowbit_ops.dequantize_affine(self.fc_q, self.fc_scale, None, [1, -1], torch.float32)
        return F.linear(x, weight, self.fc_bias)


class DynamicLinear(torch.nn.Module):
    """The converted graph of a dynamic per-token int8 Linear."""

    def __init__(self, symmetric=True):
        super().__init__()
        self.symmetric = symmetric
        weight, scale = quantized_weight((48, 64), [1, -1])
        self.register_buffer("weight_q", weight)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", torch.randn(48))

    def forward(self, x):
        block = [1] * (x.dim() - 1) + [-1]
        qparams = lowbit_ops.choose_qparams_affine(x, block, "int8", self.symmetric)
        q = lowbit_ops.quantize_affine(x, qparams[0], qparams[1], block, "int8")
        x = lowbit_ops.dequantize_affine(q, qparams[0], qparams[1], block, torch.float32)
        weight = lowbit_ops.dequantize_affine(self.weight_q, self.weight_scale, None, [1, -1], torch.float32)
        return F.linear(x, weight, self.bias)


def converted(module, x):
    return torch.export.export(module.eval(), (x,)).module()


def run_onnx(path, x, tmp_path, optimize=True):
    """ONNX Runtime's output on ``x`` and the op types of the graph it optimized (ORT_ENABLE_ALL; none when
    ``optimize`` is False: the QDQ graph as written, in float)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    output = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    return torch.from_numpy(output), [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]


@pytest.mark.parametrize("shape", [(2, 7, 64), (9, 64)], ids=["3d", "2d"])
@pytest.mark.parametrize("smoothing", [False, True], ids=["plain", "smoothed"])
@pytest.mark.parametrize("zero_point", [False, True], ids=["symmetric", "zero_point"])
def test_static_linear_runs_int8_in_onnxruntime(tmp_path, shape, smoothing, zero_point):
    module = StaticLinear(smoothing=smoothing, zero_point=zero_point)
    x = torch.randn(shape) * 1.5
    graph = converted(module, x)
    path = to_onnx(graph, (x,), tmp_path / "linear.onnx")
    output, ops = run_onnx(path, x, tmp_path)
    assert INT8_LAYERS & set(ops) and not FLOAT_LAYERS & set(ops), ops
    assert ((output - graph(x)).abs() <= module.tolerance()).all()
    # as written (no fusion): lowbit's rounding, the int32 bias and float32 summation order only
    written, _ = run_onnx(path, x, tmp_path, optimize=False)
    weight = module.weight_q.float() * module.weight_scale
    inputs = x / module.smooth if smoothing else x
    magnitudes = (inputs.abs() + module.input_scale) @ weight.abs().T + module.bias.abs()
    bias_step = module.input_scale * module.weight_scale.flatten()
    bound = 0.5 * bias_step + (inputs.shape[-1] + 1) * torch.finfo(torch.float32).eps * magnitudes
    assert ((written - graph(x)).abs() <= bound).all()


def test_conv_relu_runs_int8_in_onnxruntime(tmp_path):
    module = ConvReLUNet()
    x = torch.randn(2, 3, 8, 8)
    graph = converted(module, x)
    output, ops = run_onnx(to_onnx(graph, (x,), tmp_path / "conv.onnx"), x, tmp_path)
    assert "QLinearConv" in ops and "QGemm" in ops and not FLOAT_LAYERS & set(ops), ops
    # the conv's outputs are requantized by the graph itself (a tie may round apart): the linear's inputs may
    # differ by one relu step, on top of one input step propagated through the conv (bounded by the same step)
    fc_weight = module.fc_q.float() * module.fc_scale
    conv_step = module.input_scale * (module.conv_q.float() * module.conv_scale).abs().sum()
    steps = torch.ceil(conv_step / module.relu_scale) + 1
    bound = steps * module.relu_scale * fc_weight.abs().sum(dim=1) + module.relu_scale * module.fc_scale.flatten()
    assert ((output - graph(x)).abs() <= bound).all()


@pytest.mark.parametrize("batch", ["static", "dynamic"])
def test_dynamic_per_token_linear_runs_int8_in_onnxruntime(tmp_path, batch):
    module = DynamicLinear()
    x = torch.randn(2, 7, 64)
    dynamic_shapes = ({0: torch.export.Dim("batch")},) if batch == "dynamic" else None
    graph = torch.export.export(module.eval(), (x,), dynamic_shapes=dynamic_shapes).module()
    path = to_onnx(graph, (x,), tmp_path / "dynamic.onnx", dynamic_shapes=dynamic_shapes)
    x = torch.randn(3 if batch == "dynamic" else 2, 7, 64)
    output, ops = run_onnx(path, x, tmp_path)
    assert INT8_LAYERS & set(ops) and not FLOAT_LAYERS & set(ops), ops
    # the same scales and rounding, an exact int32 sum: float32 rounding only (K products and two scalings:
    # at most K + 3 ulps of the sum of magnitudes; dequantized inputs are within half a step of x)
    token_step = x.abs().amax(dim=-1, keepdim=True) / 127
    weight = module.weight_q.float() * module.weight_scale
    magnitudes = (x.abs() + token_step) @ weight.abs().T + module.bias.abs()
    assert ((output - graph(x)).abs() <= (64 + 4) * torch.finfo(torch.float32).eps * magnitudes).all()


def test_asymmetric_dynamic_activations_are_refused(tmp_path):
    x = torch.randn(2, 7, 64)
    with pytest.raises(ValueError, match="asymmetric dynamic qparams; ONNX export expects symmetric"):
        to_onnx(converted(DynamicLinear(symmetric=False), x), (x,), tmp_path / "dynamic.onnx")
    assert not (tmp_path / "dynamic.onnx").exists()


class GroupedWeight(torch.nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block
        self.register_buffer("weight_q", torch.randint(-8, 8, (16, 64), dtype=torch.int8))
        self.register_buffer("weight_scale", torch.rand(16, 64 // block[1] if block[1] > 0 else 1))

    def forward(self, x):
        return F.linear(x, lowbit_ops.dequantize_affine(self.weight_q, self.weight_scale, None, self.block,
                                                        torch.float32))


def test_per_group_weight_exports_as_blocked_dequantize(tmp_path):
    module = GroupedWeight([1, 16])
    x = torch.randn(3, 64)
    graph = converted(module, x)
    path = to_onnx(graph, (x,), tmp_path / "grouped.onnx")
    dequantize = next(n for n in onnx.load(path).graph.node if n.op_type == "DequantizeLinear")
    assert {a.name: onnx.helper.get_attribute_value(a) for a in dequantize.attribute}["block_size"] == 16
    output, _ = run_onnx(path, x, tmp_path)
    torch.testing.assert_close(output, graph(x), rtol=1e-5, atol=1e-4)


class Int4Activations(torch.nn.Module):
    def forward(self, x):
        return torch.ops.lowbit.quantize_affine(x, torch.tensor(0.1), None, [-1, -1], "int4")


class Float8Weight(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("weight_q", torch.randn(16, 64).to(torch.float8_e4m3fn))

    def forward(self, x):
        weight = lowbit_ops.dequantize_affine(self.weight_q, torch.tensor(0.1), None, [-1, -1], torch.float32)
        return F.linear(x, weight)


def lowered_graph():
    """A graph holding a fused kernel, as lowering leaves it."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(torch.ops.lowbit.onednn_unpack.default, (x,)))
    return torch.fx.GraphModule(torch.nn.Module(), graph)


def test_refusals_say_expected_and_received(tmp_path):
    x = torch.randn(3, 64)
    with pytest.raises(ValueError, match="quantizes to int4; ONNX export supports"):
        to_onnx(converted(Int4Activations(), x), (x,), tmp_path / "a.onnx")
    with pytest.raises(ValueError, match="quantizes to float8_e4m3fn; ONNX export supports"):
        to_onnx(converted(Float8Weight(), x), (x,), tmp_path / "a.onnx")
    with pytest.raises(ValueError, match="lowbit.onednn_unpack.default, a fused kernel of a lowered graph; expected"):
        to_onnx(lowered_graph(), (x,), tmp_path / "a.onnx")
    with pytest.raises(ValueError, match="needs opset >= 21 .*; received opset=18"):
        to_onnx(converted(StaticLinear(), x), (x,), tmp_path / "a.onnx", opset=18)
    with pytest.raises(TypeError, match="expected a converted torch.fx.GraphModule; received StaticLinear"):
        to_onnx(StaticLinear(), (x,), tmp_path / "a.onnx")
    assert not (tmp_path / "a.onnx").exists()


def test_layouts_onnx_cannot_express_are_refused():
    from lowbit.export.onnx import _layout

    assert _layout((4, 64), [-1, -1]) == ("tensor",)
    assert _layout((4, 64), [1, -1]) == ("axis", 0)
    assert _layout((2, 7, 64), [1, 1, -1]) == ("blocked", 2, 64)
    assert _layout((1, 7, 64), [1, 1, -1]) == ("axis", 1)
    with pytest.raises(ValueError, match=r"block_size \[2, 16\] on shape \(4, 64\) has no ONNX form"):
        _layout((4, 64), [2, 16])


def test_static_int8_flow_runs_int8_in_onnxruntime(tmp_path):
    """The real flow: X86Quantizer + StaticInt8 (smoothed per-tensor input, per-channel weight) -> ONNX."""
    import operator

    import lowbit
    from lowbit.export import X86Quantizer, convert_pt2e, prepare_pt2e
    from lowbit.export.qdq import DEQUANTIZE, QUANTIZE

    x = torch.randn(2, 7, 64)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48)).eval()
    prepared = prepare_pt2e(torch.export.export(model, (x,)).module(), X86Quantizer().set_global(lowbit.StaticInt8()))
    for _ in range(4):
        prepared(torch.randn(2, 7, 64))
    graph = convert_pt2e(prepared)
    output, ops = run_onnx(to_onnx(graph, (x,), tmp_path / "flow.onnx"), x, tmp_path)
    assert INT8_LAYERS & set(ops) and not FLOAT_LAYERS & set(ops), ops
    # StaticLinear.tolerance from the graph's own qparams
    def value(arg):
        return operator.attrgetter(arg.target)(graph) if isinstance(arg, torch.fx.Node) else arg

    quantize = next(n for n in graph.graph.nodes if n.target is QUANTIZE)
    weight_dq = next(n for n in graph.graph.nodes if n.target is DEQUANTIZE and n.args[0].op == "get_attr")
    input_scale, weight_scale = value(quantize.args[1]), value(weight_dq.args[1])
    assert quantize.args[0].target is torch.ops.aten.div.Tensor  # StaticInt8 smooths by default
    weight = DEQUANTIZE(*(value(a) for a in weight_dq.args))
    bound = input_scale * weight.abs().sum(dim=1) + 0.5 * input_scale * weight_scale.flatten() + 1e-5
    assert ((output - graph(x)).abs() <= bound).all()


def test_dynamic_batch(tmp_path):
    """A graph exported with a dynamic batch exports with one: ONNX Runtime runs it at another batch size."""
    batch = torch.export.Dim("batch")
    module = StaticLinear()
    x = torch.randn(2, 7, 64)
    graph = torch.export.export(module.eval(), (x,), dynamic_shapes=({0: batch},)).module()
    path = to_onnx(graph, (x,), tmp_path / "batch.onnx", dynamic_shapes=({0: batch},))
    x = torch.randn(5, 7, 64)
    output, ops = run_onnx(path, x, tmp_path)
    assert INT8_LAYERS & set(ops) and not FLOAT_LAYERS & set(ops), ops
    assert ((output - graph(x)).abs() <= module.tolerance()).all()


def test_static_int8_flow_cnn_runs_int8_in_onnxruntime(tmp_path):
    """The real flow on a digits-sized CNN: every conv, the pooling and the linear run as int8 kernels (the
    numerics of each layer kind are checked on the hand-built graphs above)."""
    import lowbit
    from lowbit.export import X86Quantizer, convert_pt2e, prepare_pt2e

    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 10)).eval()
    x = torch.randn(4, 1, 8, 8)
    prepared = prepare_pt2e(torch.export.export(model, (x,)).module(), X86Quantizer().set_global(lowbit.StaticInt8()))
    for _ in range(4):
        prepared(torch.randn(4, 1, 8, 8))
    _, ops = run_onnx(to_onnx(convert_pt2e(prepared), (x,), tmp_path / "cnn.onnx"), x, tmp_path)
    assert ops.count("QLinearConv") == 2 and "QGemm" in ops and not FLOAT_LAYERS & set(ops), ops
