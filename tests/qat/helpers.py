"""Shared pieces of the QAT tests: the configs, a small regression task and a training loop."""

import dataclasses

import torch
import torch.nn as nn

import lowbit
from lowbit.qat import range_parameters

QAT_CONFIGS = [
    lowbit.Int8WeightOnly(),
    lowbit.Int4WeightOnly(group_size=32),
    lowbit.Int4WeightOnly(group_size=32, symmetric=True),
    lowbit.Int4WeightOnly(group_size=32, algorithm="hqq"),
    lowbit.IntxWeightOnly(bits=3),
    lowbit.IntxWeightOnly(bits=2, symmetric=True),
    lowbit.Int8DynamicActivation(),
    lowbit.Int8DynamicActivation(act_symmetric=True),
    lowbit.Float8WeightOnly(),
    lowbit.Float8DynamicActivation(),
    lowbit.Float8DynamicActivation(granularity="per_tensor"),
    lowbit.StaticInt8(),
    lowbit.StaticInt8(act_symmetric=True, smoothing=None),
    lowbit.StaticFloat8(),
]


def is_static(config) -> bool:
    return isinstance(config, lowbit.configs.STATIC_CONFIGS)


def with_kernel(config, kernel: str):
    return dataclasses.replace(config, kernel=kernel)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32))


def task(n: int = 64, seed: int = 1):
    """Inputs and targets of a smooth regression the MLP can fit."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 64, generator=g)
    return x, torch.sin(x[:, :32]) + 0.5 * x[:, 32:]


def optimizer_for(model: nn.Module, lr: float = 3e-3) -> torch.optim.Optimizer:
    """Adam, learned qparams at a learning rate near their size (see lowbit.qat.range_parameters)."""
    learned = range_parameters(model)
    others = [p for p in model.parameters() if all(p is not q for q in learned)]
    return torch.optim.Adam([{"params": others}, {"params": learned, "lr": lr * 1e-2}], lr=lr)


def train(model: nn.Module, steps: int, lr: float = 3e-3, x=None, y=None, after_step=None) -> list[float]:
    """Adam on the regression task; returns the losses."""
    if x is None:
        x, y = task()
    optimizer = optimizer_for(model, lr)
    model.train()
    losses = []
    for step in range(steps):
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if after_step is not None:
            after_step(step)
    return losses
