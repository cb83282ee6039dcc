"""Quantize the embedded all-MiniLM-L6-v2 with every lowbit config; print size and accuracy.

Run: python examples/quantize_minilm.py
"""

from __future__ import annotations

import copy
import time

import torch

import lowbit
from lowbit.embedded import embed, load_minilm, stdlib_sentences

CONFIGS = [
    lowbit.Int8WeightOnly(),
    lowbit.Int8DynamicActivation(),
    lowbit.Int4WeightOnly(group_size=32),
    lowbit.Int4WeightOnly(group_size=128),
    lowbit.Float8WeightOnly(),
    lowbit.Float8DynamicActivation(),
]


def model_megabytes(model: torch.nn.Module) -> float:
    """Parameters and buffers in MB, counting quantized weights at their stored size."""
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        total += t.storage_bytes() if isinstance(t, lowbit.QuantizedTensor) else t.numel() * t.element_size()
    return total / 1e6


def main() -> None:
    torch.manual_seed(0)
    sentences = stdlib_sentences(256)
    model, tokenizer = load_minilm()
    reference = embed(model, tokenizer, sentences)
    print(f"all-MiniLM-L6-v2, {len(sentences)} standard-library sentences; quantizing every nn.Linear")
    print(f"{'config':<48} {'MB':>7} {'cos min':>8} {'cos mean':>9} {'quantize s':>10}")
    print(f"{'float32':<48} {model_megabytes(model):7.1f} {1:8.4f} {1:9.4f} {'-':>10}")
    for config in CONFIGS:
        quantized = copy.deepcopy(model)
        start = time.perf_counter()
        lowbit.quantize_(quantized, config)
        seconds = time.perf_counter() - start
        cosine = (embed(quantized, tokenizer, sentences) * reference).sum(-1)
        print(f"{config.label():<48} {model_megabytes(quantized):7.1f} {cosine.min():8.4f} {cosine.mean():9.4f} {seconds:10.2f}")


if __name__ == "__main__":
    main()
