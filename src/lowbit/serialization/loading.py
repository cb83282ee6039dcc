"""``lowbit.load``: validate a checkpoint against a model, read it, rebuild and pack, then swap it in.

Everything that can fail (header, names, shapes, dtypes, checksums, rebuilding and packing each tensor)
runs before the model is touched, so after an error the model is exactly as it was. Tensors are read
into fresh allocations of their stored size, so a model built on the meta device never holds float
copies of quantized weights.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import warnings
from dataclasses import dataclass
from itertools import chain

import torch
import torch.nn as nn

from ..modules import QuantizedLinear
from ..specs import QuantSpec
from ..tensors import QuantizedTensor
from .codec import Node, build, check_values, decode, dtype_name, pack
from .container import Checkpoint, CheckpointError, TensorReader, read_checkpoint, shown
from .saving import SPEC_ATTR
from .spec_check import check_spec, read_spec

SWAP_MODULE = "QuantizedLinear"


@dataclass(frozen=True)
class Entry:
    """A validated header entry: a float tensor, a quantized tensor (``node``) or a tie to another entry."""

    name: str
    tensor: str | None = None
    node: Node | None = None
    tied_to: str | None = None
    spec: QuantSpec | None = None
    module: str | None = None


@dataclass(frozen=True)
class Slot:
    """Where a state entry lives in the model: a parameter or buffer, or the weight of a QuantizedLinear."""

    prefix: str
    attr: str
    kind: str  # "parameter", "buffer" or "swapped"
    owner: type  # the module's class
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    requires_grad: bool


def load(model: nn.Module, path: str | os.PathLike, kernel: str = "auto") -> nn.Module:
    """Restore a checkpoint written by :func:`lowbit.save` into ``model`` (in place) and return it.

    ``model`` has the architecture that was saved: a float model, one built on the meta device (then
    nothing float is materialised for quantized weights), or an already quantized one. Quantized weights
    are rebuilt from a whitelist of lowbit classes and packed for this machine's kernels; a saved
    :class:`~lowbit.QuantizedLinear` replaces the ``nn.Linear`` at its place. Tensors load onto the
    device of the model's tensor they replace (the CPU for meta tensors).

    Args:
        model: the model to load into.
        path: a ``.safetensors`` file or a directory written by :func:`lowbit.save`.

    Returns:
        ``model``.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        CheckpointError: the file is corrupt, truncated, of another format or version, has a header
            field of the wrong type, names a class lowbit does not rebuild, holds inner tensors that do
            not fit their scheme (presence, shape, dtype; scales and smoothing divisors finite and
            positive, zero points in range), a spec that is invalid or not the one that made its
            tensor, a kernel that cannot run here, or does not match ``model`` (missing or unexpected tensors, shapes,
            dtypes); ``model`` is unchanged.

    Example:
        >>> import lowbit, torch
        >>> model = lowbit.quantize_(torch.nn.Sequential(torch.nn.Linear(64, 8)), lowbit.Int8WeightOnly())
        >>> path = lowbit.save(model, "/tmp/mlp.safetensors")
        >>> with torch.device("meta"):
        ...     empty = torch.nn.Sequential(torch.nn.Linear(64, 8))
        >>> type(lowbit.load(empty, path)[0].weight).__name__
        'Int8Tensor'
    """
    checkpoint = read_checkpoint(path)
    entries = decode_entries(checkpoint, kernel)
    slots = _slots(model)
    _match(entries, slots, checkpoint)
    with TensorReader(checkpoint) as reader:
        values, swaps = _materialize(entries, slots, reader)
    _commit(model, entries, slots, values, swaps)
    left = [n for n, t in chain(model.named_parameters(), model.named_buffers()) if t.device.type == "meta"]
    if left:
        warnings.warn(f"lowbit.load: {len(left)} tensors are still on the meta device because checkpoints hold no "
                      f"non-persistent buffers: {left[:5]}; build the model with lowbit.serialization.meta_parameters() "
                      f"to keep buffers real", stacklevel=2)
    return model


def decode_entries(checkpoint: Checkpoint, kernel: str = "auto") -> dict[str, Entry]:
    """Validate every header entry against the container (and a quantized entry's spec against its tensor);
    every file tensor must be used exactly once. A format-1 entry's config label is read as text only."""
    raw_entries, stored, claimed, entries = checkpoint.header["entries"], checkpoint.tensors, set(), {}
    version = checkpoint.header["format_version"]
    if not isinstance(kernel, str):
        raise ValueError(f"kernel must be a kernel name such as 'auto'; received {kernel!r}")
    for name, raw in raw_entries.items():
        where = f"tensor {name!r}"
        if not isinstance(raw, dict):
            raise CheckpointError(f"{where}: expected a JSON object as header entry; received {shown(raw)}")
        if "tied_to" in raw:
            target = raw_entries.get(raw["tied_to"]) if isinstance(raw["tied_to"], str) else None
            if set(raw) != {"tied_to"} or not isinstance(target, dict) or "tied_to" in target:
                raise CheckpointError(f"{where}: field 'tied_to': expected the name of a stored entry; received {shown(raw)}")
            entries[name] = Entry(name, tied_to=raw["tied_to"])
        elif raw.get("class") == "float":
            file_name = raw.get("tensor")
            if set(raw) != {"class", "tensor"} or not isinstance(file_name, str) or file_name not in stored or file_name in claimed:
                raise CheckpointError(f"{where}: field 'tensor': expected the name of an unused file tensor; received {shown(raw)}")
            claimed.add(file_name)
            entries[name] = Entry(name, tensor=file_name)
        else:
            module, own, other = raw.get("module"), *(("config", "spec") if version == 1 else ("spec", "config"))
            if other in raw:
                raise CheckpointError(f"{where}: field {other!r} is not part of format {version} (it holds {own!r})")
            if version == 1 and not (raw.get("config") is None or isinstance(raw["config"], str)):
                raise CheckpointError(f"{where}: field 'config': expected a config label or null; received {shown(raw['config'])}")
            if module not in (None, SWAP_MODULE):
                raise CheckpointError(f"{where}: field 'module': expected null or {SWAP_MODULE!r}; received {shown(module)}")
            node = decode(raw, name, stored, claimed, kernel=kernel, version=version)
            spec = None if version == 1 or raw.get("spec") is None else read_spec(raw["spec"], where)
            if spec is not None:
                check_spec(spec, node, where)
            entries[name] = Entry(name, node=node, spec=spec, module=module)
    unused = sorted(set(stored) - claimed)
    if unused:
        raise CheckpointError(f"{checkpoint.path} is corrupt: file tensors {unused[:5]} are not referenced by the lowbit header")
    return entries


def _outer(entry: Entry, entries: dict[str, Entry], checkpoint: Checkpoint) -> tuple[tuple[int, ...], torch.dtype]:
    if entry.tied_to is not None:
        entry = entries[entry.tied_to]
    if entry.node is not None:
        return entry.node.shape, entry.node.dtype
    stored = checkpoint.tensors[entry.tensor]
    return stored.shape, stored.dtype


def _slots(model: nn.Module) -> dict[str, Slot]:
    slots = {}
    for name, value in model.state_dict(keep_vars=True).items():
        prefix, _, attr = name.rpartition(".")
        module = model.get_submodule(prefix)
        if isinstance(module, QuantizedLinear) and attr in module.tensor_names:
            weight = f"{prefix}.weight" if prefix else "weight"
            meta = module.meta
            slots[weight] = Slot(prefix, "weight", "swapped", type(module), tuple(meta["shape"]), meta["dtype"], value.device, False)
        elif isinstance(value, torch.Tensor):
            kind = "parameter" if attr in module._parameters else "buffer"
            slots[name] = Slot(prefix, attr, kind, type(module), tuple(value.shape), value.dtype, value.device, value.requires_grad)
    return slots


def _match(entries: dict[str, Entry], slots: dict[str, Slot], checkpoint: Checkpoint) -> None:
    missing, unexpected = sorted(set(slots) - set(entries)), sorted(set(entries) - set(slots))
    if missing or unexpected:
        raise CheckpointError(f"{checkpoint.path} does not match the model: tensors the model has but the file lacks: "
                              f"{missing[:10]}; tensors the file has but the model lacks: {unexpected[:10]}")
    for name, entry in entries.items():
        slot, (shape, dtype) = slots[name], _outer(entry, entries, checkpoint)
        if (slot.shape, slot.dtype) != (shape, dtype):
            raise CheckpointError(f"tensor {name!r}: the model expects shape {list(slot.shape)} {dtype_name(slot.dtype)}; "
                                  f"the checkpoint holds {list(shape)} {dtype_name(dtype)}")
        source = entries[entry.tied_to] if entry.tied_to is not None else entry
        if source.module == SWAP_MODULE:
            linear = slot.kind == "swapped" or (slot.attr == "weight" and issubclass(slot.owner, nn.Linear))
            if entry.tied_to is not None or not slot.prefix or not linear:
                raise CheckpointError(f"tensor {name!r}: the checkpoint holds the weight of a {SWAP_MODULE}; expected an "
                                      f"nn.Linear or {SWAP_MODULE} at {slot.prefix!r} in the model")
        elif slot.kind == "swapped":
            raise CheckpointError(f"tensor {name!r}: the model holds a {SWAP_MODULE} at {slot.prefix!r}; the checkpoint "
                                  f"stores a plain weight there (load it into the float model)")
        elif source.node is not None and slot.kind != "parameter":
            raise CheckpointError(f"tensor {name!r}: the checkpoint holds a quantized tensor; the model has a buffer there")
        elif entry.tied_to is not None and slots[entry.tied_to].kind != slot.kind:
            raise CheckpointError(f"tensor {name!r} is tied to {entry.tied_to!r} in the checkpoint; the model holds one as "
                                  f"a parameter and the other as a buffer")


def _materialize(entries, slots, reader: TensorReader):
    """New parameters / buffers by entry name, and new QuantizedLinear modules by prefix; entries are read,
    rebuilt and packed one at a time."""
    values, swaps, pending = {}, {}, []
    for name, entry in entries.items():
        slot = slots[name]
        device = torch.device("cpu") if slot.device.type == "meta" else slot.device
        if entry.tied_to is not None:
            continue
        if entry.node is None:
            tensor = reader.read(entry.tensor).to(device)
            values[name] = nn.Parameter(tensor, requires_grad=slot.requires_grad) if slot.kind == "parameter" else tensor
            continue
        inner = {n: reader.read(n) for n in entry.node.file_tensors()}
        check_values(entry.node, inner)
        inner = {n: t.to(device) for n, t in inner.items()}
        try:
            weight = pack(build(entry.node, inner))
        except (RuntimeError, ValueError, TypeError, NotImplementedError) as error:
            raise CheckpointError(f"tensor {name!r}: cannot rebuild {entry.node.cls.__name__} on {device}: {error}") from error
        _release_freed_heap()
        if entry.module == SWAP_MODULE:
            pending.append((slot.prefix, weight))
        else:
            values[name] = nn.Parameter(weight, requires_grad=False)
    for prefix, weight in pending:
        tensors, meta = weight.kernel_inputs()
        out_features, in_features = weight.shape
        layer = QuantizedLinear(in_features, out_features, weight.scheme, tensors, meta, values.get(f"{prefix}.bias"))
        swaps[prefix] = layer
    for name, entry in entries.items():
        if entry.tied_to is not None:
            values[name] = values[entry.tied_to]
    return values, swaps


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    libc = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None


def _release_freed_heap() -> None:
    """Give freed heap pages back to the OS (glibc only). Packing allocates temporaries the size of a
    weight; glibc keeps such freed blocks resident and often cannot reuse them for the next aligned
    allocation, so without this the peak memory of a load grows by a temporary per weight."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _commit(model, entries, slots, values, swaps) -> None:
    """Swap the new tensors and modules in (nothing here can fail on a validated plan)."""
    for prefix, layer in swaps.items():
        parent, _, child = prefix.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    for name, entry in entries.items():
        slot = slots[name]
        module = model.get_submodule(slot.prefix)
        if entry.module == SWAP_MODULE:
            _label(module, entry)
            continue
        table = module._parameters if slot.kind == "parameter" else module._buffers
        table[slot.attr] = values[name]
        if isinstance(values[name], QuantizedTensor):
            _label(module, entries[entry.tied_to or name])


def _label(module: nn.Module, entry: Entry) -> None:
    if entry.spec is not None:
        setattr(module, SPEC_ATTR, entry.spec)
