"""(g) intx weights: the linear 4096x11008 at M=1 for every bit width against int4, fp32 and bf16 (interleaved),
and all-MiniLM-L6-v2's cosine (against fp32) for bits 2..7 at group 32 and 128 (round to nearest)."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

import lowbit

from .profiles import Echo, Profile
from .timing import Timed, interleaved_ms

BITS = (2, 3, 4, 5, 6, 7)
GROUPS = (32, 128)
SHAPE = (4096, 11008)  # (in, out)


def bench_intx(profile: Profile, echo: Echo) -> list[dict]:
    return _linear_rows(profile, echo) + _minilm_rows(profile, echo)


def _linear_rows(profile: Profile, echo: Echo) -> list[dict]:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(*SHAPE)).eval()
    x = torch.randn(1, SHAPE[0])
    models = {"fp32": (base, x), "bf16": (copy.deepcopy(base).to(torch.bfloat16), x.to(torch.bfloat16))}
    configs = {"Int4WeightOnly()": lowbit.Int4WeightOnly()}
    configs.update({f"IntxWeightOnly(bits={b}, group_size=128)": lowbit.IntxWeightOnly(bits=b, group_size=128) for b in BITS})
    for name, config in configs.items():
        models[name] = (lowbit.quantize_(copy.deepcopy(base), config), x)
    calls = {name: Timed(lambda m=m, x=x: m(x)) for name, (m, x) in models.items()}
    # 3x the profile's rounds: sub-millisecond calls on a shared machine need them for a stable median (cheap here)
    timings = interleaved_ms(calls, rounds=3 * profile.rounds, target_s=profile.target_s)
    rows = []
    for name in configs:
        t = timings[name]
        row = dict(kind="linear", method=name, size=f"{SHAPE[0]}x{SHAPE[1]} M=1", ms=t.ms, spread=t.spread,
                   speedup=timings["fp32"].ms / t.ms, speedup_bf16=timings["bf16"].ms / t.ms,
                   vs_int4=timings["Int4WeightOnly()"].ms / t.ms)
        rows.append(row)
        echo(f"intx linear {name:<40} {t.ms:8.3f} ms  {row['speedup']:5.2f}x fp32 {row['speedup_bf16']:5.2f}x bf16 "
             f"{row['vs_int4']:5.2f}x int4")
    return rows


def _minilm_rows(profile: Profile, echo: Echo) -> list[dict]:
    from lowbit.embedded import embed, stdlib_sentences

    from .minilm import load

    base, tokenizer = load()
    sentences = stdlib_sentences(profile.sentences)
    reference = embed(base, tokenizer, sentences)
    rows = []
    for group in GROUPS:
        for bits in BITS:
            config = lowbit.IntxWeightOnly(bits=bits, group_size=group)
            model = lowbit.quantize_(copy.deepcopy(base), config)
            cos = (embed(model, tokenizer, sentences) * reference).sum(-1)
            rows.append(dict(kind="minilm", method=config.label(), bits=bits, group=group, cos_min=float(cos.min()),
                             cos_mean=float(cos.mean())))
            echo(f"intx MiniLM {config.label():<40} cos min {cos.min():.4f} mean {cos.mean():.4f}")
    return rows
