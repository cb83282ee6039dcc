"""lowbit speed and accuracy in one run: fp32, bf16, every lowbit config and installed peers.

(a) Linear layers shaped like LLaMA-7B at M = 1, 8, 32, 128, 512 (SQNR vs the fp32 layer);
(b) all-MiniLM-L6-v2 end to end at batch 1 and 32, sequence 128 (cosine vs fp32 embeddings);
(c) quantize_ time and peak memory on MiniLM;
(d) the digits CNN with static int8/float8 at batch 1, 256 and 1024 (top-1 accuracy).
Every time is a median over repetitions in this one process; ratios are fp32_time / time.

Run: ``lowbit bench [--quick] [--out DIR]`` (or ``python benchmarks/bench.py``, which writes to
benchmarks/results). Progress lines go to the ``echo`` callable the caller passes.
"""

from __future__ import annotations

import copy
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

import lowbit
from lowbit.configs import NAMED_CONFIGS, config_from_name

from .cnn import bench_cnn
from .peers import PEERS

Echo = Callable[[str], None]

LINEAR_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (in_features, out_features)
ROWS = [1, 8, 32, 128, 512]
ALL_CONFIGS = [config_from_name(name) for name in NAMED_CONFIGS]  # one of each, with its defaults
CONFIGS = [c for c in ALL_CONFIGS if not isinstance(c, lowbit.configs.STATIC_CONFIGS)]
# opt-in kernels measured beside the defaults (in the linear and MiniLM tables only)
OPT_IN_CONFIGS = [lowbit.Int8WeightOnly(kernel="onednn"), lowbit.Int8DynamicActivation(kernel="onednn")]
STATIC_CONFIGS = [c for c in ALL_CONFIGS if isinstance(c, lowbit.configs.STATIC_CONFIGS)]


def lowbit_quantize(model, config, calibration):
    """quantize_ for weight-only/dynamic configs; prepare + calibrate + convert for static ones."""
    if isinstance(config, lowbit.configs.STATIC_CONFIGS):
        lowbit.prepare(model, config)
        lowbit.calibrate(model, calibration, progress=False)
        return lowbit.convert(model)
    return lowbit.quantize_(model, config)


