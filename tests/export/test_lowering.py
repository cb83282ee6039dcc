"""Lowering of converted Q/DQ graphs to lowbit's fused int8 ops: eager (``lower``) and through torch.compile.

The graphs are built by hand as the converted-graph contract states them (buffers + lowbit's Q/DQ ops, exported).
Lowered results equal what lowbit's eager tensors compute with the same qparams (the same kernel runs), and the
Q/DQ graph within float rounding: the graph sums K dequantized products in float32 (error up to K ulps of the sum
of their magnitudes, plus one rounding each for the bias, the scales and the post-ops), the kernel sums exactly.
"""

from __future__ import annotations

import copy
import gc

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import lowbit.export.lowering as lowering
from lowbit.export import fused_ops
from lowbit.export.fused_ops import QCONV_STATIC, QLINEAR_DYNAMIC, QLINEAR_STATIC
from lowbit.export.qdq import DEQUANTIZE, QUANTIZE
from lowbit.specs import ActivationQuant, weight_spec
from lowbit.tensors.activation import DynamicActivationTensor, StaticActivationTensor
from lowbit.tensors.from_spec import quantize_block

ops = torch.ops.lowbit
EPS = torch.finfo(torch.float32).eps


def int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 values and one float32 scale per output channel, on the block grid ((N, 1), (N, 1, 1, 1))."""
    scale = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True) / 127
    return torch.round(w / scale).clamp(-127, 127).to(torch.int8), scale


class StaticLinear(torch.nn.Module):
    """A converted static Linear: ``linear(dq(q(x [/ smooth])), dq(w_q), b)`` on buffers."""

    def __init__(self, k: int = 64, n: int = 24, zero_point: bool = True, smooth: bool = True):
        super().__init__()
        self.weight = torch.randn(n, k)  # the float weight (after smoothing) the int8 values come from
        w_q, w_s = int8_per_channel(self.weight)
        self.register_buffer("w_q", w_q)
        self.register_buffer("w_s", w_s)
        self.register_buffer("b", torch.randn(n))
        self.register_buffer("x_s", torch.tensor(0.02))
        self.register_buffer("x_zp", torch.tensor(5, dtype=torch.int8) if zero_point else None)
        self.register_buffer("smooth", torch.rand(k) + 0.5 if smooth else None)

    def forward(self, x):
        if self.smooth is not None:
            x = x / self.smooth
        return F.linear(dq_static(x, self.x_s, self.x_zp), dq_weight(self.w_q, self.w_s), self.b)


class DynamicLinear(torch.nn.Module):
    """A converted dynamic Linear: ``choose_qparams -> q -> dq -> linear``."""

    def __init__(self, k: int = 64, n: int = 24, symmetric: bool = False, per_token: bool = True):
        super().__init__()
        self.weight = torch.randn(n, k)
        w_q, w_s = int8_per_channel(self.weight)
        self.register_buffer("w_q", w_q)
        self.register_buffer("w_s", w_s)
        self.register_buffer("b", torch.randn(n))
        self.symmetric, self.per_token = symmetric, per_token

    def forward(self, x):
        block = [1] * (x.dim() - 1) + [-1] if self.per_token else [-1] * x.dim()
        scale, zero = ops.choose_qparams_affine(x, block, "int8", self.symmetric)
        q = ops.quantize_affine(x, scale, zero, block, "int8")
        return F.linear(ops.dequantize_affine(q, scale, zero, block, torch.float32), dq_weight(self.w_q, self.w_s), self.b)


class StaticConv(torch.nn.Module):
    """A converted Conv2d (stride 2, padding 1, groups 2) with ReLU, or residual add then ReLU."""

    args = ([2, 2], [1, 1], [1, 1], 2)  # stride, padding, dilation, groups

    def __init__(self, residual: bool = False):
        super().__init__()
        self.weight = torch.randn(8, 3, 3, 3)
        w_q, w_s = int8_per_channel(self.weight)
        self.register_buffer("w_q", w_q)
        self.register_buffer("w_s", w_s)
        self.register_buffer("b", torch.randn(8))
        self.register_buffer("x_s", torch.tensor(0.03))
        self.register_buffer("x_zp", torch.tensor(-4, dtype=torch.int8))
        self.residual = residual

    def forward(self, x, other):
        w = ops.dequantize_affine(self.w_q, self.w_s, None, [1, -1, -1, -1], torch.float32)
        y = torch.ops.aten.conv2d.default(dq_static(x, self.x_s, self.x_zp), w, self.b, *self.args)
        return torch.relu(y + other if self.residual else y)


def dq_static(x, scale, zero):
    block = [-1] * x.dim()
    return ops.dequantize_affine(ops.quantize_affine(x, scale, zero, block, "int8"), scale, zero, block, torch.float32)


def dq_weight(w_q, w_s):
    return ops.dequantize_affine(w_q, w_s, None, [1, -1], torch.float32)


def converted(module: torch.nn.Module, *args) -> torch.fx.GraphModule:
    return torch.export.export(module, args).module()


def linear_bound(x_dq: torch.Tensor, module) -> torch.Tensor:
    """Float32 rounding of the Q/DQ graph's linear against an exact integer sum: K ulps of sum |x w| + 3 roundings."""
    w = dq_weight(module.w_q, module.w_s)
    return (x_dq.shape[-1] + 3) * EPS * (x_dq.abs() @ w.abs().t() + module.b.abs())


