"""The file: a safetensors container whose ``__metadata__["lowbit"]`` holds lowbit's JSON header.

safetensors layout: 8-byte little-endian header length N, N bytes of JSON (per tensor: dtype, shape,
``data_offsets`` into the data section), then the raw little-endian bytes. Reads go through
``readinto`` into preallocated tensors, so loading holds each byte once (no mmap pages, no copies).
Every check here runs before any model is touched.
"""

from __future__ import annotations

import ctypes
import json
import os
import reprlib
import sys
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

FORMAT = "lowbit"
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)  # format 1: config labels and kernel names in the header; 2: specs, no kernels;
# 3: smoothing divisors (SmoothedTensor) on weight-only and dynamic weights
METADATA_KEY = "lowbit"
WEIGHTS_NAME = "model.safetensors"
HEADER_NAME = "lowbit.json"
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def shown(value) -> str:
    """A header value for an error message: its repr, cut short (a file may hold huge or deep values)."""
    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother = 3, 80, 80
    return short.repr(value)


class CheckpointError(ValueError):
    """A checkpoint that lowbit cannot load: corrupt, truncated, of another format or version, or not
    matching the model. The message names the tensor or header field, what was expected and what was
    received; the model being loaded into is left unchanged."""


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of the container: absolute byte range ``[begin, end)`` of the file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Checkpoint:
    """A parsed, validated container: its tensors and lowbit's header."""

    path: Path
    tensors: dict[str, StoredTensor]
    header: dict


def weights_path(path: str | os.PathLike) -> Path:
    """The safetensors file of ``path``: the file itself, or ``model.safetensors`` in a directory."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no lowbit checkpoint at {path}: expected a .safetensors file or a directory "
                                f"holding {WEIGHTS_NAME}, as written by lowbit.save")
    return path


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Parse and validate the container at ``path`` (no tensor data is read).

    Raises:
        FileNotFoundError: nothing to read at ``path``.
        CheckpointError: not safetensors, truncated, without a lowbit header, or of another format version.
    """
    path = weights_path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path} is truncated or not a safetensors file: expected an 8-byte header length, "
                                  f"received a {size}-byte file")
        length = int.from_bytes(prefix, "little")
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise CheckpointError(f"{path} is truncated or not a safetensors file: its header length field says "
                                  f"{length} bytes, but {size - 8} bytes follow it")
        raw = f.read(length)
    try:
        table = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise CheckpointError(f"{path} is corrupt or not a safetensors file: its header is not JSON ({error})") from None
    if not isinstance(table, dict):
        raise CheckpointError(f"{path}: expected a JSON object as safetensors header; received {type(table).__name__}")
    header = _lowbit_header(path, table.pop("__metadata__", None))
    tensors = _stored_tensors(path, table, data_start=8 + length, data_bytes=size - 8 - length)
    return Checkpoint(path, tensors, header)


