"""Kernel registry: explicit choice, auto by priority, errors instead of silent substitution."""

from __future__ import annotations

import uuid

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lowbit
from kernel_spy import kernels_run  # noqa: F401 (fixture)
from linear_cases import assert_within, error_bound, quantized, reference_of
from lowbit.kernels import Kernel, kernel_names, native, register_kernel, select_kernel
from lowbit.kernels import registry as registry_module
from lowbit.kernels.cpu import needs_vnni
from lowbit.kernels.registry import Call, Layout, call_of
from lowbit.primitives import choose_qparams, dequantize, pack_int4, quantize, quantize_weight
from lowbit.tensors import ActivationQuant
from lowbit.tensors.activation import DynamicActivationTensor, StaticActivationTensor
from lowbit.tensors.from_spec import quantize_block

REAL_SCHEMES = ("int8", "int4", "float8", "int8_dynamic", "float8_dynamic")
needs_native = pytest.mark.skipif(native.unavailable("cpu") is not None, reason=f"native kernels: {native.unavailable('cpu')}")


@pytest.fixture
def scheme():
    """A unique scheme name; its registrations are removed afterwards."""
    name = f"test_scheme_xyz_{uuid.uuid4().hex}"
    yield name
    for key in [k for k in registry_module._KERNELS if k[1] == name]:
        del registry_module._KERNELS[key]
    registry_module._CHOSEN.clear()


def _fn(tag):
    def fn(x, tensors, meta, bias):
        return tag

    return fn


def test_auto_picks_highest_priority_runnable(scheme):
    register_kernel("linear", scheme, "low", priority=0)(_fn("low"))
    register_kernel("linear", scheme, "blocked", priority=50, requires=lambda d: "needs the foo extension")(
        _fn("blocked")
    )
    register_kernel("linear", scheme, "mid", priority=5)(_fn("mid"))
    register_kernel("linear", scheme, "lowest", priority=-3)(_fn("lowest"))
    assert kernel_names("linear", scheme) == ["blocked", "mid", "low", "lowest"]
    k = select_kernel("linear", scheme, "cpu")
    assert isinstance(k, Kernel)
    assert k.name == "mid" and k.priority == 5 and k.fn(None, {}, {}, None) == "mid"
    assert k.op == "linear" and k.scheme == scheme
    assert select_kernel("linear", scheme, "cpu", "auto") is k
    # Other ops of the same scheme are separate.
    with pytest.raises(NotImplementedError):
        select_kernel("embedding", scheme, "cpu")


def test_requested_kernel_with_unmet_requirement_raises_reason(scheme):
    seen = []

    def requires(device_type):
        seen.append(device_type)
        return "needs the foo extension"

    register_kernel("linear", scheme, "fast", priority=10, requires=requires)(_fn("fast"))
    register_kernel("linear", scheme, "reference", priority=-100)(_fn("ref"))
    assert select_kernel("linear", scheme, "cpu").name == "reference"
    assert "cpu" in seen
    with pytest.raises(RuntimeError, match="needs the foo extension"):
        select_kernel("linear", scheme, "cpu", "fast")
    assert select_kernel("linear", scheme, "cpu", "reference").name == "reference"


def test_requires_can_depend_on_device(scheme):
    register_kernel(
        "linear", scheme, "gpu_only_check", priority=10, requires=lambda d: None if d == "cuda" else "no cuda"
    )(_fn("g"))
    register_kernel("linear", scheme, "reference")(_fn("r"))
    assert select_kernel("linear", scheme, "cpu").name == "reference"
    assert select_kernel("linear", scheme, "cuda").name == "gpu_only_check"
    assert select_kernel("linear", scheme, "cuda", "gpu_only_check").name == "gpu_only_check"


def test_unknown_kernel_name_lists_known(scheme):
    register_kernel("linear", scheme, "alpha", priority=1)(_fn("a"))
    register_kernel("linear", scheme, "beta")(_fn("b"))
    with pytest.raises(ValueError) as info:
        select_kernel("linear", scheme, "cpu", "gamma")
    msg = str(info.value)
    assert "'gamma'" in msg and "alpha" in msg and "beta" in msg and "auto" in msg


def test_device_filter(scheme):
    register_kernel("linear", scheme, "cuda_fast", devices=("cuda",), priority=100)(_fn("c"))
    register_kernel("linear", scheme, "portable", priority=0)(_fn("p"))
    assert select_kernel("linear", scheme, "cpu").name == "portable"
    assert select_kernel("linear", scheme, "cuda").name == "cuda_fast"
    with pytest.raises(RuntimeError, match="cuda"):
        select_kernel("linear", scheme, "cpu", "cuda_fast")
    k = select_kernel("linear", scheme, "cuda", "cuda_fast")
    assert k.devices == frozenset({"cuda"})
    assert k.missing("cuda") is None and "cpu" in k.missing("cpu")


