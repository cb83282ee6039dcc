"""Prepared models train as ordinary modules: state_dict, deepcopy, torch.compile (one graph) and DDP."""

import copy
import os
import tempfile

import pytest
import torch
import torch.nn as nn
from helpers import mlp, optimizer_for, task, train

import lowbit
from lowbit.qat import QATConfig, freeze_ranges

CONFIGS = [lowbit.Int4WeightOnly(group_size=32), lowbit.Int8DynamicActivation(), lowbit.StaticInt8(),
           lowbit.Float8DynamicActivation()]


def _prepared(config, range_learning=False):
    return lowbit.quantize_(mlp(), QATConfig(config, range_learning=range_learning))


@pytest.mark.parametrize("range_learning", [False, True], ids=["minmax", "lsq"])
def test_state_dict_restores_a_trained_model_into_a_fresh_prepared_one(range_learning):
    config = lowbit.StaticInt8()
    model = _prepared(config, range_learning)
    train(model, 8, after_step=lambda step: step == 4 and freeze_ranges(model))
    fresh = _prepared(config, range_learning)
    fresh.load_state_dict(model.state_dict())
    quantizer = getattr(fresh[0], "lowbit_input_fake_quant")
    assert not quantizer.observing and not quantizer.smoothing_pending  # the phase travels with the state
    x = torch.randn(8, 64)
    model.eval(), fresh.eval()
    assert torch.equal(fresh(x), model(x))


def test_deepcopy_is_independent_and_computes_the_same():
    model = _prepared(lowbit.Int4WeightOnly(group_size=32), range_learning=True)
    clone = copy.deepcopy(model)
    x = torch.randn(8, 64)
    assert torch.equal(clone(x), model(x))
    train(clone, 3)
    assert not torch.equal(clone(x), model(x))
    lowbit.quantize_(clone, QATConfig(lowbit.Int4WeightOnly(group_size=32), step="convert"))
    assert torch.isfinite(model(x)).all()  # the original still trains after its copy was converted


@pytest.mark.parametrize("range_learning", [False, True], ids=["minmax", "lsq"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.label())
def test_compiled_training_step_is_one_graph_and_matches_eager(config, range_learning):
    torch._dynamo.reset()
    model = _prepared(config, range_learning)
    x, y = task(16)
    model(x)  # the first batch fixes SmoothQuant factors (static) before the compiled steps
    if range_learning:
        freeze_ranges(model)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    for net in (compiled, eager):
        (net(x) - y).pow(2).mean().backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)


def test_ddp_wrapped_model_trains_and_syncs_its_qparams():
    import torch.distributed as dist

    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)
        try:
            model = _prepared(lowbit.StaticInt8(), range_learning=True)
            x, y = task(16)
            model(x)
            freeze_ranges(model)
            ddp = nn.parallel.DistributedDataParallel(model)
            optimizer = optimizer_for(ddp)
            before = model[0].lowbit_input_fake_quant.scale.detach().clone()
            for _ in range(3):
                (ddp(x) - y).pow(2).mean().backward()
                optimizer.step()
                optimizer.zero_grad()
            assert not torch.equal(model[0].lowbit_input_fake_quant.scale.detach(), before)
            lowbit.quantize_(model, QATConfig(lowbit.StaticInt8(), step="convert"))
            assert isinstance(model[0].weight, lowbit.StaticActivationTensor)
        finally:
            dist.destroy_process_group()
