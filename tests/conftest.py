import pytest
import torch

import lowbit

ALL_CONFIGS = [
    lowbit.Int8WeightOnly(),
    lowbit.Int8WeightOnly(group_size=32),
    lowbit.Int4WeightOnly(group_size=32),
    lowbit.Int4WeightOnly(group_size=64, symmetric=True),
    lowbit.Int8DynamicActivation(),
    lowbit.Int8DynamicActivation(act_symmetric=True),
    lowbit.Float8WeightOnly(),
    lowbit.Float8DynamicActivation(),
    lowbit.Float8DynamicActivation(granularity="per_tensor"),
    lowbit.IntxWeightOnly(bits=3),
    lowbit.IntxWeightOnly(bits=5, group_size=64, symmetric=True),
]
WEIGHT_ONLY_CONFIGS = [c for c in ALL_CONFIGS if c.supports_embedding]


def low_bit_error_bound(config, int4_bound: float, default: float) -> float:
    """A relative output error bound for weights below 8 bits: ``int4_bound`` at 4 bits and above (more bits only
    shrink the rounding step), doubling with each bit fewer (the rounding step of a group doubles per bit taken
    away); ``default`` for 8-bit and float8 configs."""
    bits = 4 if isinstance(config, lowbit.Int4WeightOnly) else getattr(config, "bits", None)
    return default if bits is None else int4_bound * 2.0 ** max(0, 4 - bits)


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def config_id(config) -> str:
    return config.label()


class MLP(torch.nn.Module):
    """Two linears; in/out feature counts divisible by every group size used in the tests."""

    def __init__(self, dims=(64, 128, 32)):
        super().__init__()
        self.fc1 = torch.nn.Linear(dims[0], dims[1])
        self.fc2 = torch.nn.Linear(dims[1], dims[2])

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def assert_survives_copies(model, x):
    """deepcopy, torch.save/load, load_state_dict and .to(bfloat16) keep a quantized model's outputs
    (packed kernel layouts included)."""
    import copy
    import io

    expected = model(x)
    assert torch.equal(copy.deepcopy(model)(x), expected)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=False)(x), expected)
    clone = copy.deepcopy(model)
    clone.load_state_dict(model.state_dict())
    assert torch.equal(clone(x), expected)
    half = copy.deepcopy(model).to(torch.bfloat16)
    assert half(x.bfloat16()).dtype == torch.bfloat16
    assert (half(x.bfloat16()).float() - expected).abs().max() < 0.05 * expected.abs().max()


def assert_compiles_and_exports(model, x, op: str):
    """torch.compile (fullgraph) matches eager, and torch.export of the frozen model calls lowbit op ``op``."""
    torch._dynamo.reset()
    # Inductor's on-disk graph cache does not key on a custom op's fake kernel: a stale entry from an older
    # lowbit would assert the old output strides
    with torch.inference_mode(), torch._inductor.config.patch(fx_graph_cache=False):
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x))
    program = torch.export.export(model.requires_grad_(False), (x,))  # a frozen model, as deployed
    assert any(op in str(node.target) for node in program.graph.nodes)
    torch.testing.assert_close(program.module()(x), model(x))
