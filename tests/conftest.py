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
]
WEIGHT_ONLY_CONFIGS = [c for c in ALL_CONFIGS if c.supports_embedding]


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
