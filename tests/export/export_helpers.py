"""Shared builders for the export-flow tests: exported graphs and their eager twins."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

import lowbit
from lowbit.export import X86Quantizer, convert_pt2e, prepare_pt2e

QUANTIZE = torch.ops.lowbit.quantize_affine.default
DEQUANTIZE = torch.ops.lowbit.dequantize_affine.default
CHOOSE = torch.ops.lowbit.choose_qparams_affine.default


def exported(model: nn.Module, *args, dynamic_batch: bool = False, **kwargs):
    """``torch.export.export(model, args).module()``, the first dimension of every input dynamic on request."""
    shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", max=4096)
        shapes = tuple({0: batch} for _ in args) if args else {k: {0: batch} for k in kwargs}
    return torch.export.export(model, args, kwargs or None, dynamic_shapes=shapes).module()


def quantized_graph(model: nn.Module, config, calibration: list, example=None):
    """Export ``model``, prepare with ``config`` globally, calibrate on ``calibration`` batches, convert."""
    example = calibration[0] if example is None else example
    prepared = prepare_pt2e(exported(model, example, dynamic_batch=True), X86Quantizer().set_global(config))
    with torch.no_grad():
        for batch in calibration:
            prepared(batch)
    return convert_pt2e(prepared)


def eager_twin(model: nn.Module, config, calibration: list) -> nn.Module:
    """The eager flow on a copy: prepare / calibrate / convert for static configs, quantize_ otherwise."""
    twin = copy.deepcopy(model)
    if config.spec().activation is not None and config.spec().activation.mode == "static":
        lowbit.prepare(twin, config, filter_fn=lambda m, fqn: isinstance(m, (nn.Linear, nn.Conv2d)))
        lowbit.calibrate(twin, calibration, progress=False)
        return lowbit.convert(twin)
    return lowbit.quantize_(twin, config)


def count(graph, target) -> int:
    return sum(1 for n in graph.graph.nodes if n.target is target)


def mlp(width: int = 32) -> nn.Module:
    return nn.Sequential(nn.Linear(16, width), nn.GELU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 8)).eval()


def outlier_inputs(batches: int = 4, rows: int = 64, seed: int = 0) -> list[torch.Tensor]:
    """Inputs with a few large channels, as transformer activations have (what SmoothQuant is for)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.ones(16)
    scale[[3, 11]] = 20.0
    return [torch.randn(rows, 16, generator=g) * scale for _ in range(batches)]
