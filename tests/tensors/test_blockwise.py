"""Ops shared by Int8Tensor, Int4Tensor and Float8Tensor, checked against the dequantized tensor."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F

from lowbit import Float8Tensor, Int4Tensor, Int8Tensor
from lowbit.tensors.blockwise import with_packing
from lowbit.kernels import decode_gemm

MAKERS = {
    "int8_channel": lambda w: Int8Tensor.from_float(w, (1, w.shape[1])),
    "int8_group": lambda w: Int8Tensor.from_float(w, (1, 32)),
    "int4_asym": lambda w: Int4Tensor.from_float(w, (1, 32), symmetric=False),
    "int4_sym": lambda w: Int4Tensor.from_float(w, (1, 32), symmetric=True),
    "float8_row": lambda w: Float8Tensor.from_float(w, (1, w.shape[1])),
    "float8_tensor": lambda w: Float8Tensor.from_float(w, tuple(w.shape), float8_dtype=torch.float8_e5m2),
}


@pytest.fixture(params=list(MAKERS))
def make(request):
    """Reference-kernel tensors: op semantics are compared exactly against the dequantized tensor."""
    return lambda w: MAKERS[request.param](w).rebuild(kernel="reference")


@pytest.fixture
def weight(device):
    return torch.randn(48, 128, device=device)


def test_dequantize_is_close_and_keeps_dtype(make, weight):
    q = make(weight)
    assert q.shape == weight.shape and q.dtype == weight.dtype and q.device == weight.device
    rel = (q.dequantize() - weight).norm() / weight.norm()
    assert rel < 0.12
    assert q.dequantize(torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_float_dtypes(make, dtype, device):
    w = torch.randn(16, 64, device=device, dtype=dtype)
    q = make(w)
    assert q.dtype == dtype and q.dequantize().dtype == dtype
    x = torch.randn(3, 64, device=device, dtype=dtype)
    assert F.linear(x, q).dtype == dtype


def test_linear_matches_dequantized(make, weight):
    q = make(weight)
    x = torch.randn(5, 7, 128, device=weight.device)
    bias = torch.randn(48, device=weight.device)
    expected = F.linear(x, q.dequantize(), bias)
    torch.testing.assert_close(F.linear(x, q, bias), expected)
    fast = F.linear(x, with_packing(q.rebuild(kernel="auto")), bias)  # float rounding differs, not the math
    bf16_compute = q.qtype != "int8" or decode_gemm.unavailable() is None  # above 8 rows the fast CPU kernels multiply in bf16
    assert ((fast - expected).norm() / expected.norm()).item() < (5e-3 if bf16_compute else 2e-4)


def test_matmul_family(make, weight):
    q = make(weight)
    dq = q.dequantize()
    x = torch.randn(4, 128, device=weight.device)
    b = torch.randn(48, device=weight.device)
    torch.testing.assert_close(torch.mm(x, q.t()), x @ dq.t())
    torch.testing.assert_close(torch.matmul(x, q.t()), x @ dq.t())
    torch.testing.assert_close(torch.addmm(b, x, q.t()), b + x @ dq.t())
    torch.testing.assert_close(torch.mm(q, x.t()), dq @ x.t())


def test_bmm_on_a_batch_of_matrices(device):
    w = torch.randn(3, 64, 16, device=device)
    q = Int8Tensor.from_float(w, (1, 1, 16))
    x = torch.randn(3, 5, 64, device=device)
    torch.testing.assert_close(torch.bmm(x, q), torch.bmm(x, q.dequantize()))


def test_transpose_views(make, weight):
    q = make(weight)
    assert torch.equal(q.t().dequantize(), q.dequantize().t())
    assert torch.equal(q.transpose(0, 1).t().dequantize(), q.dequantize())
    assert q.t().shape == (128, 48)


def test_slicing_on_block_boundaries(make, weight):
    q = make(weight)
    dq = q.dequantize()
    torch.testing.assert_close(q[8:24].dequantize(), dq[8:24])
    torch.testing.assert_close(q.narrow(0, 16, 16).dequantize(), dq.narrow(0, 16, 16))
    parts = q.split(16, dim=0)
    assert len(parts) == 3
    torch.testing.assert_close(torch.cat([p.dequantize() for p in parts]), dq)


def test_slicing_along_groups(weight):
    q = Int4Tensor.from_float(weight, (1, 32))
    torch.testing.assert_close(q[:, 32:96].dequantize(), q.dequantize()[:, 32:96])
    with pytest.raises(NotImplementedError, match="multiples of its block size 32"):
        q[:, 16:48]
    with pytest.raises(NotImplementedError, match="step 1"):
        q[::2]


def test_view_of_leading_dims(device):
    w = torch.randn(4, 6, 64, device=device)
    q = Int8Tensor.from_float(w, (1, 1, 64))
    torch.testing.assert_close(q.view(24, 64).dequantize(), q.dequantize().view(24, 64))
    torch.testing.assert_close(q.reshape(2, 12, 64).dequantize(), q.dequantize().reshape(2, 12, 64))
    with pytest.raises(NotImplementedError, match="cannot be viewed"):
        q.view(4, 384)


def test_per_tensor_reshapes_freely(device):
    w = torch.randn(8, 16, device=device)
    q = Float8Tensor.from_float(w, (8, 16))
    torch.testing.assert_close(q.reshape(128).dequantize(), q.dequantize().reshape(128))


def test_embedding_gathers_quantized_rows(make, weight):
    q = make(weight)
    idx = torch.tensor([[0, 5, 47], [3, 3, 1]], device=weight.device)
    torch.testing.assert_close(F.embedding(idx, q), F.embedding(idx, q.dequantize()))
    with pytest.raises(ValueError, match="max_norm"):
        F.embedding(idx, q, max_norm=1.0)


def test_to_device_and_dtype(make, weight):
    q = make(weight)
    moved = q.to(torch.bfloat16)
    assert type(moved) is type(q) and moved.dtype == torch.bfloat16
    assert torch.equal(moved.qdata, q.qdata)
    with pytest.raises(ValueError, match="float dtypes"):
        q.to(torch.int32)
    assert q.to("cpu").device.type == "cpu"


def test_detach_clone_deepcopy_pickle(make, weight):
    q = make(weight)
    buffer = io.BytesIO()
    torch.save(q.cpu(), buffer)  # plain pickle of any float8 tensor fails inside torch itself
    buffer.seek(0)
    for other in (q.detach(), q.clone(), copy.deepcopy(q), torch.load(buffer, weights_only=False)):
        assert type(other) is type(q)
        assert torch.equal(other.dequantize().cpu(), q.dequantize().cpu())
    assert q.clone().qdata.data_ptr() != q.qdata.data_ptr()


def test_copy_into_same_layout_and_refuse_others(make, weight):
    q, other = make(weight), make(torch.randn_like(weight))
    with torch.no_grad():
        q.copy_(other)
    assert torch.equal(q.dequantize(), other.dequantize())
    with pytest.raises(ValueError, match="same class"):
        with torch.no_grad():
            q.copy_(torch.randn_like(weight))


def test_unimplemented_op_names_op_and_class(make, weight):
    q = make(weight)
    with pytest.raises(NotImplementedError, match=rf"{type(q).__name__} does not implement aten\.sin.*dequantize"):
        torch.sin(q)


def test_flatten_unflatten_roundtrip(make, weight):
    q = make(weight)
    names, ctx = q.__tensor_flatten__()
    again = type(q).__tensor_unflatten__({n: getattr(q, n) for n in names}, ctx, q.shape, q.stride())
    assert torch.equal(again.dequantize(), q.dequantize())


def test_int4_is_packed_two_per_byte(weight):
    q = Int4Tensor.from_float(weight, (1, 32))
    assert q.qdata.dtype == torch.uint8 and q.qdata.shape == (48, 64)
    assert q.storage_bytes() < weight.numel() * 4 / 6


def test_compile_cache_key_follows_layout_and_code(monkeypatch, weight):
    import lowbit.tensors.base as base

    q = Int8Tensor.from_float(weight, (1, weight.shape[1]))
    same = Int8Tensor.from_float(torch.randn_like(weight), (1, weight.shape[1]))
    grouped = Int8Tensor.from_float(weight, (1, 32))
    assert q._stable_hash_for_caching() == same._stable_hash_for_caching()  # values are not part of the key
    assert q._stable_hash_for_caching() != grouped._stable_hash_for_caching()
    key = q._stable_hash_for_caching()
    monkeypatch.setattr(base, "code_fingerprint", lambda: "edited lowbit")
    assert q._stable_hash_for_caching() != key  # a code change must not reuse a cached graph
