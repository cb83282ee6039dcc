"""lowbit speed and accuracy in one run: fp32, bf16, every lowbit config and installed peers.

(a) ``linear``: linear layers shaped like LLaMA-7B's at M = 1 ... 512 (SQNR vs the fp32 layer);
(b) ``minilm``: all-MiniLM-L6-v2 end to end at batch 1 and 32, sequence 128 (size; cosine vs fp32 embeddings);
(e) ``grad``: grad mode (plain ``model(x)``) vs ``no_grad`` for every config, on a linear and on MiniLM;
(c) ``compile``: torch.compile vs eager; ``compile_bf16``: compiled quantized bf16 MiniLM vs the compiled bf16 model;
``quantize``: quantize_ time and peak memory on MiniLM;
(d) ``cnn``: the digits CNN with static int8/float8 (top-1 accuracy); (f) ``kv_cache``: the quantized KV cache;
(g) ``intx``: 2..7-bit weights, linear speed and MiniLM cosine; (h) ``cuda``: linear layers on the GPU against bf16
(reports that no GPU was present where none is).

Every time is a median over rounds in which the baselines (fp32, bf16) and the candidate take turns
(:mod:`lowbit.bench.timing`), so ratios compare runs made under the same load.

Run: ``lowbit bench [--quick] [--only SECTION ...] [--out DIR]`` (or ``python benchmarks/bench.py``,
which writes to benchmarks/results). Progress lines go to the ``echo`` callable the caller passes.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

import lowbit

from .cnn import bench_cnn
from .compiled import bench_compile, bench_compile_bf16
from .cuda import bench_cuda
from .grad import bench_grad
from .intx import bench_intx
from .kv import bench_kv_cache
from .linear import bench_linears
from .markdown import markdown
from .minilm import bench_minilm
from .profiles import Echo, Profile

QUANTIZE_PROBE = """
import gc, json, time, torch, lowbit
from lowbit.embedded import load_minilm
lowbit.kernels.native.library()  # the one-time build of the native kernels is not part of quantize_
model, _ = load_minilm()
with torch.no_grad():  # page in the float weights (the checkpoint is memory-mapped lazily)
    for p in model.parameters():
        p.sum()
gc.collect()
model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
def status_mb(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) / 1024
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
before = status_mb("VmRSS")
start = time.perf_counter()
lowbit.quantize_(model, lowbit.Int8DynamicActivation())
seconds = time.perf_counter() - start
peak = status_mb("VmHWM")
print(json.dumps(dict(quantize_s=seconds, model_mb=model_mb, peak_added_mb=max(peak - before, 0.0))))
"""


def quantize_cost(echo: Echo) -> dict:
    """quantize_ time on MiniLM and the peak memory it adds, in a fresh process whose peak RSS is
    reset after loading the model."""
    out = subprocess.run([sys.executable, "-c", QUANTIZE_PROBE], capture_output=True, text=True, check=True)
    cost = json.loads(out.stdout.strip().splitlines()[-1])
    cost["peak_ratio"] = (cost["model_mb"] + cost["peak_added_mb"]) / cost["model_mb"]
    echo(f"quantize_ MiniLM: {cost['quantize_s']:.3f} s; peak memory {cost['peak_ratio']:.2f}x the float model")
    return cost


# section -> run(profile, echo, notes); the keys of bench.json, in the order they run
SECTIONS = {
    "linear": bench_linears,
    "minilm": bench_minilm,
    "grad": lambda profile, echo, notes: bench_grad(profile, echo),
    "compile": lambda profile, echo, notes: bench_compile(profile, echo),
    "compile_bf16": lambda profile, echo, notes: bench_compile_bf16(profile, echo),
    "quantize": lambda profile, echo, notes: quantize_cost(echo),
    "cnn": lambda profile, echo, notes: bench_cnn(profile, echo),
    "kv_cache": lambda profile, echo, notes: bench_kv_cache(echo),
    "intx": lambda profile, echo, notes: bench_intx(profile, echo),
    "cuda": lambda profile, echo, notes: bench_cuda(profile, echo),
}


def machine() -> str:
    """CPU model, thread count, torch and lowbit versions: the line every report starts with."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, lowbit {lowbit.__version__}"


def run(profile: Profile, out: Path, echo: Echo, sections: list[str] | None = None) -> dict:
    """Run ``sections`` (default: all of :data:`SECTIONS`), write ``out/bench.json`` and
    ``out/bench.md``, and return the report."""
    unknown = sorted(set(sections or ()) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown benchmark sections {unknown}; expected some of {list(SECTIONS)}")
    report = {"machine": machine(), "notes": []}
    echo(report["machine"])
    for name, section in SECTIONS.items():
        if sections is None or name in sections:
            report[name] = section(profile, echo, report["notes"])
    for note in report["notes"]:
        echo(f"note: {note}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    (out / "bench.md").write_text(markdown(report))
    echo(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return report
