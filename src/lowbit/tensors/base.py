"""A small declarative base for quantized tensor subclasses.

A subclass declares its inner tensors and metadata once::

    class MyTensor(QuantizedTensor):
        tensor_names = ("qdata", "scale")
        optional_tensor_names = ("zero_point",)
        meta_names = ("block_size", "qtype")

and gets construction, ``__tensor_flatten__``/``__tensor_unflatten__`` (torch.compile, export),
``fields()``/``meta``, deepcopy and pickling. Each class owns two op tables filled with
``implements`` (ATen ops, seen in ``__torch_dispatch__``) and ``implements_function`` (torch
functions such as ``F.linear``, seen in ``__torch_function__``). Lookups walk the class's MRO; a
miss raises NotImplementedError naming the op and the class: nothing dequantizes silently.
"""

from __future__ import annotations

import copy
import functools
import hashlib
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch.utils._python_dispatch import return_and_correct_aliasing

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BUILT = "_lowbit_built"  # instance attribute holding what _built() made
_RESOLVED: dict = {}  # (class, table name, op) -> implementation or None, filled by _lookup


class QuantizedTensor(torch.Tensor):
    """Base of lowbit's quantized tensors: a wrapper whose outer dtype is the float it stands for."""

    tensor_names: ClassVar[tuple[str, ...]] = ()
    optional_tensor_names: ClassVar[tuple[str, ...]] = ()
    # required tensors that may be left out while a kernel's packed layout holds their values (see canonical())
    replaceable_names: ClassVar[tuple[str, ...]] = ()
    meta_names: ClassVar[tuple[str, ...]] = ()
    optional_meta_names: ClassVar[tuple[str, ...]] = ()  # a subset of meta_names that defaults to None
    _aten_table: ClassVar[dict]
    _function_table: ClassVar[dict]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._aten_table = {}
        cls._function_table = {}

    @staticmethod
    def __new__(cls, *, shape, dtype, **fields):
        first = next(fields[n] for n in cls.tensor_names + cls.optional_tensor_names if fields.get(n) is not None)
        return torch.Tensor._make_wrapper_subclass(
            cls, tuple(shape), dtype=dtype, device=first.device, requires_grad=False
        )

    def __init__(self, *, shape, dtype, **fields):
        expected = set(self.tensor_names) | set(self.optional_tensor_names) | set(self.meta_names)
        unknown = set(fields) - expected
        missing = ((set(self.tensor_names) | set(self.meta_names)) - set(self.optional_meta_names) - set(fields)
                   - set(self.replaceable_names))
        if unknown or missing:
            raise TypeError(f"{type(self).__name__} got unknown fields {sorted(unknown)}, missing {sorted(missing)}")
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{type(self).__name__} stands for a float tensor; expected one of {_FLOAT_DTYPES}, received {dtype}")
        for name in self.tensor_names + self.optional_tensor_names + self.meta_names:
            setattr(self, name, fields.get(name))

    # -- declared structure ------------------------------------------------------------------
    def fields(self) -> dict[str, torch.Tensor]:
        """Inner tensors by name (optional ones only when present)."""
        names = self.tensor_names + self.optional_tensor_names
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    @property
    def meta(self) -> dict[str, Any]:
        """Metadata by name, plus the outer ``shape`` and ``dtype`` (a fresh dict each time, built once:
        reading ``shape`` and ``dtype`` of a subclass goes through ``__torch_function__``)."""
        return dict(self._built()["meta"])

    def _built(self) -> dict[str, Any]:
        """``meta`` and the ``__tensor_flatten__`` context, built on first use (fields never change)."""
        built = self.__dict__.get(_BUILT)
        if built is None:
            meta = {n: getattr(self, n) for n in self.meta_names}
            meta.update(shape=tuple(self.shape), dtype=self.dtype)
            context = (tuple(meta[n] for n in self.meta_names), meta["shape"], meta["dtype"])
            built = self.__dict__[_BUILT] = {"meta": meta, "context": context}
        return built

    def rebuild(self, **changes) -> "QuantizedTensor":
        """A new instance of the same class with some fields, metadata, shape or dtype replaced."""
        args = {**self.fields(), **{n: getattr(self, n) for n in self.meta_names}}
        args.update(shape=tuple(self.shape), dtype=self.dtype)
        args.update(changes)
        return type(self)(**args)

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor], **changes) -> "QuantizedTensor":
        """Apply ``fn`` to every inner tensor (e.g. ``.to(device)``)."""
        return self.rebuild(**{n: fn(t) for n, t in self.fields().items()}, **changes)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The plain float tensor this stands for (in ``self.dtype`` unless ``dtype`` is given)."""
        raise NotImplementedError(f"{type(self).__name__} must implement dequantize()")

    def __tensor_flatten__(self):
        return list(self.fields()), self._built()["context"]

    @classmethod
    def __tensor_unflatten__(cls, inner_tensors, ctx, outer_size, outer_stride):
        meta, shape, dtype = ctx
        return cls(**inner_tensors, **dict(zip(cls.meta_names, meta)), shape=shape, dtype=dtype)

    def _stable_hash_for_caching(self) -> str:
        """Key for torch.compile's AOT autograd cache: lowbit's code, class, metadata and inner tensor
        layouts (the code is part of the key because our ops run inside the cached graph)."""
        parts = [code_fingerprint(), type(self).__qualname__, repr(self.meta)]
        for name, t in self.fields().items():
            inner = t._stable_hash_for_caching() if isinstance(t, QuantizedTensor) else (t.dtype, tuple(t.shape), t.stride(), t.device.type)
            parts.append(f"{name}:{inner}")
        return hashlib.blake2b("|".join(parts).encode(), digest_size=16).hexdigest()

    def __repr__(self):
        meta = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.meta_names)
        return f"{type(self).__name__}(shape={tuple(self.shape)}, dtype={self.dtype}, {meta})"

    def copied(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "QuantizedTensor":
        """A copy with ``fn`` applied to the inner tensors (subclasses holding opaque kernel layouts
        override this to copy their canonical tensors and pack again)."""
        return self.map_tensors(fn)

    def extra_state(self) -> dict[str, Any]:
        """Attributes beyond the declared ones, e.g. nn.Parameter's ``_is_param`` flag."""
        names = set(self.tensor_names + self.optional_tensor_names + self.meta_names) | {_BUILT}
        return {k: v for k, v in self.__dict__.items() if k not in names}

    def __deepcopy__(self, memo):
        new = self.copied(lambda t: copy.deepcopy(t, memo))
        new.__dict__.update(copy.deepcopy(self.extra_state(), memo))
        memo[id(self)] = new
        return new

    def __reduce_ex__(self, protocol):
        meta = {n: getattr(self, n) for n in self.meta_names}
        return _rebuild, (type(self), self.fields(), meta, tuple(self.shape), self.dtype, self.extra_state())

    # -- op tables ---------------------------------------------------------------------------
    @classmethod
    def implements(cls, ops) -> Callable:
        """Register ``impl(func, args, kwargs)`` for ATen ops on this class (and its subclasses)."""
        ops = ops if isinstance(ops, (list, tuple)) else [ops]

        def wrap(impl):
            for op in ops:
                cls._aten_table[op] = impl
            _RESOLVED.clear()
            return impl

        return wrap

    @classmethod
    def implements_function(cls, funcs) -> Callable:
        """Register ``impl(*args, **kwargs)`` for torch functions (``F.linear``) on this class."""
        funcs = funcs if isinstance(funcs, (list, tuple)) else [funcs]

        def wrap(impl):
            for func in funcs:
                cls._function_table[func] = impl
            _RESOLVED.clear()
            return impl

        return wrap

    @classmethod
    def _lookup(cls, table_name: str, op):
        key = (cls, table_name, op)
        if key not in _RESOLVED:
            tables = (klass.__dict__.get(table_name) for klass in cls.__mro__)
            _RESOLVED[key] = next((table[op] for table in tables if table is not None and op in table), None)
        return _RESOLVED[key]

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        impl = cls._lookup("_aten_table", func)
        if impl is None:
            raise NotImplementedError(
                f"{cls.__name__} does not implement {func}; call .dequantize() to get a plain tensor "
                f"if a float result is what you want"
            )
        return impl(func, args, kwargs or {})

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        impl = cls._lookup("_function_table", func)
        if impl is not None:
            return impl(*args, **kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """Hash of lowbit's own source files (Python and C), computed once per process."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.blake2b(digest_size=16)
    for path in sorted(root.rglob("*")):
        if path.suffix in (".py", ".c", ".h"):
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _rebuild(cls, tensors, meta, shape, dtype, extra):
    new = cls(**tensors, **meta, shape=shape, dtype=dtype)
    new.__dict__.update(extra)
    return new


def return_view(func, args, kwargs, out):
    """Return a view-op result with the aliasing info torch.compile's functionalization expects."""
    return return_and_correct_aliasing(func, args, kwargs, out)
