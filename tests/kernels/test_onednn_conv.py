"""The oneDNN static convolutions: int8 (same integer math as the reference kernel, packed once) and
float8 (exact products in bf16, within bf16 output rounding of the reference)."""

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn

import lowbit
from conftest import assert_compiles_and_exports, assert_survives_copies
from lowbit.kernels.onednn_conv import _requires, _requires_bf16
from kernel_spy import kernels_run  # noqa: F401 (fixture)
from lowbit.kernels.registry import select_kernel

pytestmark = pytest.mark.skipif(_requires("cpu") is not None, reason=f"onednn conv kernel: {_requires('cpu')}")
needs_bf16 = pytest.mark.skipif(_requires_bf16("cpu") is not None, reason=f"bf16 conv: {_requires_bf16('cpu')}")

CONVS = [
    (lambda: nn.Conv1d(4, 6, 3, stride=2), (2, 4, 20)),
    (lambda: nn.Conv2d(4, 8, 3, padding=1), (2, 4, 8, 8)),
    (lambda: nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), (3, 16, 9, 7)),
    (lambda: nn.Conv2d(8, 8, 3, groups=8, dilation=2), (2, 8, 9, 9)),  # depthwise, dilated
    (lambda: nn.Conv2d(8, 12, 1, groups=4), (1, 8, 5, 5)),
    (lambda: nn.Conv3d(2, 4, 3, padding=(1, 0, 1)), (1, 2, 6, 6, 6)),
]
PICK = lambda m, fqn: isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear))  # noqa: E731


def _per_channel(qtype):
    """Kernel meta of a per-channel Conv2d(4, 8, 3) weight."""
    return {"shape": (8, 4, 3, 3), "block_size": (1, 4, 3, 3), "qtype": qtype}


def _static(model, shape, config, batches=4):
    lowbit.prepare(model, config, filter_fn=PICK)
    lowbit.calibrate(model, [torch.randn(shape) for _ in range(batches)], progress=False)
    return lowbit.convert(model)


@pytest.mark.parametrize("make, shape", CONVS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_onednn_conv_matches_reference_kernel(make, shape, symmetric):
    float_model = nn.Sequential(make()).eval()
    torch.manual_seed(0)  # the same calibration data for both
    fast = _static(copy.deepcopy(float_model), shape, lowbit.StaticInt8(act_symmetric=symmetric, smoothing=None))
    torch.manual_seed(0)
    ref = _static(copy.deepcopy(float_model), shape, lowbit.StaticInt8(act_symmetric=symmetric, smoothing=None, kernel="reference"))
    assert fast[0].weight.weight.packed_for == ("int8_static", "onednn")
    assert fast[0].weight.weight.packed.layout == torch._mkldnn  # oneDNN's layout, made at convert
    assert ref[0].weight.weight.packed is None
    x = torch.randn(shape) * 1.5  # values past the calibrated range saturate the same way
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), ref(x), rtol=1e-4, atol=1e-4)
        channels_last = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
        torch.testing.assert_close(fast(channels_last), ref(x), rtol=1e-4, atol=1e-4)


@needs_bf16
@pytest.mark.parametrize("make, shape", CONVS)
def test_float8_conv_matches_reference_kernel(make, shape):
    float_model = nn.Sequential(make()).eval()
    torch.manual_seed(0)
    fast = _static(copy.deepcopy(float_model), shape, lowbit.StaticFloat8())
    torch.manual_seed(0)
    ref = _static(copy.deepcopy(float_model), shape, lowbit.StaticFloat8(kernel="reference"))
    x = torch.randn(shape) * 1.5
    with torch.inference_mode():
        expected = ref(x)
        for given in (x, x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x):
            out = fast(given)
            assert out.shape == expected.shape and out.dtype == expected.dtype
            assert ((out - expected).norm() / expected.norm()).item() < 4e-3  # bf16 rounding of the conv result