def conv_bound(x_dq: torch.Tensor, other: torch.Tensor, module: StaticConv) -> torch.Tensor:
    w = ops.dequantize_affine(module.w_q, module.w_s, None, [1, -1, -1, -1], torch.float32)
    k = w[0].numel()
    magnitude = F.conv2d(x_dq.abs(), w.abs(), module.b.abs(), *module.args) + other.abs()
    return (k + 4) * EPS * magnitude


def targets(gm: torch.fx.GraphModule) -> set:
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


def run_compiled(gm: torch.fx.GraphModule, freezing: bool, *args) -> torch.Tensor:
    """``torch.compile(gm)(*args)`` compiled afresh (no cache hit: a hit skips the passes, and their counters)."""
    counters.clear()
    torch._dynamo.reset()
    with torch._inductor.config.patch(freezing=freezing), torch._inductor.utils.fresh_cache(), torch.no_grad():
        return torch.compile(gm)(*args)


@pytest.mark.parametrize("zero_point, smooth", [(True, True), (False, False)])
def test_static_linear_lowered_as_eager_static_int8(zero_point, smooth):
    module = StaticLinear(zero_point=zero_point, smooth=smooth)
    x = torch.randn(3, 17, 64)  # a 3-D input, 51 rows: the GEMM path
    gm = converted(module, x)
    reference = gm(x)
    assert lowering.lower(gm) == {"linear_static": 1}
    assert targets(gm) == {QLINEAR_STATIC}  # the Q/DQ nodes, the smoothing division and the float linear are gone
    out = gm(x)

    block = quantize_block(module.weight, weight_spec("int8", "int8"), qparams=(module.w_s, None))
    eager = StaticActivationTensor.wrap_static(block, ActivationQuant("int8", "per_tensor", symmetric=not zero_point),
                                               module.x_s, module.x_zp, module.smooth)
    assert torch.equal(out, F.linear(x, eager, module.b))
    x_in = x / module.smooth if smooth else x
    assert ((out - reference).abs() <= linear_bound(dq_static(x_in, module.x_s, module.x_zp), module)).all()


@pytest.mark.parametrize("rows", [2, 40])  # the GEMV and the GEMM paths
@pytest.mark.parametrize("symmetric, per_token", [(False, True), (True, True), (True, False)])
def test_dynamic_linear_lowered_as_eager_dynamic_int8(symmetric, per_token, rows):
    module = DynamicLinear(symmetric=symmetric, per_token=per_token)
    x = torch.randn(1, rows, 64)
    gm = converted(module, x)
    reference = gm(x)
    assert lowering.lower(gm) == {"linear_dynamic": 1}
    assert targets(gm) == {QLINEAR_DYNAMIC}
    out = gm(x)

    block = quantize_block(module.weight, weight_spec("int8", "int8"), qparams=(module.w_s, None))
    activation = ActivationQuant("int8", "per_token" if per_token else "per_tensor", symmetric)
    assert torch.equal(out, F.linear(x, DynamicActivationTensor.wrap(block, activation), module.b))
    block_size = [1, 1, -1] if per_token else [-1, -1, -1]
    scale, zero = ops.choose_qparams_affine(x, block_size, "int8", symmetric)
    x_dq = ops.dequantize_affine(ops.quantize_affine(x, scale, zero, block_size, "int8"), scale, zero, block_size, torch.float32)
    assert ((out - reference).abs() <= linear_bound(x_dq, module)).all()


@pytest.mark.parametrize("residual, pattern", [(False, "conv_static_relu"), (True, "conv_static_add_relu")])
def test_conv_relu_lowered_as_eager_static_int8(residual, pattern):
    module = StaticConv(residual)
    x, other = torch.randn(2, 6, 10, 10), torch.randn(2, 8, 5, 5)
    gm = converted(module, x, other)
    reference = gm(x, other)
    assert lowering.lower(gm) == {pattern: 1}
    assert targets(gm) == {QCONV_STATIC}  # conv, add and relu fused into one op
    out = gm(x, other)

    block = quantize_block(module.weight, weight_spec("int8", "int8"), (1, 3, 3, 3), groups=2, qparams=(module.w_s, None))
    eager = StaticActivationTensor.wrap_static(block, ActivationQuant("int8", "per_tensor", symmetric=False), module.x_s,
                                               module.x_zp)
    expected = F.conv2d(x, eager, module.b, *module.args)
    assert torch.equal(out, torch.relu(expected + other if residual else expected))
    bound = conv_bound(dq_static(x, module.x_s, module.x_zp), other if residual else torch.zeros(()), module)
    assert ((out - reference).abs() <= bound).all()