def test_auto_with_nothing_runnable_raises(scheme):
    register_kernel("linear", scheme, "cuda_only", devices=("cuda",))(_fn("c"))
    register_kernel("linear", scheme, "never", requires=lambda d: "never runs")(_fn("n"))
    with pytest.raises(RuntimeError, match="cpu"):
        select_kernel("linear", scheme, "cpu")


def test_no_kernels_for_scheme_raises(scheme):
    with pytest.raises(NotImplementedError, match=scheme):
        select_kernel("linear", scheme, "cpu")
    with pytest.raises(NotImplementedError):
        select_kernel("linear", scheme, "cpu", "reference")
    assert kernel_names("linear", scheme) == []


def test_duplicate_name_raises(scheme):
    register_kernel("linear", scheme, "dup")(_fn("1"))
    with pytest.raises(ValueError, match="dup"):
        register_kernel("linear", scheme, "dup", priority=99)(_fn("2"))
    # The first registration is untouched.
    assert kernel_names("linear", scheme) == ["dup"]
    assert select_kernel("linear", scheme, "cpu", "dup").fn(None, {}, {}, None) == "1"
    # Same name for another op is fine.
    register_kernel("bmm", scheme, "dup")(_fn("3"))
    assert select_kernel("bmm", scheme, "cpu", "dup").fn(None, {}, {}, None) == "3"


def test_register_returns_function_and_invalidates_cache(scheme):
    fn = _fn("first")
    assert register_kernel("linear", scheme, "first")(fn) is fn
    assert select_kernel("linear", scheme, "cpu").name == "first"  # now cached
    register_kernel("linear", scheme, "better", priority=1)(_fn("better"))
    assert select_kernel("linear", scheme, "cpu").name == "better"


def test_cached_selection_is_stable(scheme):
    register_kernel("linear", scheme, "only")(_fn("o"))
    assert select_kernel("linear", scheme, "cpu") is select_kernel("linear", scheme, "cpu")


@pytest.mark.parametrize("scheme_name", REAL_SCHEMES)
def test_real_schemes_have_reference_linear_on_cpu(scheme_name):
    assert "reference" in kernel_names("linear", scheme_name)
    k = select_kernel("linear", scheme_name, "cpu", "reference")
    assert k.name == "reference" and k.op == "linear" and k.scheme == scheme_name
    assert k.missing("cpu") is None
    auto = select_kernel("linear", scheme_name, "cpu")
    assert auto.missing("cpu") is None


@pytest.mark.parametrize("scheme_name", ("int8", "int4", "float8"))
@pytest.mark.parametrize("op", ("bmm", "embedding"))
def test_weight_schemes_have_reference_bmm_and_embedding(scheme_name, op):
    assert select_kernel(op, scheme_name, "cpu", "reference").name == "reference"


def test_unknown_real_kernel_name():
    with pytest.raises(ValueError, match="reference"):
        select_kernel("linear", "int8", "cpu", "no_such_kernel_xyz")


# ------------------------------------------------------------------ reference kernels compute


def test_reference_int8_linear_matches_dequantized_float():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 16, generator=gen)
    x = torch.randn(3, 16, generator=gen)
    bias = torch.randn(6, generator=gen)
    q, scale, zp = quantize_weight(w, (1, 16), "int8")
    meta = {"qtype": "int8", "block_size": (1, 16), "packed_dim": None}
    k = select_kernel("linear", "int8", "cpu", "reference")
    y = k.fn(x, {"qdata": q, "scale": scale}, meta, bias)
    expected = F.linear(x, dequantize(q, scale, None, (1, 16)), bias)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(y, F.linear(x, w, bias), atol=0.05, rtol=0.05)


def test_reference_int4_linear_unpacks_asymmetric():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(4, 16, generator=gen)
    x = torch.randn(2, 16, generator=gen)
    block = (1, 8)
    q, scale, zp = quantize_weight(w, block, "uint4", symmetric=False)
    tensors = {"qdata": pack_int4(q, dim=1), "scale": scale, "zero_point": zp}
    meta = {"qtype": "uint4", "block_size": block, "packed_dim": 1, "shape": (4, 16)}
    y = select_kernel("linear", "int4", "cpu", "reference").fn(x, tensors, meta, None)
    torch.testing.assert_close(y, F.linear(x, dequantize(q, scale, zp, block)))


