"""(e) Grad mode, as users call models (plain ``model(x)``: grad mode on, the bias trainable) against
``torch.no_grad``: the grad-mode / no_grad time ratio of every config, and its grad-mode time against the
fp32 and bf16 models in grad mode. A linear (with bias) at a few M, and MiniLM at batch 1."""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn as nn

from .profiles import Echo, Profile
from .timing import Timed, interleaved_ms
from .variants import BASELINES, DEFAULT_CONFIGS, Variant, lowbit_variant


def grad_rows(workload: str, size: str, floats: dict[str, Callable], candidates: dict[str, Callable],
              profile: Profile, echo: Echo) -> list[dict]:
    """One row per float baseline and candidate. ``floats`` (fp32, bf16) and ``candidates`` map a name to
    a call that runs the model once; each candidate is timed in grad mode and under no_grad in the same
    interleaved rounds as the baselines in grad mode."""
    rows = []
    for name, call in [(None, None), *candidates.items()]:
        calls = {f"{n} grad": Timed(c, "grad") for n, c in floats.items()}
        subjects = list(floats.items()) if name is None else [(name, call)]
        for n, c in subjects:
            calls[f"{n} no_grad"], calls[f"{n} grad"] = Timed(c, "no_grad"), Timed(c, "grad")
        timings = interleaved_ms(calls, rounds=profile.rounds, target_s=profile.target_s)
        for n, _ in subjects:
            grad, no_grad = timings[f"{n} grad"], timings[f"{n} no_grad"]
            row = dict(model=workload, size=size, method=n, no_grad_ms=no_grad.ms, grad_ms=grad.ms,
                       grad_ratio=grad.ms / no_grad.ms, spread=max(grad.spread, no_grad.spread),
                       grad_speedup=timings["fp32 grad"].ms / grad.ms, grad_speedup_bf16=timings["bf16 grad"].ms / grad.ms)
            rows.append(row)
            echo(f"grad {workload:<20} {size:<8} {n:<40} no_grad {no_grad.ms:8.3f} ms grad {grad.ms:8.3f} ms "
                 f"(grad / no_grad {row['grad_ratio']:.2f}; grad mode {row['grad_speedup']:.2f}x fp32, "
                 f"{row['grad_speedup_bf16']:.2f}x bf16)")
    return rows


def _calls(models: dict[str, tuple[nn.Module, torch.dtype]], x) -> dict[str, Callable]:
    """name -> a call of that model on ``x`` (a tensor, or a dict of keyword tensors left as they are)."""
    if isinstance(x, dict):
        return {n: (lambda mod=mod: mod(**x)) for n, (mod, _) in models.items()}
    return {n: (lambda mod=mod, x=x.to(dtype): mod(x)) for n, (mod, dtype) in models.items()}


def _models(base: nn.Module, variants: list[Variant]) -> dict[str, tuple[nn.Module, torch.dtype]]:
    return {v.name: (v.make(copy.deepcopy(base)), v.dtype) for v in variants}


def bench_grad(profile: Profile, echo: Echo) -> list[dict]:
    """The linear of ``profile.grad_shape`` at ``profile.grad_rows``, then (``profile.grad_minilm``) MiniLM at batch 1."""
    from .minilm import calibration_batches, latency_batch, load

    in_f, out_f = profile.grad_shape
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(in_f, out_f)).eval()  # with a bias: trainable, as after quantize_
    calibration = [torch.randn(64, in_f) for _ in range(4)]
    floats, models = _models(base, BASELINES), _models(base, [lowbit_variant(c, calibration) for c in DEFAULT_CONFIGS])
    rows = []
    for m in profile.grad_rows:
        x = torch.randn(m, in_f)
        rows += grad_rows(f"linear {in_f}x{out_f}", f"M={m}", _calls(floats, x), _calls(models, x), profile, echo)
    if not profile.grad_minilm:
        return rows
    del floats, models
    base, tokenizer = load()
    calibration = calibration_batches(tokenizer, profile.calibration_sentences)
    floats, models = _models(base, BASELINES), _models(base, [lowbit_variant(c, calibration) for c in DEFAULT_CONFIGS])
    batch = latency_batch(tokenizer, 1)
    return rows + grad_rows("MiniLM seq 128", "batch 1", _calls(floats, batch), _calls(models, batch), profile, echo)