def cases():
    return [
        ("linear_static", lambda: StaticLinear(), (torch.randn(4, 32, 64),)),
        ("linear_dynamic", lambda: DynamicLinear(), (torch.randn(4, 32, 64),)),
        ("conv_static_add_relu", lambda: StaticConv(residual=True), (torch.randn(2, 6, 10, 10), torch.randn(2, 8, 5, 5))),
    ]


@pytest.mark.parametrize("freezing", [False, True])
@pytest.mark.parametrize("pattern, make, args", cases(), ids=[c[0] for c in cases()])
def test_compiled_converted_graph_is_lowered(pattern, make, args, freezing):
    gm = converted(make(), *args)
    lowered = copy.deepcopy(gm)
    lowering.lower(lowered)
    out = run_compiled(gm, freezing, *args)
    assert dict(counters["lowbit"]) == {pattern: 1}  # a graph left in float fails here
    assert torch.equal(out, lowered(*args))


@pytest.mark.parametrize("freezing", [False, True])
@pytest.mark.parametrize("pattern, make, args", cases(), ids=[c[0] for c in cases()])
def test_autocast_bf16_runs_int8_mixed_bf16(pattern, make, args, freezing):
    gm = converted(make(), *args)
    lowering.lower(gm)
    expected = gm(args[0].bfloat16(), *args[1:])  # the kernels return bf16 for bf16 input
    with torch.autocast("cpu", torch.bfloat16):
        out = gm(*args)
        out_compiled = run_compiled(gm, freezing, *args)
    assert out.dtype == out_compiled.dtype == torch.bfloat16
    assert torch.equal(out, expected) and torch.equal(out_compiled, expected)


def test_weight_changed_in_place_is_packed_again():
    module = StaticLinear()
    x = torch.randn(2, 40, 64)
    gm = converted(module, x)
    lowering.lower(gm)
    gm(x)  # packs the weight
    gm.w_q.neg_()
    gm.w_s.mul_(2)
    fresh = copy.deepcopy(gm)  # new tensors: packed from scratch
    assert torch.equal(gm(x), fresh(x))


@pytest.mark.parametrize("pattern, make, args", cases(), ids=[c[0] for c in cases()])
def test_packed_weight_is_dropped_with_the_weight(pattern, make, args):
    gm = converted(make(), *args)
    lowering.lower(gm)
    gm(*args)
    key = id(gm.w_q)
    assert any(k[0] == key for k in fused_ops._PACKED)
    del gm
    gc.collect()
    assert not any(k[0] == key for k in fused_ops._PACKED)  # the cache holds no reference that keeps it alive


def test_shared_qdq_pair_feeds_every_lowered_linear():
    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = StaticLinear(smooth=False), StaticLinear(smooth=False)
            self.b.x_s, self.b.x_zp = self.a.x_s, self.a.x_zp

        def forward(self, x):
            x_dq = dq_static(x, self.a.x_s, self.a.x_zp)  # one observer shared by both linears
            return (F.linear(x_dq, dq_weight(self.a.w_q, self.a.w_s), self.a.b),
                    F.linear(x_dq, dq_weight(self.b.w_q, self.b.w_s), self.b.b))

    x = torch.randn(16, 64)
    gm = converted(TwoHeads(), x)
    reference = gm(x)
    assert lowering.lower(gm) == {"linear_static": 2}
    assert targets(gm) == {QLINEAR_STATIC}
    x_dq = dq_static(x, gm.a.x_s, gm.a.x_zp)
    for out, ref, head in zip(gm(x), reference, (gm.a, gm.b)):
        assert ((out - ref).abs() <= linear_bound(x_dq, head)).all()


def test_patterns_without_an_int8_kernel_stay_in_float():
    class AsymmetricWeight(StaticLinear):
        def forward(self, x):
            w = ops.dequantize_affine(self.w_q, self.w_s, torch.zeros(24, 1, dtype=torch.int8), [1, -1], torch.float32)
            return F.linear(dq_static(x, self.x_s, self.x_zp), w, self.b)

    x = torch.randn(8, 64)
    gm = converted(AsymmetricWeight(smooth=False), x)
    before = [n.target for n in gm.graph.nodes]
    counters.clear()
    with pytest.warns(UserWarning, match="1 quantized linear/conv nodes .* run as dequantize \\+ float op"):
        assert lowering.lower(gm) == {}
    assert counters["lowbit"] == {"not_lowered": 1}
    assert [n.target for n in gm.graph.nodes] == before and {QUANTIZE, DEQUANTIZE} <= targets(gm)


def test_lowering_is_inductors_pre_grad_pass():
    passes = torch._inductor.custom_graph_pass.get_custom_graph_passes(torch._inductor.config.pre_grad_custom_pass)
    assert lowering.LOWERING_PASS in passes and lowering.LOWERING_PASS.uuid()


def test_lower_takes_a_graph_module():
    with pytest.raises(TypeError, match="torch.fx.GraphModule.*received Linear"):
        lowering.lower(torch.nn.Linear(2, 2))