@needs_bf16
def test_float8_conv_is_picked_compiles_and_exports():
    assert select_kernel("conv", "float8_static", "cpu", "auto", _per_channel("float8_e4m3fn")).name == "onednn"
    torch.manual_seed(0)
    model = _static(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval(), (2, 3, 8, 8), lowbit.StaticFloat8())
    assert_compiles_and_exports(model, torch.randn(2, 3, 8, 8), "float8_static_conv")


UNBATCHED = [(lambda: nn.Conv1d(4, 6, 3, stride=2), (2, 4, 20)), (lambda: nn.Conv2d(4, 8, 3, padding=1), (2, 4, 8, 8)),
             (lambda: nn.Conv3d(2, 4, 3, padding=(1, 0, 1)), (1, 2, 6, 6, 6))]


@pytest.mark.parametrize("make, shape", UNBATCHED, ids=lambda v: type(v()).__name__ if callable(v) else str(v))
@pytest.mark.parametrize("config", [lowbit.StaticInt8(), lowbit.StaticFloat8(), lowbit.StaticInt8(kernel="reference"),
                                    lowbit.StaticFloat8(kernel="reference")], ids=lambda c: c.label())
def test_static_conv_takes_unbatched_input(config, make, shape):
    """A (C, *spatial) input, as PyTorch's convolutions take it: the batched call's result for a batch of one."""
    if isinstance(config, lowbit.StaticFloat8) and _requires_bf16("cpu") is not None:
        pytest.skip(f"bf16 conv: {_requires_bf16('cpu')}")
    float_model = nn.Sequential(make()).eval()
    model = _static(copy.deepcopy(float_model), shape, config)
    x = torch.randn(shape[1:]) * 1.5
    with torch.inference_mode():
        out = model(x)
        assert out.shape == float_model(x).shape
        assert torch.equal(out, model(x.unsqueeze(0))[0])


def _static_pair(make, shape, config):
    """The model made with ``config`` and with ``kernel="reference"``, from the same calibration data."""
    models = []
    for kernel in (config.kernel, "reference"):
        torch.manual_seed(0)
        models.append(_static(nn.Sequential(make()).eval(), shape, dataclasses.replace(config, kernel=kernel)))
    return models


# Calls the oneDNN conv kernels do not take, and what they say when named for one.
DECLINED = [
    pytest.param(lambda: nn.ConvTranspose2d(4, 4, 1, groups=4), (2, 4, 5, 5), lowbit.StaticInt8(),
                 r"it runs \['conv1d', 'conv2d', 'conv3d'\]; received conv_transpose2d", id="ConvTranspose2d"),
    pytest.param(lambda: nn.Conv2d(4, 8, 3, padding="same"), (2, 4, 8, 8), lowbit.StaticInt8(),
                 r"it takes padding as numbers; received a string \('same' / 'valid'\)", id="padding-same"),
    pytest.param(lambda: nn.Conv1d(4, 8, 3), (2, 4, 9), lowbit.StaticFloat8(),
                 r"it runs \['conv2d', 'conv3d'\]; received conv1d", id="float8-Conv1d", marks=needs_bf16),
]


@pytest.mark.parametrize("make, shape, config, message", DECLINED)
def test_auto_runs_the_reference_for_calls_onednn_does_not_take(make, shape, config, message, kernels_run):
    model, ref = _static_pair(make, shape, config)
    x = torch.randn(shape)
    with torch.inference_mode():
        out = model(x)
        assert kernels_run == [("conv", "reference")]
        assert torch.equal(out, ref(x))


@pytest.mark.parametrize("make, shape, config, message", DECLINED)
def test_onednn_named_for_a_call_it_does_not_take_raises(make, shape, config, message):
    model = _static_pair(make, shape, dataclasses.replace(config, kernel="onednn"))[0]
    with pytest.raises(RuntimeError, match=f"^kernel 'onednn' for conv on '{config.scheme}' weights cannot take this call: {message}$"):
        model(torch.randn(shape))


