"""Kernel registry: explicit choice, auto by priority, errors instead of silent substitution."""

from __future__ import annotations

import uuid

import pytest
import torch
import torch.nn.functional as F

from lowbit.kernels import Kernel, kernel_names, register_kernel, select_kernel
from lowbit.kernels import registry as registry_module
from lowbit.primitives import choose_qparams, dequantize, pack_int4, quantize, quantize_weight
from lowbit.tensors import ActivationQuant

REAL_SCHEMES = ("int8", "int4", "float8", "int8_dynamic", "float8_dynamic")


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
