"""What the benchmark compares: the float baselines, lowbit's configs and the installed peers."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

import lowbit
from lowbit.configs import NAMED_CONFIGS, STATIC_CONFIGS, IntxWeightOnly, config_from_name
from lowbit.tensors import QuantizedTensor

from .peers import peer_list

# one of each config class with its defaults (intx at 3 bits; every bit width has rows of its own in bench.intx)
DEFAULT_CONFIGS = [c for c in NAMED_CONFIGS.values() if not isinstance(c, IntxWeightOnly) or c.bits == 3]
# opt-in kernels measured beside the defaults (avx512: int8 activations on the canonical weight, few-row GEMV)
OPT_IN_CONFIGS = [lowbit.Int8WeightOnly(kernel="onednn"), lowbit.Int8DynamicActivation(kernel="avx512")]
# non-default settings that BENCHMARKS.md's accuracy table reports on MiniLM
MINILM_EXTRA_CONFIGS = [lowbit.Int4WeightOnly(group_size=32), lowbit.Int8DynamicActivation(act_symmetric=True),
                        lowbit.StaticInt8(smoothing=None), lowbit.StaticInt8(observer="histogram")]


@dataclass(frozen=True)
class Variant:
    """A way to turn the float model into the model to measure. ``make`` changes the model it is given
    (pass a copy); ``dtype`` is the dtype its inputs take; ``like`` names the lowbit config a peer is
    compared with (its label), ``None`` for the float baselines and lowbit itself."""

    name: str
    make: Callable[[nn.Module], nn.Module]
    dtype: torch.dtype = torch.float32
    like: str | None = None


BASELINES = [Variant("fp32", lambda m: m), Variant("bf16", lambda m: m.to(torch.bfloat16), torch.bfloat16)]


def lowbit_quantize(model: nn.Module, config, calibration, filter_fn=None) -> nn.Module:
    """quantize_ for weight-only/dynamic configs; prepare + calibrate + convert (on ``calibration``, a
    list of inputs or of keyword dicts) for static ones. ``filter_fn`` as in :func:`lowbit.quantize_`."""
    if isinstance(config, STATIC_CONFIGS):
        lowbit.prepare(model, config, filter_fn=filter_fn)
        lowbit.calibrate(model, calibration, progress=False)
        return lowbit.convert(model)
    return lowbit.quantize_(model, config, filter_fn=filter_fn)


def lowbit_variant(config, calibration) -> Variant:
    return Variant(f"lowbit {config.label()}", lambda m: lowbit_quantize(m, config, calibration))


BF16_SUFFIX = " on bf16"  # rows of a config on the model cast to bf16 after quantize_ (int8-mixed-bf16)


def lowbit_bf16_variant(config, calibration) -> Variant:
    """``config`` as a bf16 user runs it (README): quantized from the fp32 weights, then the model cast to bf16,
    taking bf16 inputs."""
    return Variant(f"lowbit {config.label()}{BF16_SUFFIX}",
                   lambda m: lowbit_quantize(m, config, calibration).to(torch.bfloat16), torch.bfloat16)


def candidates(configs, calibration, notes: list[str], bf16_configs=()) -> list[Variant]:
    """lowbit with each of ``configs``, then with each of ``bf16_configs`` on the bf16 model, then every installed
    peer (a note in ``notes`` for each one missing)."""
    return ([lowbit_variant(c, calibration) for c in configs] + [lowbit_bf16_variant(c, calibration) for c in bf16_configs]
            + [Variant(name, make, like=like) for name, like, make in peer_list(notes)])


def make_variant(variant: Variant, base: nn.Module, notes: list[str], where: str) -> nn.Module | None:
    """``variant`` applied to a copy of ``base``; a peer that fails is skipped with a note (lowbit's own
    configs raise)."""
    try:
        return variant.make(copy.deepcopy(base))
    except Exception as error:
        if variant.like is None:
            raise
        notes.append(f"{variant.name} skipped on {where}: {type(error).__name__}: {' '.join(str(error).split())[:200]}")
        return None


def baseline_row(timings: dict, name: str, **fields) -> dict:
    """A result row with ``name``'s time and its ratios to the fp32 and bf16 timings of the same rounds."""
    t = timings[name]
    return dict(fields, method=name, ms=t.ms, spread=t.spread, speedup=timings["fp32"].ms / t.ms,
                speedup_bf16=timings["bf16"].ms / t.ms)


def parameter_megabytes(model: nn.Module) -> float:
    """The model's parameters in MB (1e6 bytes), quantized weights at their stored size (packing included)."""
    total = 0
    for p in model.parameters():
        total += p.storage_bytes() if isinstance(p, QuantizedTensor) else p.numel() * p.element_size()
    return total / 1e6
