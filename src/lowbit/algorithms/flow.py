"""The calibration flow of the data-driven weight algorithms (GPTQ, AWQ, SmoothQuant with dynamic activations).

``prepare`` marks the layers a config selects; ``calibrate`` runs the data block by block
(:mod:`lowbit.algorithms.blocks`), collecting each layer's input statistics and quantizing it; ``convert``
installs the quantized weights. Until ``convert`` the model computes in float: ``calibrate`` swaps a block's
quantized weights in only while it computes the next block's inputs. The results are ordinary lowbit tensors
(the config's scheme and kernels; AWQ and SmoothQuant carry their input divisors).
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn as nn

from ..algorithm_options import algorithm_options
from ..errors import NotCalibratedError
from ..configs import QuantConfig
from ..primitives.affine import check_finite
from ..targets import (
    ALGORITHM_ATTR, FilterFn, is_conv1d, linear_weight, module_weight, refuse_prepared, select_targets, validate_targets,
)
from ..tensors.from_spec import quantize_weight
from .awq import ActivationSampleCollector, awq_clipped_qparams, awq_scales
from .blocks import call_model, capture_inputs, find_blocks, next_inputs, progress, run_block
from .gptq import HessianCollector, gptq_quantize
from .smoothquant import ChannelMaxCollector, smoothing_factors


@dataclass
class LayerState:
    """What ``prepare`` records on a layer: its config, then its input statistics and its quantized weight."""

    config: QuantConfig
    collector: Any = None
    result: torch.Tensor | None = None


def prepare_algorithm(model: nn.Module, config: QuantConfig, filter_fn: FilterFn | None) -> nn.Module:
    """Mark the linear layers ``config`` quantizes (nn.Linear and transformers Conv1D) for its data-driven algorithm."""
    refuse_prepared(model, "lowbit.prepare")
    targets = select_targets(model, filter_fn, config, "a data-driven algorithm fits each layer to its own inputs",
                             stacklevel=4)
    if not targets:
        raise ValueError(f"prepare with {config.label()}: filter_fn selected no module")
    other = [f"{fqn} ({type(m).__name__})" for fqn, m in targets if not (isinstance(m, nn.Linear) or is_conv1d(m))]
    if other:
        raise ValueError(f"{config.spec().weight.algorithm} quantizes linear layers (nn.Linear, transformers Conv1D); "
                         f"filter_fn selected {other[:5]}")
    validate_targets(targets, config, module_swap=False)
    for _, module in targets:
        setattr(module, ALGORITHM_ATTR, LayerState(config))
    return model


def prepared_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(fqn, m) for fqn, m in model.named_modules() if hasattr(m, ALGORITHM_ATTR)]


def calibrate_algorithm(model: nn.Module, data: Iterable, max_batches: int | None, progress_bar: bool) -> int:
    """Quantize every prepared layer from ``data``, block by block; return the number of batches used. A later
    call starts again from the float weights with its own data."""
    batches = list(itertools.islice(data, max_batches))
    if not batches:
        raise ValueError("calibrate received no batches; expected an iterable of model inputs")
    layers = prepared_layers(model)
    blocks = find_blocks(model, {id(m) for _, m in layers})
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            done = _calibrate_blocks(model, blocks, batches, layers, progress_bar) if blocks else set()
            rest = [(fqn, m) for fqn, m in layers if id(m) not in done]
            if rest:  # layers outside the stack: one pass of the whole model, earlier results swapped in
                with _collecting(rest), _quantized([(f, m) for f, m in layers if id(m) in done]):
                    for batch in batches:
                        call_model(model, batch)
                _quantize_layers(rest)
    finally:
        model.train(was_training)
    return len(batches)


def _calibrate_blocks(model, blocks, batches, layers, progress_bar) -> set[int]:
    name = getattr(model, "name_or_path", None) or type(model).__name__
    inputs = capture_inputs(model, blocks[0], batches)
    done = set()
    algorithm = getattr(layers[0][1], ALGORITHM_ATTR).config.spec().weight.algorithm
    for block in progress(blocks, len(blocks), progress_bar, f"{algorithm} ({name})"):
        members = [(fqn, m) for fqn, m in layers if any(m is sub for sub in block.modules())]
        with _collecting(members):
            run_block(block, inputs)
        _quantize_layers(members)
        with _quantized(members):
            inputs = next_inputs(inputs, run_block(block, inputs))
        done.update(id(m) for _, m in members)
    return done


@contextmanager
def _collecting(layers):
    """Feed each layer's inputs to a fresh collector of its algorithm's statistics."""
    handles = []
    for _, module in layers:
        state = getattr(module, ALGORITHM_ATTR)
        state.collector, state.result = _collector(state.config, linear_weight(module)), None
        handles.append(module.register_forward_pre_hook(lambda m, args: getattr(m, ALGORITHM_ATTR).collector.add(args[0])))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _collector(config: QuantConfig, weight: torch.Tensor):
    algorithm, features = config.spec().weight.algorithm, weight.shape[1]
    if algorithm == "gptq":
        return HessianCollector(features, weight.device)
    if algorithm == "awq":
        return ActivationSampleCollector(features, algorithm_options(config.algorithm).samples, weight.device)
    return ChannelMaxCollector(features, weight.device)


def _quantize_layers(layers) -> None:
    for fqn, module in layers:
        state = getattr(module, ALGORITHM_ATTR)
        if state.collector.tokens == 0:  # no data reached the layer: convert reports it
            continue
        state.result = module_weight(module, quantized_layer_weight(state, linear_weight(module).detach(), f"{fqn}.weight"))
        state.collector = None  # one Hessian at a time


def quantized_layer_weight(state: LayerState, weight: torch.Tensor, name: str) -> torch.Tensor:
    """The layer's weight (out, in) quantized by its algorithm from the collected statistics."""
    config = state.config
    spec, options, collector = config.spec(), algorithm_options(config.algorithm), state.collector
    check_finite(weight, name)
    block_size = spec.weight.block_size(weight.shape)
    if spec.weight.algorithm == "gptq":
        w_hat, scale, zero_point = gptq_quantize(weight, collector.hessian, spec.weight, block_size, damping=options.damping,
                                                 act_order=options.act_order, block_columns=options.block_columns,
                                                 clip_steps=options.clip_steps)
        return quantize_weight(w_hat.to(weight.dtype), spec, kernel=config.kernel, name=name, qparams=(scale, zero_point))
    qparams = None
    if spec.weight.algorithm == "awq":
        smooth = awq_scales(weight, collector, spec.weight, block_size, options.grid)
        qparams = awq_clipped_qparams(weight.float() * smooth, collector.rows / smooth, spec.weight, block_size,
                                      options.clip_steps)
    else:
        smooth = smoothing_factors(collector.max_abs, weight.float().abs().amax(0), spec.activation.smoothing)
    smoothed = (weight.float() * smooth).to(weight.dtype)
    return quantize_weight(smoothed, spec, kernel=config.kernel, name=name, qparams=qparams, smooth=smooth)