def _lowbit_header(path: Path, metadata) -> dict:
    if not isinstance(metadata, dict) or METADATA_KEY not in metadata:
        raise CheckpointError(f"{path} is a safetensors file without a lowbit header (__metadata__[{METADATA_KEY!r}]); "
                              f"expected a checkpoint written by lowbit.save")
    try:
        header = json.loads(metadata[METADATA_KEY])
    except (TypeError, json.JSONDecodeError, RecursionError) as error:
        raise CheckpointError(f"{path}: the lowbit header is corrupt, not JSON ({error})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        received = header.get("format") if isinstance(header, dict) else header
        raise CheckpointError(f"{path}: header field 'format': expected {FORMAT!r}; received {shown(received)}")
    version = header.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        hint = "; upgrade lowbit to read it" if type(version) is int and version > FORMAT_VERSION else ""
        raise CheckpointError(f"{path}: header field 'format_version': expected one of {list(READABLE_VERSIONS)} (what "
                              f"this lowbit reads); received {shown(version)}{hint}")
    for key in ("entries", "crc32"):
        if not isinstance(header.get(key), dict):
            raise CheckpointError(f"{path}: header field {key!r}: expected a JSON object; received {shown(header.get(key))}")
    return header


def _stored_tensors(path: Path, table: dict, data_start: int, data_bytes: int) -> dict[str, StoredTensor]:
    tensors = {}
    for name, spec in table.items():
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{path}: tensor {name!r}: expected dtype, shape and data_offsets; received {shown(spec)}")
        dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r}: field 'dtype': expected one of {sorted(DTYPES)}; "
                                  f"received {shown(dtype)}")
        if not _ints(shape) or not _ints(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
            raise CheckpointError(f"{path}: tensor {name!r}: expected a shape and [begin, end] offsets of non-negative "
                                  f"ints; received shape {shown(shape)}, data_offsets {shown(offsets)}")
        nbytes = DTYPES[dtype].itemsize
        for dim in shape:
            nbytes *= dim
        if offsets[1] - offsets[0] != nbytes:
            raise CheckpointError(f"{path}: tensor {name!r}: a {dtype} tensor of shape {shape} takes {nbytes} bytes; "
                                  f"its data_offsets {offsets} span {offsets[1] - offsets[0]}")
        if offsets[1] > data_bytes:
            raise CheckpointError(f"{path} is truncated: tensor {name!r} needs data bytes up to {offsets[1]}, the file "
                                  f"holds {data_bytes}")
        tensors[name] = StoredTensor(name, DTYPES[dtype], tuple(shape), data_start + offsets[0], data_start + offsets[1])
    ordered = sorted(tensors.values(), key=lambda t: (t.begin, t.end))
    for before, after in zip(ordered, ordered[1:]):
        if after.begin < before.end:
            raise CheckpointError(f"{path} is corrupt: tensors {before.name!r} and {after.name!r} overlap")
    return tensors


def _ints(values) -> bool:
    return isinstance(values, list) and all(type(v) is int and v >= 0 for v in values)


class TensorReader:
    """Reads tensors of a checkpoint into new CPU tensors, checking each against its CRC32.

    Example:
        >>> with TensorReader(read_checkpoint("/tmp/mlp.safetensors")) as reader:  # doctest: +SKIP
        ...     bias = reader.read("0.bias")
    """

    def __init__(self, checkpoint: Checkpoint):
        if sys.byteorder != "little":
            raise CheckpointError(f"safetensors data is little-endian; this machine is {sys.byteorder}-endian")
        self.checkpoint = checkpoint
        self.file = open(checkpoint.path, "rb", buffering=0)

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def read(self, name: str) -> torch.Tensor:
        """The tensor ``name`` in its stored dtype and shape.

        Raises:
            CheckpointError: the file ends early or the bytes do not match their checksum.
        """
        stored, path = self.checkpoint.tensors[name], self.checkpoint.path
        data = torch.empty(stored.nbytes, dtype=torch.uint8)
        view = byte_view(data)
        self.file.seek(stored.begin)
        filled = 0
        while filled < stored.nbytes:
            got = self.file.readinto(view[filled:])
            if not got:
                raise CheckpointError(f"{path} is truncated: tensor {name!r} ends at byte {stored.end}, the file at "
                                      f"{stored.begin + filled}")
            filled += got
        expected, received = self.checkpoint.header["crc32"].get(name), zlib.crc32(view)
        if expected != received:
            raise CheckpointError(f"{path} is corrupt: tensor {name!r} has CRC32 {received}, the header expects {expected}")
        return data.view(stored.dtype).reshape(stored.shape)


def byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor as a writable memoryview, without a copy (keep ``t`` alive)."""
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_ubyte * nbytes).from_address(t.data_ptr())).cast("B")


def crc32(t: torch.Tensor) -> int:
    """CRC32 of a contiguous CPU tensor's bytes."""
    return zlib.crc32(byte_view(t))


def write_checkpoint(path: Path, tensors: dict[str, torch.Tensor], header: dict) -> None:
    """Write contiguous CPU ``tensors`` and ``header`` as a safetensors file (tensors ordered by element size,
    so each stays aligned to it), through a temporary file renamed into place: an interrupted save
    leaves no partial file.

    Raises:
        ValueError: a tensor's dtype has no safetensors name.
    """
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    table, offset = {"__metadata__": {METADATA_KEY: json.dumps(header, allow_nan=False, separators=(",", ":"))}}, 0
    for name in order:
        t = tensors[name]
        if t.dtype not in DTYPE_NAMES:
            raise ValueError(f"{name}: safetensors stores {sorted(map(str, DTYPE_NAMES))}; received {t.dtype}")
        nbytes = t.numel() * t.element_size()
        table[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(table, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(len(encoded).to_bytes(8, "little"))
            f.write(encoded)
            for name in order:
                f.write(byte_view(tensors[name]))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
