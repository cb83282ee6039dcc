"""``lowbit demo``: quantize the embedded all-MiniLM-L6-v2 with every config and compare it with fp32.

Size (parameters, quantized storage counted as stored), latency (median, batch 1, sequence 128),
accuracy (cosine of sentence embeddings, retrieval top-1 agreement) on standard-library docstring
sentences; static configs calibrate on other sentences than the ones they are evaluated on.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

from ..bench.harness import lowbit_quantize, machine, median_ms
from .common import config_spec, int_at_least, parameter_megabytes
from .report import plot_tradeoff, table, write_json

DEFAULT_CONFIGS = ("int8-weight-only", "int4-weight-only", "int4-weight-only:32", "int8-dynamic",
                   "float8-weight-only", "float8-dynamic", "static-int8", "static-float8")
CALIBRATION_SENTENCES = 128
SEQUENCE = 128
LATENCY_ROUNDS = 15
LATENCY_REPS = 3  # calls per model and round
MIN_SENTENCES = 8  # a quarter are queries, the rest the corpus

COLUMNS = [
    ("config", lambda r: r["name"], ""),
    ("MB", lambda r: r["size_mb"], ".1f"),
    ("ms", lambda r: r["ms"], ".2f"),
    ("speed-up", lambda r: f"{r['speedup']:.2f}x", ">"),
    ("cos min", lambda r: r["cos_min"], ".4f"),
    ("cos mean", lambda r: r["cos_mean"], ".4f"),
    ("top-1 agree", lambda r: f"{100 * r['top1_agreement']:.1f}%", ">"),
    ("quantize s", lambda r: r["quantize_s"], ".2f"),
]


def add_parser(subparsers, parent: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "demo", parents=[parent], help="quantize the embedded all-MiniLM-L6-v2 with every config; table, plot, JSON",
        description="Quantize the embedded all-MiniLM-L6-v2 with every config and compare it with fp32: size, latency "
                    "(batch 1, sequence 128), cosine of sentence embeddings and retrieval top-1 agreement on "
                    "standard-library docstring sentences. Prints a table, writes demo.png and demo.json.",
    )
    parser.add_argument("--out", type=Path, default=Path("lowbit-demo"), help="folder for demo.json and demo.png (default: %(default)s)")
    parser.add_argument("--configs", nargs="+", type=config_spec, metavar="NAME[:GROUP]",
                        help=f"configs to run (default: {' '.join(DEFAULT_CONFIGS)})")
    parser.add_argument("--sentences", type=int_at_least(MIN_SENTENCES), default=256, metavar="N",
                        help="evaluation sentences; a quarter are retrieval queries over the rest (default: %(default)s)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..embedded import load_minilm, stdlib_sentences

    try:
        from tqdm.auto import tqdm
    except ImportError as error:
        raise ImportError('lowbit demo needs the extras: pip install "lowbit[models]"') from error
    start = time.perf_counter()
    specs = args.configs or [config_spec(text) for text in DEFAULT_CONFIGS]
    base, tokenizer = load_minilm()
    sentences = stdlib_sentences(args.sentences)
    calibration_text = stdlib_sentences(CALIBRATION_SENTENCES, offset=args.sentences)  # disjoint from the evaluation
    calibration = [dict(tokenizer(calibration_text[i : i + 16], padding=True, truncation=True, max_length=SEQUENCE,
                                  return_tensors="pt")) for i in range(0, CALIBRATION_SENTENCES, 16)]
    latency_input = dict(tokenizer(" ".join(sentences), padding="max_length", truncation=True, max_length=SEQUENCE,
                                   return_tensors="pt"))  # (1, 128)
    queries = len(sentences) // 4

    steps = tqdm([("fp32", None)] + specs, desc="quantize and embed", unit="config", file=sys.stderr)
    models, rows = _quantize_and_embed(base, tokenizer, steps, sentences, queries, calibration)
    latency = _interleaved_latency(models, latency_input, lambda it: tqdm(it, desc="latency", unit="round", file=sys.stderr))
    for row in rows:
        row.update(ms=latency[row["name"]], speedup=latency["fp32"] / latency[row["name"]])

    host = machine()
    print(f"all-MiniLM-L6-v2 on {host}")
    print(f"{len(sentences)} sentences (top-1 agreement: {queries} queries over a corpus of {len(sentences) - queries}); "
          f"static configs calibrated on {CALIBRATION_SENTENCES} other sentences")
    print(table(rows, COLUMNS))
    plot_tradeoff(rows, args.out / "demo.png", "all-MiniLM-L6-v2")
    wall_s = time.perf_counter() - start
    write_json(args.out / "demo.json", dict(
        model="all-MiniLM-L6-v2", machine=host, sentences=len(sentences), queries=queries,
        calibration_sentences=CALIBRATION_SENTENCES, batch=1, sequence=SEQUENCE, wall_s=wall_s, rows=rows,
    ))
    print(f"wrote {args.out / 'demo.json'} and {args.out / 'demo.png'} in {wall_s:.0f} s")
    return 0


def _quantize_and_embed(base, tokenizer, steps, sentences: list[str], queries: int, calibration: list[dict]):
    """Quantize a copy of ``base`` per step (``(name, None)`` is the fp32 model itself) and measure its
    size and accuracy against the first step; return ``({name: model}, rows)``."""
    from ..embedded import embed

    models, rows, reference = {}, [], None
    for name, config in steps:
        steps.set_postfix_str(name)
        model, quantize_s = base, 0.0
        if config is not None:
            model = copy.deepcopy(base)
            t0 = time.perf_counter()
            lowbit_quantize(model, config, calibration)
            quantize_s = time.perf_counter() - t0
        embeddings = embed(model, tokenizer, sentences)  # (N, 384), L2-normalised
        reference = embeddings if reference is None else reference
        cosine = (embeddings * reference).sum(-1)  # (N,)
        models[name] = model
        rows.append(dict(name=name, config=config.label() if config else "float32", size_mb=parameter_megabytes(model),
                         cos_min=float(cosine.min()), cos_mean=float(cosine.mean()),
                         top1_agreement=float((_top1(embeddings, queries) == _top1(reference, queries)).float().mean()),
                         quantize_s=quantize_s))
    return models, rows


def _interleaved_latency(models: dict, inputs: dict, progress) -> dict[str, float]:
    """Median ms of ``model(**inputs)`` per model. The models take turns, a few calls each per round,
    so a burst of load from other processes slows all of them alike instead of one."""
    samples = {name: [] for name in models}
    for round_index in progress(range(LATENCY_ROUNDS)):
        for name, model in models.items():
            warmup = 3 if round_index == 0 else 0
            samples[name].append(median_ms(lambda: model(**inputs), budget_s=0.0, min_reps=LATENCY_REPS, warmup=warmup))
    return {name: statistics.median(values) for name, values in samples.items()}


def _top1(embeddings: torch.Tensor, queries: int) -> torch.Tensor:
    """Index of each query's nearest neighbour (cosine) in the corpus: the rows after the queries."""
    return (embeddings[:queries] @ embeddings[queries:].T).argmax(-1)  # (Q,)
