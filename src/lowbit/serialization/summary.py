"""``describe``: what a checkpoint holds, from its header alone (for ``lowbit inspect``)."""

from __future__ import annotations

import math
import os
from collections import Counter

import torch

from ..specs import describe_spec
from .codec import dtype_name
from .container import CheckpointError, read_checkpoint, shown
from .loading import decode_entries


def describe(path: str | os.PathLike) -> dict:
    """Summarise a checkpoint (a ``.safetensors`` file or a saved directory) without reading its tensors.

    Returns:
        ``{"path", "format_version", "lowbit_version", "model", "tensors", "totals"}``. ``model`` is the
        header's record (``class``, ``module``, ``dtype``). Each row of ``tensors`` has ``name``,
        ``class`` (``"float"`` for plain tensors), ``scheme``, ``config`` (label or None), ``qtype`` and
        ``block_size`` (None for float), ``shape``, ``dtype`` (outer), ``bytes`` (stored; 0 for a tied
        entry) and ``tied_to``. ``totals`` has counts (``tensors``, ``quantized``, ``float``, ``tied``),
        ``stored_bytes``, ``quantized_bytes``, ``float_bytes``, ``dense_bytes`` (the stored entries as
        dense tensors of their outer dtype), ``file_bytes`` and ``schemes`` (entries per scheme).

    Raises:
        FileNotFoundError: nothing at ``path``.
        CheckpointError: an invalid checkpoint (as :func:`lowbit.load` would reject it).

    Example:
        >>> info = describe("/tmp/mlp.safetensors")  # doctest: +SKIP
        >>> info["tensors"][0]["scheme"], info["totals"]["stored_bytes"]  # doctest: +SKIP
        ('int8', 1064)
    """
    checkpoint = read_checkpoint(path)
    entries, stored = decode_entries(checkpoint), checkpoint.tensors
    rows = []
    for name, entry in entries.items():
        source = entries[entry.tied_to] if entry.tied_to is not None else entry
        node = source.node
        if node is None:
            tensor = stored[source.tensor]
            row = {"class": "float", "scheme": "float", "spec": None, "qtype": None, "block_size": None,
                   "shape": list(tensor.shape), "dtype": dtype_name(tensor.dtype), "bytes": tensor.nbytes}
        else:
            block = node.block
            row = {"class": node.cls.__name__, "scheme": node.scheme, "spec": None if source.spec is None else describe_spec(source.spec),
                   "qtype": block.meta["qtype"], "block_size": list(block.meta["block_size"]), "shape": list(node.shape),
                   "dtype": dtype_name(node.dtype), "bytes": sum(stored[n].nbytes for n in node.file_tensors())}
        if entry.tied_to is not None:
            row["bytes"] = 0
        rows.append({"name": name, **row, "tied_to": entry.tied_to})
    kept = [r for r in rows if r["tied_to"] is None]
    totals = {
        "tensors": len(rows),
        "quantized": sum(r["class"] != "float" for r in kept),
        "float": sum(r["class"] == "float" for r in kept),
        "tied": len(rows) - len(kept),
        "stored_bytes": sum(r["bytes"] for r in kept),
        "quantized_bytes": sum(r["bytes"] for r in kept if r["class"] != "float"),
        "float_bytes": sum(r["bytes"] for r in kept if r["class"] == "float"),
        "dense_bytes": sum(math.prod(r["shape"]) * getattr(torch, r["dtype"]).itemsize for r in kept),
        "file_bytes": checkpoint.path.stat().st_size,
        "schemes": dict(Counter(r["scheme"] for r in kept)),
    }
    header = checkpoint.header
    return {"path": str(checkpoint.path), "format_version": header["format_version"],
            "lowbit_version": _text(header.get("lowbit_version"), "lowbit_version", checkpoint.path),
            "model": _model(header.get("model"), checkpoint.path), "tensors": rows, "totals": totals}


def _text(value, field: str, path) -> str | None:
    if not (value is None or isinstance(value, str)):
        raise CheckpointError(f"{path}: header field {field!r}: expected a string or null; received {shown(value)}")
    return value


def _model(record, path) -> dict | None:
    """The header's model record: null, or an object of strings (or nulls) such as ``class``, ``module``, ``dtype``."""
    if not (record is None or isinstance(record, dict)):
        raise CheckpointError(f"{path}: header field 'model': expected a JSON object or null; received {shown(record)}")
    return None if record is None else {key: _text(value, f"model.{key}", path) for key, value in record.items()}