def test_reference_dynamic_linear_fake_quantizes_activation():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(5, 8, generator=gen)
    x = torch.randn(3, 8, generator=gen)
    x[0, 0] = float("inf")  # activations saturate instead of raising
    q, scale, _ = quantize_weight(w, (1, 8), "int8")
    meta = {"qtype": "int8", "block_size": (1, 8), "packed_dim": None, "activation": ActivationQuant()}
    y = select_kernel("linear", "int8_dynamic", "cpu", "reference").fn(x, {"qdata": q, "scale": scale}, meta, None)
    xs, xz = choose_qparams(x, (1, 8), "int8", ignore_nonfinite=True)
    xq = dequantize(quantize(x, xs, xz, (1, 8), "int8", saturate_nonfinite=True), xs, xz, (1, 8))
    expected = F.linear(xq, dequantize(q, scale, None, (1, 8)))
    torch.testing.assert_close(y, expected)
    assert bool(torch.isfinite(y).all())


# ------------------------------------------------------------------ call-level choice (no in-kernel fallbacks)


def _meta(activation=None, conv=None):
    meta = {"shape": (4, 8), "block_size": (1, 8), "qtype": "int8", "activation": activation}
    return meta if conv is None else {**meta, "conv": conv}


def _takes_per_token(call):
    act = call.activation
    return None if act is None or act.granularity == "per_token" else f"it takes per_token; received {act.granularity}"


def test_a_kernel_that_declines_the_call_is_skipped_by_auto_and_raises_when_named(scheme):
    register_kernel("linear", scheme, "per_token_only", priority=10, accepts=_takes_per_token)(_fn("fast"))
    register_kernel("linear", scheme, "reference")(_fn("ref"))
    per_token, per_tensor = ActivationQuant("int8", "per_token"), ActivationQuant("int8", "per_tensor")
    assert select_kernel("linear", scheme, "cpu", "auto", _meta(per_token)).name == "per_token_only"
    assert select_kernel("linear", scheme, "cpu", "auto", _meta(per_tensor)).name == "reference"  # same weight, other call
    assert select_kernel("linear", scheme, "cpu", "auto", _meta()).name == "per_token_only"  # packing: nothing to judge
    with pytest.raises(RuntimeError) as info:
        select_kernel("linear", scheme, "cpu", "per_token_only", _meta(per_tensor))
    assert str(info.value) == (f"kernel 'per_token_only' for linear on '{scheme}' weights cannot take this call: "
                               f"it takes per_token; received per_tensor")
    assert select_kernel("linear", scheme, "cpu", "per_token_only", _meta(per_token)).name == "per_token_only"


def test_call_of_reads_activation_conv_function_and_string_padding():
    act = ActivationQuant("int8", "per_tensor")
    assert call_of(_meta()) == Call() and call_of(_meta(act)) == Call(act)
    assert call_of(_meta(act, (F.conv2d, (), {}))) == Call(act, F.conv2d, False)
    assert call_of(_meta(conv=(F.conv2d, (1, "same"), {}))) == Call(None, F.conv2d, True)
    assert call_of(_meta(conv=(F.conv1d, (), {"padding": "valid"}))).string_padding
    assert not call_of(_meta(conv=(F.conv_transpose2d, (2, (1, 1)), {}))).string_padding


def test_a_name_only_other_ops_have_means_auto_and_an_unknown_name_raises(scheme):
    register_kernel("linear", scheme, "linear_only", priority=10)(_fn("l"))
    register_kernel("conv", scheme, "conv_fast", priority=10, accepts=lambda call: "no" if call.string_padding else None)(_fn("c"))
    register_kernel("conv", scheme, "reference")(_fn("r"))
    conv = {**_meta(conv=(F.conv2d, (), {})), "shape": (4, 2, 3, 3), "block_size": (1, 2, 3, 3)}
    assert select_kernel("conv", scheme, "cpu", "linear_only", conv).name == "conv_fast"
    same = {**conv, "conv": (F.conv2d, (1, "same"), {})}
    assert select_kernel("conv", scheme, "cpu", "linear_only", same).name == "reference"
    with pytest.raises(ValueError, match=r"unknown kernel 'nope' for conv .* one of \['conv_fast', 'reference'\]"):
        select_kernel("conv", scheme, "cpu", "nope", conv)


def _dynamic(weight, activation, kernel, weight_qtype="int8"):
    config = lowbit.Int8DynamicActivation() if weight_qtype == "int8" else lowbit.Float8DynamicActivation()
    return DynamicActivationTensor.wrap(quantize_block(weight, config.spec().weight, kernel=kernel), activation)


@pytest.mark.skipif(needs_vnni("cpu") is not None, reason=f"int_mm: {needs_vnni('cpu')}")
@pytest.mark.parametrize("symmetric", [False, True])
def test_int8_per_tensor_activations_run_int_mm_under_auto(symmetric, kernels_run):
    """The per-token kernels (avx512, onednn) do not take per-tensor activations: auto gives them int_mm."""
    weight, bias = torch.randn(24, 40) / 40**0.5, torch.randn(24)
    act = ActivationQuant("int8", "per_tensor", symmetric)
    fast, ref = _dynamic(weight, act, "auto"), _dynamic(weight, act, "reference")
    for rows in (1, 9, 33):
        x = torch.randn(rows, 40) * torch.linspace(0.1, 3, 40)
        out = F.linear(x, fast, bias)
        assert kernels_run[-1] == ("linear", "int_mm")
        assert_within(out, F.linear(x, ref, bias), error_bound(lowbit.Int8DynamicActivation(), ref, x, bias), "int_mm")


