"""IntxWeightOnly end to end: bit-packed 2..7-bit weights on nn.Linear and nn.Embedding, module swap, save/load."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lowbit
from lowbit.primitives.affine import choose_qparams, dequantize, quantize

BITS = (2, 3, 4, 5, 6, 7)


def _expected_weight(w: torch.Tensor, bits: int, group: int, symmetric: bool) -> torch.Tensor:
    """Round-to-nearest with the primitives, group by group: what the packed tensor must dequantize to."""
    qtype = f"{'' if symmetric else 'u'}int{bits}"
    block = (1, group)
    scale, zero = choose_qparams(w, block, qtype, symmetric=symmetric)
    return dequantize(quantize(w, scale, zero, block, qtype), scale, zero, block)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", BITS)
def test_linear_weights_pack_to_bits_and_dequantize_exactly(bits, symmetric):
    torch.manual_seed(bits)
    layer = nn.Linear(96, 10)
    w = layer.weight.detach().clone()
    lowbit.quantize_(layer, lowbit.IntxWeightOnly(bits=bits, group_size=32, symmetric=symmetric, kernel="reference"),
                     filter_fn=lambda m, n: True)
    q = layer.weight
    assert type(q) is lowbit.IntxTensor and q.qtype == ("int" if symmetric else "uint") + str(bits)
    assert q.qdata.dtype == torch.uint8 and tuple(q.qdata.shape) == (10, 96 * bits // 8)
    assert (q.zero_point is None) == symmetric
    assert torch.equal(q.dequantize(), _expected_weight(w, bits, 32, symmetric))
    x = torch.randn(4, 96)
    assert torch.equal(layer(x), F.linear(x, q.dequantize(), layer.bias))


@pytest.mark.parametrize("bits", BITS)
def test_error_falls_with_bits(bits):
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    err = lambda b: (_expected_weight(w, b, 32, False) - w).abs().mean()  # noqa: E731
    if bits > 2:
        assert err(bits) < err(bits - 1)
    step = (w.unflatten(1, (-1, 32)).amax(-1).clamp(min=0) - w.unflatten(1, (-1, 32)).amin(-1).clamp(max=0)) / (2**bits - 1)
    assert (_expected_weight(w, bits, 32, False) - w).abs().unflatten(1, (-1, 32)).amax(-1).le(step / 2 + 1e-6).all()


@pytest.mark.parametrize("bits", [2, 5])
def test_embedding_gathers_rows_then_dequantizes(bits):
    torch.manual_seed(1)
    emb = nn.Embedding(20, 64)
    w = emb.weight.detach().clone()
    lowbit.quantize_(emb, lowbit.IntxWeightOnly(bits=bits), filter_fn=lambda m, n: isinstance(m, nn.Embedding))
    ids = torch.tensor([[0, 3, 19], [7, 7, 2]])
    assert torch.equal(emb(ids), F.embedding(ids, _expected_weight(w, bits, 32, False)))


def test_module_swap_and_subclass_agree():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    import copy
    swapped = lowbit.quantize_(copy.deepcopy(model), lowbit.IntxWeightOnly(bits=3), module_swap=True)
    subclassed = lowbit.quantize_(model, lowbit.IntxWeightOnly(bits=3))
    assert isinstance(swapped[0], lowbit.QuantizedLinear)
    x = torch.randn(5, 64)
    assert torch.equal(swapped(x), subclassed(x))


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", BITS)
def test_save_load_round_trip(bits, symmetric, tmp_path):
    torch.manual_seed(3)
    config = lowbit.IntxWeightOnly(bits=bits, group_size=64, symmetric=symmetric)
    model = lowbit.quantize_(nn.Sequential(nn.Linear(128, 24), nn.Linear(24, 64)), config,
                             filter_fn=lambda m, n: n == "0")
    path = lowbit.save(model, tmp_path / "intx.safetensors")
    with torch.device("meta"):
        empty = nn.Sequential(nn.Linear(128, 24), nn.Linear(24, 64))
    loaded = lowbit.load(empty, path)
    x = torch.randn(3, 128)
    assert torch.equal(loaded(x), model(x))
    assert loaded[0].lowbit_spec == config.spec()
    row = next(r for r in lowbit.serialization.describe(path)["tensors"] if r["name"] == "0.weight")
    assert row["bytes"] == 24 * 128 * bits // 8 + 24 * 2 * 4 + (0 if symmetric else 24 * 2)  # qdata, scale, zero_point


@pytest.mark.parametrize("kwargs, message", [
    ({"bits": 8}, "bits must be one of \\(2, 3, 4, 5, 6, 7\\); received 8"),
    ({"bits": 1}, "received 1"),
    ({"bits": True}, "received True"),
    ({"bits": 3, "group_size": 48}, "group_size must be one of \\(32, 64, 128, 256\\); received 48"),
    ({"bits": 3, "symmetric": 1}, "symmetric must be True or False"),
])
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lowbit.IntxWeightOnly(**kwargs)


def test_input_features_not_a_multiple_of_the_group_leave_the_model_unchanged():
    model = nn.Sequential(nn.Linear(64, 8), nn.Linear(8, 40))
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="group_size=32.*multiple of 32.*\\(40, 8\\)"):
        lowbit.quantize_(model, lowbit.IntxWeightOnly(bits=3))
    assert all(type(p) is nn.Parameter and torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("bits", [3, 5, 6])
def test_slices_along_the_packed_dim_cut_whole_bytes(bits):
    """Group boundaries along the bit stream fall on byte boundaries (a group of 32 holds 4 * bits bytes)."""
    layer = lowbit.quantize_(nn.Sequential(nn.Linear(128, 6)), lowbit.IntxWeightOnly(bits=bits, kernel="reference"))[0]
    part = layer.weight[:, 32:96]
    assert tuple(part.qdata.shape) == (6, 64 * bits // 8)
    assert torch.equal(part.dequantize(), layer.weight.dequantize()[:, 32:96])
    with pytest.raises(NotImplementedError, match="multiples of its block size 32"):
        layer.weight[:, 8:40]
