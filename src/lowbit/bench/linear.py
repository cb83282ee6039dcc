"""(a) Single linear layers shaped like LLaMA-7B's: every variant against the fp32 and bf16 layers
(interleaved, ``inference_mode``), SQNR against the fp32 output."""

from __future__ import annotations

import copy
import gc

import torch
import torch.nn as nn

from .profiles import Echo, Profile
from .timing import Timed, interleaved_ms
from .variants import BASELINES, DEFAULT_CONFIGS, OPT_IN_CONFIGS, baseline_row, candidates, make_variant


def sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    noise = (out.float() - ref.float()).norm()
    return float("inf") if noise == 0 else float(20 * torch.log10(ref.float().norm() / noise))


def bench_linears(profile: Profile, echo: Echo, notes: list[str]) -> list[dict]:
    results = []
    for in_f, out_f in profile.linear_shapes:
        torch.manual_seed(0)
        base = nn.Sequential(nn.Linear(in_f, out_f, bias=False)).eval()
        xs = {m: torch.randn(m, in_f) for m in profile.linear_rows}
        with torch.inference_mode():
            refs = {m: base(x) for m, x in xs.items()}
        floats = {v.name: (v.make(copy.deepcopy(base)), v.dtype) for v in BASELINES}
        where = f"linear {in_f}x{out_f}"
        calibration = [torch.randn(64, in_f) for _ in range(4)]
        for variant in [None, *candidates(DEFAULT_CONFIGS + OPT_IN_CONFIGS, calibration, notes, DEFAULT_CONFIGS)]:
            model = None if variant is None else make_variant(variant, base, notes, where)
            if variant is not None and model is None:
                continue
            group = dict(floats) if variant is None else {**floats, variant.name: (model, variant.dtype)}
            for m, x in xs.items():
                calls = {name: Timed(lambda mod=mod, x=x.to(dtype): mod(x)) for name, (mod, dtype) in group.items()}
                timings = interleaved_ms(calls, rounds=profile.rounds, target_s=profile.target_s)
                for name in (list(floats) if variant is None else [variant.name]):
                    mod, dtype = group[name]
                    with torch.inference_mode():
                        quality = sqnr_db(mod(x.to(dtype)), refs[m])
                    row = baseline_row(timings, name, shape=f"{in_f}x{out_f}", rows=m, sqnr_db=quality)
                    results.append(row)
                    echo(f"linear {in_f}x{out_f} M={m:<4} {name:<52} {row['ms']:9.3f} ms ±{100 * row['spread']:3.0f}% "
                         f"{row['speedup']:6.2f}x fp32 {row['speedup_bf16']:6.2f}x bf16  SQNR {quality:6.1f} dB")
            del model
            gc.collect()
    return results
