"""(b) all-MiniLM-L6-v2 end to end at sequence 128: every variant's size, latency against the fp32 and
bf16 models (interleaved, ``inference_mode``) and cosine of its sentence embeddings against fp32's."""

from __future__ import annotations

import copy
import gc

from .profiles import Echo, Profile
from .timing import Timed, interleaved_ms
from .variants import (BASELINES, DEFAULT_CONFIGS, MINILM_EXTRA_CONFIGS, OPT_IN_CONFIGS, baseline_row, candidates,
                       make_variant, parameter_megabytes)

SEQUENCE = 128
LATENCY_TEXT_OFFSET = 256  # the latency input's sentences: after the evaluation sentences
CALIBRATION_OFFSET = 512  # disjoint from the evaluation and latency sentences


def load():
    from lowbit.embedded import load_minilm

    return load_minilm()


def calibration_batches(tokenizer, count: int) -> list[dict]:
    """``count`` calibration sentences in batches of 16."""
    from lowbit.embedded import stdlib_sentences

    texts = stdlib_sentences(count, offset=CALIBRATION_OFFSET)
    return [dict(tokenizer(texts[i : i + 16], padding=True, truncation=True, max_length=SEQUENCE, return_tensors="pt"))
            for i in range(0, count, 16)]


def latency_batch(tokenizer, batch: int) -> dict:
    """``batch`` copies of one text padded to the full sequence: (batch, 128) inputs."""
    from lowbit.embedded import stdlib_sentences

    text = " ".join(stdlib_sentences(40, offset=LATENCY_TEXT_OFFSET))
    return dict(tokenizer([text] * batch, padding="max_length", truncation=True, max_length=SEQUENCE, return_tensors="pt"))


def bench_minilm(profile: Profile, echo: Echo, notes: list[str]) -> list[dict]:
    from lowbit.embedded import embed, stdlib_sentences

    base, tokenizer = load()
    sentences = stdlib_sentences(profile.sentences)
    reference = embed(base, tokenizer, sentences)
    batches = {bs: latency_batch(tokenizer, bs) for bs in profile.minilm_batches}
    floats = {v.name: v.make(copy.deepcopy(base)) for v in BASELINES}
    configs = DEFAULT_CONFIGS + OPT_IN_CONFIGS + MINILM_EXTRA_CONFIGS
    results = []
    calibration = calibration_batches(tokenizer, profile.calibration_sentences)
    for variant in [None, *candidates(configs, calibration, notes, DEFAULT_CONFIGS)]:
        model = None if variant is None else make_variant(variant, base, notes, "MiniLM")
        if variant is not None and model is None:
            continue
        group = dict(floats) if variant is None else {**floats, variant.name: model}
        subjects = list(floats) if variant is None else [variant.name]
        accuracy = {}
        for name in subjects:
            cos = (embed(group[name], tokenizer, sentences) * reference).sum(-1)  # (N,)
            peer = variant is not None and variant.like is not None
            accuracy[name] = dict(cos_min=float(cos.min()), cos_mean=float(cos.mean()), like=variant.like if peer else None,
                                  size_mb=None if peer else parameter_megabytes(group[name]))
        for bs, batch in batches.items():
            calls = {name: Timed(lambda mod=mod: mod(**batch)) for name, mod in group.items()}
            timings = interleaved_ms(calls, rounds=profile.rounds, target_s=profile.target_s)
            for name in subjects:
                row = baseline_row(timings, name, batch=bs, **accuracy[name])
                results.append(row)
                echo(f"MiniLM bs={bs:<3} {name:<52} {row['ms']:9.2f} ms ±{100 * row['spread']:3.0f}% {row['speedup']:6.2f}x fp32 "
                     f"{row['speedup_bf16']:6.2f}x bf16  cos min {row['cos_min']:.4f}")
        del model
        gc.collect()
    return results
