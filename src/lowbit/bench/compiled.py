"""(c) torch.compile against eager mode, interleaved: each quantized linear (4096 -> 11008) and quantized
MiniLM at batch 1, with the float model beside them (torch.compile's own per-call cost shows on it too)."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

import lowbit
from lowbit.configs import STATIC_CONFIGS, config_from_name

from .profiles import Echo, Profile
from .timing import interleaved_ms
from .variants import DEFAULT_CONFIGS


def _quantized(model: nn.Module, config) -> nn.Module:
    return model if config is None else lowbit.quantize_(model, config)


def _row(model: str, config, size: str, call, compiled_call, profile: Profile, echo: Echo) -> dict:
    timings = interleaved_ms({"eager": call, "compiled": compiled_call}, rounds=profile.rounds, target_s=profile.target_s)
    eager_ms, compiled_ms = timings["eager"].ms, timings["compiled"].ms
    label = "fp32" if config is None else config.label()
    echo(f"compile {model:<18} {label:<36} {size:<8} eager {eager_ms:8.3f} ms compiled {compiled_ms:8.3f} ms "
         f"({eager_ms / compiled_ms:.2f}x)")
    return dict(model=model, method=label, size=size, eager_ms=eager_ms, compiled_ms=compiled_ms, ratio=eager_ms / compiled_ms,
                spread=max(timings["eager"].spread, timings["compiled"].spread))


def bench_compile(profile: Profile, echo: Echo) -> list[dict]:
    in_f, out_f = profile.compile_shape
    results = []
    for config in [None, *(c for c in DEFAULT_CONFIGS if not isinstance(c, STATIC_CONFIGS))]:
        torch.manual_seed(0)
        model = _quantized(nn.Sequential(nn.Linear(in_f, out_f, bias=False)), config)
        torch._dynamo.reset()
        compiled = torch.compile(model)
        for m in profile.compile_rows:
            x = torch.randn(m, in_f)
            results.append(_row(f"linear {in_f}->{out_f}", config, f"M={m}", lambda: model(x), lambda: compiled(x), profile, echo))
    return results + bench_minilm_compile(profile, echo)


def bench_minilm_compile(profile: Profile, echo: Echo) -> list[dict]:
    """On a whole model Inductor fuses the float ops around lowbit's kernels, and dynamo's per-call
    cost is paid once."""
    from .minilm import latency_batch, load

    base, tokenizer = load()
    batch = latency_batch(tokenizer, 1)
    results = []
    for config in [None, *map(config_from_name, profile.compile_minilm_configs)]:
        model = _quantized(copy.deepcopy(base), config)
        torch._dynamo.reset()
        compiled = torch.compile(model)
        results.append(_row("MiniLM", config, "batch 1", lambda: model(**batch), lambda: compiled(**batch), profile, echo))
    return results


def bench_compile_bf16(profile: Profile, echo: Echo) -> list[dict]:
    """int8-mixed-bf16 under torch.compile: each quantized MiniLM cast to bf16 and compiled, against the compiled
    bf16 model, interleaved at each batch size."""
    from .minilm import latency_batch, load

    base, tokenizer = load()
    models = {"bf16": copy.deepcopy(base).to(torch.bfloat16)}
    for config in map(config_from_name, profile.compile_minilm_configs):
        models[f"{config.label()} on bf16"] = _quantized(copy.deepcopy(base), config).to(torch.bfloat16)
    torch._dynamo.reset()
    compiled = {name: torch.compile(model) for name, model in models.items()}
    results = []
    for bs in profile.minilm_batches:
        batch = latency_batch(tokenizer, bs)
        timings = interleaved_ms({name: lambda c=c: c(**batch) for name, c in compiled.items()}, rounds=profile.rounds,
                                 target_s=profile.target_s)
        for name, t in timings.items():
            ratio = timings["bf16"].ms / t.ms
            echo(f"compile bf16 MiniLM bs={bs:<3} {name:<44} {t.ms:9.2f} ms ±{100 * t.spread:3.0f}% {ratio:5.2f}x compiled bf16")
            results.append(dict(method=name, batch=bs, ms=t.ms, spread=t.spread, vs_bf16=ratio))
    return results
