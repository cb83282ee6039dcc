"""(h) CUDA: linear layers 4096x4096 and 4096x11008 at M = 1, 32, 512 on the GPU, the bf16 layer against every
lowbit config with a CUDA kernel (quantized from the bf16 layer, static ones calibrated on random rows; bf16
activations), as ratios to bf16 from
interleaved rounds. Each timed call ends in ``torch.cuda.synchronize()``, so it measures the GPU's work, not
its launch. Without a GPU the section reports that none was present."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

import lowbit
from lowbit.kernels.registry import select_kernel
from lowbit.tensors import QuantizedTensor

from .linear import sqnr_db
from .profiles import Echo, Profile
from .timing import Timed, interleaved_ms
from .variants import lowbit_quantize

SHAPES = ((4096, 4096), (4096, 11008))  # (in, out)
ROWS = (1, 32, 512)
CONFIGS = [lowbit.Int8WeightOnly(), lowbit.Int8DynamicActivation(), lowbit.Int4WeightOnly(), lowbit.Float8DynamicActivation(),
           lowbit.StaticInt8(), lowbit.StaticFloat8()]
NO_GPU = "no GPU on this machine"


def synchronized(fn, device: torch.device):
    """``fn`` followed, on a GPU, by a wait for its queued work."""

    def call():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return call


def gpu() -> str:
    """The GPU's name, compute capability and the torch version."""
    major, minor = torch.cuda.get_device_capability()
    return f"{torch.cuda.get_device_name()} (compute capability {major}.{minor}), torch {torch.__version__}"


def bench_cuda(profile: Profile, echo: Echo) -> dict:
    """``{"device": GPU description or None, "rows": [...]}`` (rows from :func:`measure` on the GPU)."""
    if not torch.cuda.is_available():
        echo(f"cuda: {NO_GPU}")
        return {"device": None, "rows": []}
    return {"device": gpu(), "rows": measure(profile, echo, torch.device("cuda"))}


def measure(profile: Profile, echo: Echo, device: torch.device) -> list[dict]:
    """Per shape, M and method on ``device``: the time, its spread, the ratio to bf16, the SQNR against the bf16
    layer and the kernel ``auto`` ran."""
    rows = []
    for in_f, out_f in SHAPES:
        torch.manual_seed(0)
        base = nn.Sequential(nn.Linear(in_f, out_f, bias=False)).to(device, torch.bfloat16).eval()
        calibration = [torch.randn(64, in_f, device=device, dtype=torch.bfloat16) for _ in range(2)]
        models = {"bf16": base, **{f"lowbit {c.label()}": lowbit_quantize(copy.deepcopy(base), c, calibration) for c in CONFIGS}}
        for m in ROWS:
            x = torch.randn(m, in_f, device=device, dtype=torch.bfloat16)
            calls = {name: Timed(synchronized(lambda model=model: model(x), device)) for name, model in models.items()}
            timings = interleaved_ms(calls, rounds=profile.rounds, target_s=profile.target_s)
            with torch.inference_mode():
                expected = base(x)
                for name, model in models.items():
                    t = timings[name]
                    row = dict(shape=f"{in_f}x{out_f}", rows=m, method=name, ms=t.ms, spread=t.spread,
                               speedup_bf16=timings["bf16"].ms / t.ms, sqnr_db=sqnr_db(model(x), expected),
                               kernel=_kernel(model[0], x))
                    rows.append(row)
                    echo(f"cuda linear {in_f}x{out_f} M={m:<4} {name:<42} {t.ms:8.4f} ms ±{100 * t.spread:3.0f}% "
                         f"{row['speedup_bf16']:6.2f}x bf16  kernel {row['kernel']}")
        del models
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _kernel(model: nn.Linear, x: torch.Tensor) -> str:
    """The kernel ``auto`` picks for ``model``'s weight and ``x`` ("-" for the float layer)."""
    weight = model.weight
    if not isinstance(weight, QuantizedTensor):
        return "-"
    meta = weight.kernel_inputs()[1]
    return select_kernel("linear", weight.scheme, x.device.type, weight.kernel, meta).name


def cuda_markdown(section: dict) -> list[str]:
    """The section's table in bench.md, or the line saying no GPU was present."""
    lines = ["### CUDA linear layers (speed-up vs bf16 on the GPU, SQNR dB vs the bf16 layer)", ""]
    if section["device"] is None:
        return lines + [f"Not measured: {NO_GPU}."]
    rows = section["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    keys = list(dict.fromkeys((r["shape"], r["rows"]) for r in rows))
    cell = {(r["method"], r["shape"], r["rows"]): r for r in rows}
    header = ["method", "kernel", *(f"{s} M={m}" for s, m in keys)]
    body = [[method, next(r["kernel"] for r in rows if r["method"] == method),
             *(f"{cell[(method, *k)]['speedup_bf16']:.2f}x ({cell[(method, *k)]['sqnr_db']:.0f})" for k in keys)]
            for method in methods]
    table = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|", *("| " + " | ".join(r) + " |" for r in body)]
    return lines + [f"GPU: {section['device']}", ""] + table