@pytest.mark.parametrize("name", ["avx512", "onednn"])
def test_per_token_int8_kernels_named_for_per_tensor_activations_raise(name):
    kernel = next(k for k in registry_module._KERNELS[("linear", "int8_dynamic")] if k.name == name)
    per_row = Layout(frozenset({"per_row"}), "int8")
    if kernel.missing("cpu", per_row) is not None:
        pytest.skip(kernel.missing("cpu", per_row))
    with pytest.raises(RuntimeError) as info:  # at quantize time: packing knows the activation quantization
        _dynamic(torch.randn(8, 32), ActivationQuant("int8", "per_tensor", False), name)
    assert str(info.value) == (f"kernel '{name}' for linear on 'int8_dynamic' weights cannot take this call: it quantizes "
                               f"activations per token; received per_tensor activations")


@needs_native
def test_float8_per_tensor_activations_run_the_avx512_kernel(kernels_run):
    """avx512 rounds activations to e4m3 with the reference's per-tensor scale itself (no fake-quant detour)."""
    config = lowbit.Float8DynamicActivation(granularity="per_tensor")
    weight, bias = torch.randn(24, 40) / 40**0.5, torch.randn(24)
    fast, ref = quantized(config, weight), reference_of(config, weight)
    for rows in (1, 9, 33):  # GEMV and bf16 GEMM
        x = torch.randn(rows, 40) * torch.linspace(0.1, 3, 40)
        out = F.linear(x, fast, bias)
        assert kernels_run[-1] == ("linear", "avx512")
        assert_within(out, F.linear(x, ref, bias), error_bound(config, ref, x, bias), "avx512")


def _e5m2_activation(weight, mode, kernel):
    if mode == "dynamic":
        return _dynamic(weight, ActivationQuant("float8_e5m2", "per_token"), kernel, "float8")
    block = quantize_block(weight, lowbit.StaticFloat8().spec().weight, kernel=kernel)
    return StaticActivationTensor.wrap_static(block, ActivationQuant("float8_e5m2", "per_tensor"), torch.tensor(0.01), None)


@needs_native
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_e5m2_activations_on_e4m3fn_weights_run_the_reference_and_raise_when_avx512_is_named(mode, kernels_run):
    weight, x = torch.randn(16, 32), torch.randn(3, 32)
    out = F.linear(x, _e5m2_activation(weight, mode, "auto"))
    assert kernels_run == [("linear", "reference")]
    assert torch.equal(out, F.linear(x, _e5m2_activation(weight, mode, "reference")))
    with pytest.raises(RuntimeError) as info:
        F.linear(x, _e5m2_activation(weight, mode, "avx512"))
    assert str(info.value) == (f"kernel 'avx512' for linear on 'float8_{mode}' weights cannot take this call: it rounds "
                               f"activations to float8_e4m3fn; received float8_e5m2 activations")


@pytest.mark.parametrize("name", ["int_mm", "auto"])
def test_packed_tensor_names_the_kernel_it_was_packed_for(name):
    """Packing picks the kernel once, with the activation quantization it will see, and records (scheme, kernel)."""
    model = lowbit.quantize_(nn.Sequential(nn.Linear(64, 16)), lowbit.Int8DynamicActivation(kernel=name))
    weight = model[0].weight.weight
    expected = select_kernel("linear", "int8_dynamic", "cpu", name, {**weight.meta, "activation": model[0].weight.activation})
    assert weight.packed_for == ("int8_dynamic", expected.name) and (name == "auto" or expected.name == name)
    copy = lowbit.quantize_(nn.Sequential(nn.Linear(64, 16)), lowbit.Int8DynamicActivation(kernel=name))
    copy.load_state_dict(model.state_dict())
    assert torch.equal(copy[0].weight.weight.packed_aux, weight.packed_aux)


def test_int4_avx512_takes_groups_of_whole_32_code_blocks_only():
    """The int4 decode walks 32 codes at a time: a group of 16 is the registry's decision, not a kernel error."""
    meta = {"shape": (8, 64), "block_size": (1, 16), "qtype": "uint4"}
    assert select_kernel("linear", "int4", "cpu", "auto", meta).name == "reference"
    if native.unavailable() is None:
        assert select_kernel("linear", "int4", "cpu", "auto", dict(meta, block_size=(1, 32))).name == "avx512"
    with pytest.raises(RuntimeError, match="does not take groups of 16 input features"):
        select_kernel("linear", "int4", "cpu", "avx512", meta)
