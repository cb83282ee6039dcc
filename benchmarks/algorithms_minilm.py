"""Weight algorithms on all-MiniLM-L6-v2: round to nearest against HQQ, GPTQ and AWQ at 4, 3 and 2 bits.

Run: python benchmarks/algorithms_minilm.py [--calibration 512] [--sentences 256] [--algorithms rtn,hqq,gptq,awq]
     [--configs int4-g32,int4-g128,int3-g32,int2-g32] [--no-cost] [--quick]

For each config and algorithm: cosine of the held-out sentence embeddings (``stdlib_sentences(N, offset=0)``) to the
float model's (min, mean), retrieval top-1 agreement (each held-out sentence's nearest other held-out sentence under
the quantized model's embeddings and under the float model's: the fraction that agree) and the wall time of
quantizing (``quantize_`` for data-free algorithms; ``prepare`` + ``calibrate`` + ``convert`` for data-driven ones,
on ``--calibration`` sentences disjoint from the held-out ones, ``lowbit.bench.minilm.calibration_batches``). An
algorithm that a config refuses, or that fails, gets a row "not available: <error>". The cost line times GPTQ and
HQQ at Int4WeightOnly(group_size=128) with 128 calibration sentences (targets: GPTQ < 30 s, HQQ < 5 s).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import lowbit
from lowbit.bench.algorithms import names, not_available, quantize_timed, retrieval_agreement, table
from lowbit.bench.minilm import calibration_batches
from lowbit.embedded import embed, load_minilm, stdlib_sentences

CONFIGS = {
    "int4-g32": lambda algorithm: lowbit.Int4WeightOnly(group_size=32, algorithm=algorithm),
    "int4-g128": lambda algorithm: lowbit.Int4WeightOnly(group_size=128, algorithm=algorithm),
    "int3-g32": lambda algorithm: lowbit.IntxWeightOnly(bits=3, group_size=32, algorithm=algorithm),
    "int2-g32": lambda algorithm: lowbit.IntxWeightOnly(bits=2, group_size=32, algorithm=algorithm),
}
ALGORITHMS = ("rtn", "hqq", "gptq", "awq")
COST_CALIBRATION = 128




def accuracy_rows(base, tokenizer, args) -> list[list[str]]:
    sentences = stdlib_sentences(args.sentences, offset=0)
    reference = embed(base, tokenizer, sentences)
    calibration = calibration_batches(tokenizer, args.calibration)
    rows = []
    for config_name in args.configs:
        for algorithm in args.algorithms:
            model = copy.deepcopy(base)
            try:
                config = CONFIGS[config_name](algorithm)
                seconds = quantize_timed(model, config, calibration)
            except Exception as error:  # noqa: BLE001 - an algorithm not landed yet, or refused by this config
                rows.append([config_name, algorithm, not_available(error), "", ""])
                continue
            quantized = embed(model, tokenizer, sentences)
            cos = (quantized * reference).sum(-1)  # (N,)
            rows.append([config_name, algorithm, f"{cos.min().item():.4f} / {cos.mean().item():.4f}",
                         f"{retrieval_agreement(reference, quantized):.3f}", f"{seconds:.1f}"])
            print(" | ".join(rows[-1]), flush=True)
    return rows


def cost_lines(base, tokenizer, calibration_count: int) -> list[str]:
    """Wall time of GPTQ (on ``calibration_count`` sentences) and HQQ at Int4WeightOnly(group_size=128)."""
    calibration = calibration_batches(tokenizer, calibration_count)
    lines = []
    for algorithm, target in (("gptq", 30), ("hqq", 5)):
        try:
            config = lowbit.Int4WeightOnly(group_size=128, algorithm=algorithm)
            seconds = quantize_timed(copy.deepcopy(base), config, calibration)
            lines.append(f"- cost: {config} on MiniLM: {seconds:.1f} s (target < {target} s)")
        except Exception as error:  # noqa: BLE001 - an algorithm not landed yet
            lines.append(f"- cost: {algorithm}: {not_available(error)}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=int, default=512, help="calibration sentences (batches of 16)")
    parser.add_argument("--sentences", type=int, default=256, help="held-out sentences")
    parser.add_argument("--algorithms", type=lambda v: names(v, ALGORITHMS), default=list(ALGORITHMS))
    parser.add_argument("--configs", type=lambda v: names(v, CONFIGS), default=None, help="default: all (--quick: int4-g128)")
    parser.add_argument("--cost", action=argparse.BooleanOptionalAction, default=True,
                        help=f"time gptq and hqq at int4 g128 with {COST_CALIBRATION} calibration sentences")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 16 sentences, 16 calibration, int4-g128 unless --configs, no cost line")
    args = parser.parse_args()
    if args.quick:
        args.calibration = args.sentences = 16
        args.cost = False
    args.configs = args.configs or (["int4-g128"] if args.quick else list(CONFIGS))
    torch.manual_seed(0)
    start = time.perf_counter()
    base, tokenizer = load_minilm()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = accuracy_rows(base, tokenizer, args)
    print(f"\n### all-MiniLM-L6-v2: weight algorithms ({args.sentences} held-out sentences, {args.calibration} calibration "
          f"sentences for data-driven algorithms)\n")
    print(table(["config", "algorithm", "cos min / mean", "retrieval top-1", "quantize s"], rows))
    if args.cost:
        print(f"\nCost ({COST_CALIBRATION} calibration sentences for gptq):\n")
        print("\n".join(cost_lines(base, tokenizer, COST_CALIBRATION)))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