def median_ms(fn, budget_s: float = 1.0, min_reps: int = 3, max_reps: int = 50, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in ms after ``warmup`` calls, repeating until ``budget_s`` is spent (bounded)."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times, start = [], time.perf_counter()
        while len(times) < min_reps or (len(times) < max_reps and time.perf_counter() - start < budget_s):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    noise = (out.float() - ref.float()).norm()
    return float("inf") if noise == 0 else float(20 * torch.log10(ref.float().norm() / noise))


def variants(calibration):
    """(name, make(model) -> model) for fp32, bf16, lowbit configs and installed peers."""
    yield "fp32", lambda m: m
    yield "bf16", lambda m: m.to(torch.bfloat16)
    for config in CONFIGS + OPT_IN_CONFIGS + STATIC_CONFIGS:
        yield f"lowbit {config.label()}", lambda m, c=config: lowbit_quantize(m, c, calibration)
    for name, make in PEERS():
        yield name, make


def bench_linears(quick: bool, echo: Echo) -> list[dict]:
    rows_list = [1, 32, 512] if quick else ROWS
    results = []
    for in_f, out_f in LINEAR_SHAPES[1:2] if quick else LINEAR_SHAPES:
        torch.manual_seed(0)
        base = nn.Sequential(nn.Linear(in_f, out_f, bias=False)).eval()
        xs = {m: torch.randn(m, in_f) for m in rows_list}
        with torch.inference_mode():
            refs = {m: base(x) for m, x in xs.items()}
        fp32_ms = {}
        for name, make in variants([torch.randn(64, in_f) for _ in range(4)]):
            model = make(copy.deepcopy(base))
            for m, x in xs.items():
                xin = x.to(torch.bfloat16) if name == "bf16" else x
                ms = median_ms(lambda: model(xin), budget_s=0.5 if quick else 1.0)
                with torch.inference_mode():
                    quality = sqnr_db(model(xin), refs[m])
                fp32_ms.setdefault(m, ms)
                results.append(dict(shape=f"{in_f}x{out_f}", rows=m, method=name, ms=ms, speedup=fp32_ms[m] / ms, sqnr_db=quality))
                echo(f"linear {in_f}x{out_f} M={m:<4} {name:<52} {ms:9.3f} ms {fp32_ms[m] / ms:6.2f}x  SQNR {quality:6.1f} dB")
            del model
            gc.collect()
    return results


def bench_minilm(quick: bool, echo: Echo) -> list[dict]:
    from lowbit.embedded import embed, load_minilm, stdlib_sentences

    base, tokenizer = load_minilm()
    sentences = stdlib_sentences(128 if quick else 256)
    reference = embed(base, tokenizer, sentences)
    text = " ".join(stdlib_sentences(40, offset=256))
    batches = {bs: tokenizer([text] * bs, padding="max_length", truncation=True, max_length=128, return_tensors="pt")
               for bs in ([1] if quick else [1, 32])}
    calibration = stdlib_sentences(128, offset=512)
    calibration = [dict(tokenizer(calibration[i : i + 16], padding=True, truncation=True, max_length=128, return_tensors="pt"))
                   for i in range(0, 128, 16)]
    results, fp32_ms = [], {}
    for name, make in variants(calibration):
        model = make(copy.deepcopy(base))
        cos = (embed(model, tokenizer, sentences) * reference).sum(-1)
        for bs, batch in batches.items():
            ms = median_ms(lambda: model(**batch), budget_s=2.0 if bs == 1 else 4.0)
            fp32_ms.setdefault(bs, ms)
            results.append(dict(batch=bs, method=name, ms=ms, speedup=fp32_ms[bs] / ms,
                                cos_min=float(cos.min()), cos_mean=float(cos.mean())))
            echo(f"MiniLM bs={bs:<3} {name:<52} {ms:9.2f} ms {fp32_ms[bs] / ms:6.2f}x  cos min {cos.min():.4f}")
        del model
        gc.collect()
    return results


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


def bench_compile(quick: bool, echo: Echo) -> list[dict]:
    """torch.compile of each quantized linear (4096 -> 11008) and of quantized MiniLM vs eager mode, with
    the float model (config None) beside them: torch.compile's own per-call cost shows on it too."""
    results = []
    for config in [None, *CONFIGS]:
        torch.manual_seed(0)
        model = _quantized(nn.Sequential(nn.Linear(4096, 11008, bias=False)), config)
        torch._dynamo.reset()
        compiled = torch.compile(model)
        for m in ([1, 128] if quick else [1, 32, 128]):
            x = torch.randn(m, 4096)
            eager_ms = median_ms(lambda: model(x))
            compiled_ms = median_ms(lambda: compiled(x))
            results.append(_compile_row("linear 4096->11008", config, f"M={m}", eager_ms, compiled_ms, echo))
    return results + bench_minilm_compile(quick, echo)


MINILM_COMPILE_CONFIGS = ("int8-dynamic", "int8-weight-only", "int4-weight-only")


def bench_minilm_compile(quick: bool, echo: Echo) -> list[dict]:
    """torch.compile of quantized MiniLM at batch 1 vs the same model in eager mode: on a whole model
    Inductor fuses the float ops around lowbit's kernels, and dynamo's per-call cost is paid once."""
    from lowbit.embedded import load_minilm, stdlib_sentences

    base, tokenizer = load_minilm()
    batch = tokenizer(" ".join(stdlib_sentences(40, offset=256)), padding="max_length", truncation=True, max_length=128,
                      return_tensors="pt")
    results = []
    for config in [None, *map(config_from_name, MINILM_COMPILE_CONFIGS[:1] if quick else MINILM_COMPILE_CONFIGS)]:
        model = _quantized(copy.deepcopy(base), config)
        torch._dynamo.reset()
        compiled = torch.compile(model)
        eager_ms = median_ms(lambda: model(**batch), budget_s=2.0)
        compiled_ms = median_ms(lambda: compiled(**batch), budget_s=2.0)
        results.append(_compile_row("MiniLM", config, "batch 1", eager_ms, compiled_ms, echo))
    return results


def _quantized(model: nn.Module, config) -> nn.Module:
    return model if config is None else lowbit.quantize_(model, config)


def _compile_row(model: str, config, size: str, eager_ms: float, compiled_ms: float, echo: Echo) -> dict:
    label = "fp32" if config is None else config.label()
    echo(f"compile {model:<18} {label:<36} {size:<8} eager {eager_ms:8.3f} ms compiled {compiled_ms:8.3f} ms "
         f"({eager_ms / compiled_ms:.2f}x)")
    return dict(model=model, method=label, size=size, eager_ms=eager_ms, compiled_ms=compiled_ms, ratio=eager_ms / compiled_ms)


def markdown(report: dict) -> str:
    lines = [f"Machine: {report['machine']}", "", "### Linear layers (speed-up vs fp32, SQNR dB)", ""]
    methods = list(dict.fromkeys(r["method"] for r in report["linear"]))
    keys = list(dict.fromkeys((r["shape"], r["rows"]) for r in report["linear"]))
    lines += ["| method | " + " | ".join(f"{s} M={m}" for s, m in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    cell = {(r["method"], r["shape"], r["rows"]): r for r in report["linear"]}
    for method in methods:
        row = [f"{cell[(method, s, m)]['speedup']:.2f}x ({cell[(method, s, m)]['sqnr_db']:.0f})" if (method, s, m) in cell else "-" for s, m in keys]
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    lines += ["", "### all-MiniLM-L6-v2, sequence 128", "", "| method | batch | ms | vs fp32 | cos min | cos mean |", "|---|---|---|---|---|---|"]
    for r in report["minilm"]:
        lines.append(f"| {r['method']} | {r['batch']} | {r['ms']:.2f} | {r['speedup']:.2f}x | {r['cos_min']:.4f} | {r['cos_mean']:.4f} |")
    lines += ["", "### torch.compile vs eager", "", "| model | method | size | eager ms | compiled ms | eager / compiled |",
              "|---|---|---|---|---|---|"]
    for r in report["compile"]:
        lines.append(f"| {r['model']} | {r['method']} | {r['size']} | {r['eager_ms']:.3f} | {r['compiled_ms']:.3f} | {r['ratio']:.2f}x |")
    q = report["quantize"]
    lines += ["", f"quantize_ on MiniLM: {q['quantize_s']:.3f} s, peak memory {q['peak_ratio']:.2f}x the float model ({q['model_mb']:.1f} MB)."]
    lines += ["", "### Digits CNN (Conv-BN-ReLU ResNet-style, BatchNorm folded)", "", "| method | batch | ms | vs fp32 | top-1 |", "|---|---|---|---|---|"]
    for r in report.get("cnn", []):
        lines.append(f"| {r['method']} | {r['batch']} | {r['ms']:.3f} | {r['speedup']:.2f}x | {r['top1']:.2f}% |")
    return "\n".join(lines) + "\n"


def machine() -> str:
    """CPU model, thread count, torch and lowbit versions: the line every report starts with."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, lowbit {lowbit.__version__}"


def run(quick: bool, out: Path, echo: Echo) -> dict:
    """Run every section, write ``out/bench.json`` and ``out/bench.md``, and return the report."""
    report = {"machine": machine()}
    echo(report["machine"])
    report["linear"] = bench_linears(quick, echo)
    report["minilm"] = bench_minilm(quick, echo)
    report["compile"] = bench_compile(quick, echo)
    report["quantize"] = quantize_cost(echo)
    report["cnn"] = bench_cnn(median_ms, echo)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    (out / "bench.md").write_text(markdown(report))
    echo(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return report
