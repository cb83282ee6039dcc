"""lowbit's own AVX-512 CPU kernels, compiled on first use with the system C compiler.

The C sources (one per weight scheme, plus ``common.h``) have no PyTorch headers, so the build takes
about a second; the library is cached under ``$LOWBIT_CACHE`` (default ``~/.cache/lowbit``) keyed by
the sources' hash. Kernels that
need it report why when it cannot be had (no AVX-512, no compiler), so ``kernel="auto"`` skips
them and a kernel named explicitly raises.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCES = sorted(Path(__file__).parent.glob("*.c"))
HEADERS = sorted(Path(__file__).parent.glob("*.h"))
REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")
TABLE_DECODE_FLAGS = ("avx512vbmi",)  # lowbit_fp8_gemv_table (compiled for them, called only with them)
_state: dict = {}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the kernel (Linux) reports; empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _build() -> tuple[ctypes.CDLL | None, str | None]:
    if platform.machine() not in ("x86_64", "AMD64"):
        return None, f"needs an x86-64 CPU, this is {platform.machine()}"
    missing = [f for f in REQUIRED_FLAGS if f not in cpu_flags()]
    if missing:
        return None, f"needs CPU features {missing}"
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None, "needs a C compiler (cc or gcc) to build its kernels"
    digest = hashlib.sha256(b"".join(path.name.encode() + path.read_bytes() for path in SOURCES + HEADERS)).hexdigest()[:16]
    cache = Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))
    library = cache / f"lowbit_cpu-{digest}.so"
    if not library.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            target = Path(tmp) / library.name
            command = [compiler, "-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-fopenmp", "-shared", "-fPIC",
                       *map(str, SOURCES), "-o", str(target)]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                return None, f"building its kernels failed: {result.stderr.strip()[-400:]}"
            os.replace(target, library)  # atomic: concurrent builders never see a half-written file
    lib = ctypes.CDLL(str(library))
    i64, ptr, i32, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.lowbit_fp8_gemv.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i32]
    lib.lowbit_fp8_gemv_table.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i32]
    lib.lowbit_fp8_rows_to_bf16.argtypes = [ptr, ptr, i64, i64, i64, i32]
    lib.lowbit_int4_rows_to_bf16.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, i32]
    lib.lowbit_int8_linear_small.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i32, f32, f32, i32, i32]
    lib.lowbit_amx_enable.argtypes = []
    lib.lowbit_amx_enable.restype = ctypes.c_int
    lib.lowbit_quantize_rows_int8.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i32, i32, f32, f32, ptr, i32, i32]
    lib.lowbit_int32_epilogue.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i32, i32, i32]
    lib.lowbit_bf16_epilogue.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i32]
    lib.lowbit_split_rows_16.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i32, i32, i32]
    lib.lowbit_int4_linear_small.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i32]
    lib.lowbit_float8_rows.argtypes = [ptr, ptr, ptr, i64, i64, f32, i32, ptr, i32, i32]
    lib.lowbit_rows_to_bf16.argtypes = [ptr, ptr, ptr, i64, i64, i32, i32]
    lib.lowbit_intx_pack_planes.argtypes = [ptr, ptr, i64, i64, i64, i32, i32]
    lib.lowbit_intx_linear_small.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i32]
    lib.lowbit_intx_rows_to_bf16.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i32]
    lib.lowbit_int8_decode_gemm.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i32, i64, i64, i64, i32]
    lib.lowbit_fp8_decode_gemm.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i32, i64, i64, i64, i32]
    lib.lowbit_int4_decode_gemm.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, i32, i64, i64, i64, i64, i32]
    lib.lowbit_intx_decode_gemm.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, i32, i64, i64, i64, i64, i64, i32]
    for fn in (lib.lowbit_fp8_gemv, lib.lowbit_fp8_rows_to_bf16, lib.lowbit_int4_rows_to_bf16, lib.lowbit_int8_linear_small,
               lib.lowbit_quantize_rows_int8, lib.lowbit_int32_epilogue, lib.lowbit_bf16_epilogue, lib.lowbit_split_rows_16, lib.lowbit_int4_linear_small,
               lib.lowbit_float8_rows, lib.lowbit_fp8_gemv_table, lib.lowbit_rows_to_bf16, lib.lowbit_intx_pack_planes,
               lib.lowbit_intx_linear_small, lib.lowbit_intx_rows_to_bf16, lib.lowbit_int8_decode_gemm,
               lib.lowbit_fp8_decode_gemm, lib.lowbit_int4_decode_gemm, lib.lowbit_intx_decode_gemm):
        fn.restype = None
    return lib, None


def library() -> ctypes.CDLL | None:
    """The compiled library, or None (see :func:`unavailable`)."""
    if "lib" not in _state:
        _state["lib"], _state["reason"] = _build()
    return _state["lib"]


def has_table_decode() -> bool:
    """Whether this CPU runs the float8 GEMV that decodes by byte-table lookup (AVX512-VBMI)."""
    return all(flag in cpu_flags() for flag in TABLE_DECODE_FLAGS)


AMX_FLAGS = ("amx_tile", "amx_int8")


def amx_ready() -> bool:
    """Whether the int8 kernels may use AMX tiles here: the CPU has AMX-INT8 and Linux granted the tile state."""
    if "amx" not in _state:
        lib = library()
        _state["amx"] = lib is not None and all(f in cpu_flags() for f in AMX_FLAGS) and lib.lowbit_amx_enable() == 0
    return _state["amx"]


def unavailable(device_type: str = "cpu") -> str | None:
    """None when the native kernels can run here, else the reason (used as a kernel's ``requires``)."""
    library()
    return _state["reason"]


def unavailable_without(flags: tuple[str, ...], purpose: str, device_type: str = "cpu") -> str | None:
    """:func:`unavailable`, or which of the CPU features ``flags`` (needed for ``purpose``) this CPU lacks."""
    reason = unavailable(device_type)
    missing = [flag for flag in flags if flag not in cpu_flags()]
    if reason is None and missing:
        reason = f"needs CPU features {missing} {purpose}"
    return reason
