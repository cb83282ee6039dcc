"""Running calibration data through a model one block at a time.

A block is one layer of the model's largest stack (an ``nn.ModuleList`` whose every entry holds layers to
quantize: a transformer's layers). The inputs of the first block are captured by running the model up to it;
then each block in turn runs on its inputs (to collect what its layers need), is quantized, and runs again with
its quantized weights to give the next block its inputs. Peak memory is one block's inputs for the calibration
batches plus one layer's statistics, never the activations of the whole model. Layers outside the stack (a
language model's head, a pooler) are handled last, by one more pass of the whole (partly quantized) model.
"""

from __future__ import annotations

import sys
from typing import Any

import torch.nn as nn

CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past")  # per-call caches a captured call must not share


class _Captured(Exception):
    """Raised by the capture hook to stop the model's forward at the first block."""


def call_model(model: nn.Module, batch) -> Any:
    """``model(**batch)`` for a dict, ``model(*batch)`` for a tuple or list, ``model(batch)`` otherwise."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def find_blocks(model: nn.Module, layers: set[int]) -> list[nn.Module]:
    """The entries of the ``nn.ModuleList`` (of two or more) holding the most of ``layers`` (module ids), each entry
    holding some; [] when no stack does."""
    best, best_count = [], 0
    for stack in model.modules():
        if not isinstance(stack, nn.ModuleList) or len(stack) < 2:
            continue
        counts = [sum(id(m) in layers for m in block.modules()) for block in stack]
        if all(counts) and sum(counts) > best_count:
            best, best_count = list(stack), sum(counts)
    return best


def capture_inputs(model: nn.Module, first_block: nn.Module, batches: list) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) ``first_block`` is called with for each batch (the forward stops there). Caches are
    dropped (``use_cache=False``) so that every block call stands alone."""
    captured = []

    def hook(module, args, kwargs):
        kwargs = {k: None if k in CACHE_KWARGS else v for k, v in kwargs.items()}
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        captured.append((args, kwargs))
        raise _Captured

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                call_model(model, batch)
            except _Captured:
                continue
            raise ValueError("the calibration data ran through the model without reaching its first layer block "
                             f"({type(first_block).__name__}); expected every batch to reach it")
    finally:
        handle.remove()
    return captured


def run_block(block: nn.Module, inputs: list[tuple[tuple, dict]]) -> list:
    """``block`` on each captured call; the outputs' hidden states (the first element of a tuple output)."""
    outputs = []
    for args, kwargs in inputs:
        out = block(*args, **kwargs)
        outputs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return outputs


def next_inputs(inputs: list[tuple[tuple, dict]], hidden: list) -> list[tuple[tuple, dict]]:
    """The calls of the next block: the same arguments with the hidden states replaced."""
    calls = []
    for (args, kwargs), h in zip(inputs, hidden):
        if args:
            calls.append(((h, *args[1:]), kwargs))
        else:
            calls.append(((), {**kwargs, "hidden_states": h}))
    return calls


def progress(iterable, total: int | None, enabled: bool, desc: str, unit: str = "block"):
    """A tqdm progress bar on stderr when enabled and tqdm is installed."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr)