@contextmanager
def _quantized(layers):
    """The layers' quantized weights swapped in (the float ones restored after)."""
    saved = []
    for _, module in layers:
        result = getattr(module, ALGORITHM_ATTR).result
        if result is not None:
            saved.append((module, module.weight))
            module.weight = nn.Parameter(result, requires_grad=False)
    try:
        yield
    finally:
        for module, weight in saved:
            module.weight = weight


def convert_algorithm(model: nn.Module) -> nn.Module:
    """Install every prepared layer's quantized weight (in place).

    Raises:
        NotCalibratedError: a layer has no quantized weight (calibrate did not run, or no data reached it);
            nothing is changed.
    """
    layers = prepared_layers(model)
    blind = [fqn for fqn, m in layers if getattr(m, ALGORITHM_ATTR).result is None]
    if blind:
        raise NotCalibratedError(f"no calibration inputs reached {blind[:5]}{' ...' if len(blind) > 5 else ''}: run "
                                 f"lowbit.calibrate(model, data) with data that reaches these layers first")
    for _, module in layers:
        state = getattr(module, ALGORITHM_ATTR)
        module.weight = nn.Parameter(state.result, requires_grad=False)
        module.lowbit_spec = state.config.spec()
        delattr(module, ALGORITHM_ATTR)
    return model
