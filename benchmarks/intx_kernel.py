"""Time the intx weight-only linear at M = 1 on nn.Linear(4096, 11008) for 2..7 bits against int4, bf16 and fp32.

Run: python benchmarks/intx_kernel.py [--threads 2] [--group-size 128] [--rounds 15] [--rows 1]

Every model runs as users call it (``model(x)`` under ``torch.inference_mode``), all of them interleaved round by
round (lowbit.bench.timing), so load from other processes slows them alike. Prints a markdown table: the median
of the per-round medians in ms, the interquartile spread, and the time relative to int4 and to bf16.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn as nn

import lowbit
from lowbit.bench.timing import interleaved_ms

IN_FEATURES, OUT_FEATURES = 4096, 11008


def models(group_size: int) -> dict[str, nn.Module]:
    """The float layer, its bf16 copy, int4 and intx 2..7 bits (affine, groups of ``group_size``)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(IN_FEATURES, OUT_FEATURES))
    out = {"fp32": base, "bf16": copy.deepcopy(base).to(torch.bfloat16)}
    out["int4"] = lowbit.quantize_(copy.deepcopy(base), lowbit.Int4WeightOnly(group_size=group_size))
    for bits in range(2, 8):
        out[f"intx{bits}"] = lowbit.quantize_(copy.deepcopy(base), lowbit.IntxWeightOnly(bits=bits, group_size=group_size))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--rows", type=int, default=1, help="activation rows M")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    layers = models(args.group_size)
    x = torch.randn(args.rows, IN_FEATURES)
    inputs = {name: x.to(torch.bfloat16) if name == "bf16" else x for name in layers}
    calls = {name: (lambda m=layer, i=inputs[name]: m(i)) for name, layer in layers.items()}
    timings = interleaved_ms(calls, rounds=args.rounds, target_s=0.1, max_reps=200)
    print(f"nn.Linear({IN_FEATURES}, {OUT_FEATURES}), M={args.rows}, group {args.group_size}, "
          f"{args.threads} threads, {torch.__version__}")
    print("| weights | ms | spread | vs int4 | vs bf16 |\n|---|---|---|---|---|")
    for name, t in timings.items():
        print(f"| {name} | {t.ms:.3f} | {t.spread:.0%} | {t.ms / timings['int4'].ms:.2f} | {t.ms / timings['bf16'].ms:.2f} |")


if __name__ == "__main__":
    main()