def test_onednn_named_for_a_transposed_conv_weight_raises_at_prepare():
    """A ConvTranspose weight has one scale per output channel along dim 1: not the layout the kernel packs. prepare
    refuses it before attaching any observer."""
    model = nn.Sequential(nn.ConvTranspose2d(4, 6, 3)).eval()
    with pytest.raises(RuntimeError, match=r"kernel 'onednn' for conv on 'int8_static' weights cannot run here: handles "
                                           r"\['per_channel'\] weights, not other"):
        lowbit.prepare(model, lowbit.StaticInt8(kernel="onednn"), filter_fn=lambda m, n: isinstance(m, nn.ConvTranspose2d))
    assert not any(hasattr(m, "lowbit_observer") for m in model.modules())


@pytest.mark.parametrize("kernel, conv_kernel, linear_kernel", [("onednn", "onednn", "onednn"), ("auto", "onednn", "avx512"),
                                                                  ("avx512", "onednn", "avx512"),
                                                                  ("reference", "reference", "reference")])
def test_convs_follow_the_kernel_preference_per_op(kernel, conv_kernel, linear_kernel, kernels_run):
    """A preference names a kernel per op: a name the conv op has no kernel of (avx512) means auto for convs."""
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).eval()
    model = _static(model, (2, 4, 8, 8), lowbit.StaticInt8(kernel=kernel))
    with torch.inference_mode():
        model(torch.randn(2, 4, 8, 8))
    assert kernels_run == [("conv", conv_kernel), ("linear", linear_kernel)]


def test_packed_conv_survives_deepcopy_pickle_bf16_and_state_dict():
    torch.manual_seed(0)
    model = _static(nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval(), (2, 4, 10, 10), lowbit.StaticInt8())
    assert_survives_copies(model, torch.randn(2, 4, 10, 10))


def test_string_padding_conv_has_input_gradients():
    torch.manual_seed(0)
    model = _static(nn.Sequential(nn.Conv2d(4, 8, 3, padding="same")).eval(), (2, 4, 8, 8), lowbit.StaticInt8())
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 8, 8, 8)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_static_conv_compiles_and_exports():
    torch.manual_seed(0)
    model = _static(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval(), (2, 3, 8, 8), lowbit.StaticInt8())
    assert_compiles_and_exports(model, torch.randn(2, 3, 8, 8), "int8_static_conv")


@pytest.mark.parametrize("config", [lowbit.StaticInt8(), lowbit.StaticFloat8(), lowbit.StaticInt8(kernel="reference")],
                         ids=lambda c: c.label())
@pytest.mark.parametrize("make, shape", [(lambda: nn.Conv1d(3, 4, 3, padding=1), (2, 3, 9)),
                                         (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (2, 3, 9, 9)),
                                         (lambda: nn.Conv2d(4, 6, 3, groups=2, dilation=2), (2, 4, 9, 9)),
                                         (lambda: nn.Conv3d(3, 4, 2), (2, 3, 4, 4, 4)),
                                         (lambda: nn.ConvTranspose2d(3, 4, 3, stride=2), (2, 3, 5, 5))])
def test_static_conv_puts_nan_where_the_float_conv_does(config, make, shape):
    model = nn.Sequential(make())
    float_model = copy.deepcopy(model)
    lowbit.prepare(model, config, filter_fn=lambda m, n: isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)))
    lowbit.calibrate(model, [torch.randn(shape)], progress=False)
    lowbit.convert(model)
    x = torch.randn(shape)
    with torch.no_grad():
        clean = model(x)
        x[(0, 1) + tuple(s // 2 for s in shape[2:])] = float("nan")
        out, expected_nan = model(x), torch.isnan(float_model(x))  # NaN * w is NaN for every w: the windows
    assert expected_nan.any() and torch.equal(torch.isnan(out), expected_nan)
    assert torch.equal(out[~expected_nan], clean[~expected_nan])
