"""lowbit's custom ops: each fused kernel call is one ``torch.library`` op, so torch.compile and
torch.export see a single node with a fake (shape-only) implementation.

Calls stay cheap on both paths. The ops are defined with ``torch.library.Library`` and one
backend-independent kernel, which the dispatcher calls without the extra Python layers of ``torch.library.custom_op``
(compiled graphs call ops through the dispatcher). In plain eager mode (not compiling, no dispatch
or function mode active, every tensor argument a plain ``torch.Tensor`` or ``nn.Parameter``)
:func:`custom_op`'s wrapper skips the dispatcher and calls the implementation directly; anything
else (tracing, fake tensors, subclasses) goes through the registered op.
"""

from __future__ import annotations

import functools

import torch

_LIBRARY = torch.library.Library("lowbit", "FRAGMENT")
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def plain_eager(args) -> bool:
    """True when ``args`` are being run eagerly on plain tensors, with nothing tracing them."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    return all(type(a) in _PLAIN for a in args if isinstance(a, torch.Tensor))


def custom_op(qualname: str):
    """Define ``fn`` as the op ``qualname`` (``"lowbit::name"``, schema from its annotations, no
    mutated inputs) and return a caller that skips the dispatcher in plain eager mode. The caller
    takes positional arguments; ``.register_fake`` registers the op's fake implementation."""
    namespace, name = qualname.split("::")
    if namespace != "lowbit":
        raise ValueError(f"lowbit defines ops in its own namespace; received {qualname!r}")

    def wrap(fn):
        _LIBRARY.define(name + torch.library.infer_schema(fn, mutates_args=()))
        _LIBRARY.impl(name, fn, "CompositeExplicitAutograd")  # CPU and oneDNN (MkldnnCPU) tensors
        op = getattr(torch.ops.lowbit, name).default

        @functools.wraps(fn)
        def call(*args):
            return fn(*args) if plain_eager(args) else op(*args)

        call.register_fake = functools.partial(torch.library.register_fake, qualname, lib=_LIBRARY)
        return call

    return wrap
