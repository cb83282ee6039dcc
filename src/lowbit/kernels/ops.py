"""lowbit's custom ops: each fused kernel call is one ``torch.library`` op, so torch.compile and
torch.export see a single node with a fake (shape-only) implementation.

Entering a Python custom op through the dispatcher costs about 10-15 us a call, as much as a
small GEMV. In plain eager mode (not compiling, no dispatch or function mode active, every tensor
argument a plain ``torch.Tensor`` or ``nn.Parameter``) :func:`custom_op`'s wrapper calls the implementation directly;
anything else (tracing, fake tensors, subclasses) goes through the registered op.
"""

from __future__ import annotations

import functools

import torch


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def plain_eager(args) -> bool:
    """True when ``args`` are being run eagerly on plain tensors, with nothing tracing them."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    return all(type(a) in _PLAIN for a in args if isinstance(a, torch.Tensor))


def custom_op(name: str):
    """Register ``fn`` as the op ``name`` (no mutated inputs) and return a caller that skips the
    dispatcher in plain eager mode. The caller takes positional arguments; ``.register_fake`` and
    ``.op`` reach the registered op."""

    def wrap(fn):
        op = torch.library.custom_op(name, mutates_args=())(fn)

        @functools.wraps(fn)
        def call(*args):
            return fn(*args) if plain_eager(args) else op(*args)

        call.register_fake = op.register_fake
        call.op = op
        return call

    return wrap
