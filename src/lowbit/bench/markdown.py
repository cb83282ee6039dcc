"""bench.md: the tables of a benchmark report (``bench.json``), one per section that ran."""

from __future__ import annotations

from .cuda import cuda_markdown
from .timing import BUSY_SPREAD


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|---" * len(header) + "|", *("| " + " | ".join(r) + " |" for r in rows)]


def _linear(rows: list[dict]) -> list[str]:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    keys = list(dict.fromkeys((r["shape"], r["rows"]) for r in rows))
    cell = {(r["method"], r["shape"], r["rows"]): r for r in rows}
    header = ["method", *(f"{s} M={m}" for s, m in keys)]
    lines = ["### Linear layers (speed-up vs bf16, the model a user gets by casting)", ""]
    lines += _table(header, [[method, *(f"{cell[(method, *k)]['speedup_bf16']:.2f}x" if (method, *k) in cell else "-" for k in keys)]
                             for method in methods])
    lines += ["", "### Linear layers (speed-up vs fp32, SQNR dB)", ""]
    lines += _table(header, [[method, *(f"{cell[(method, *k)]['speedup']:.2f}x ({cell[(method, *k)]['sqnr_db']:.0f})"
                                        if (method, *k) in cell else "-" for k in keys)] for method in methods])
    return lines


def _minilm(rows: list[dict]) -> list[str]:
    lines = ["### all-MiniLM-L6-v2, sequence 128", ""]
    lines += _table(["method", "batch", "ms", "spread", "vs bf16", "vs fp32", "cos min", "cos mean"],
                    [[r["method"], str(r["batch"]), f"{r['ms']:.2f}", f"{100 * r['spread']:.0f}%", f"{r['speedup_bf16']:.2f}x",
                      f"{r['speedup']:.2f}x", f"{r['cos_min']:.4f}", f"{r['cos_mean']:.4f}"] for r in rows])
    first = {}
    for r in rows:
        first.setdefault(r["method"], r)
    peers = [r for r in first.values() if r["like"]]
    lines += ["", "### Accuracy on all-MiniLM-L6-v2 (cosine of sentence embeddings vs fp32; peers beside the lowbit config "
              "they compare with)", ""]
    accuracy = []
    for name, r in first.items():
        if r["like"]:
            continue
        label = name.removeprefix("lowbit ")
        same = ", ".join(f"{p['method'].removeprefix('peer ')} {p['cos_min']:.4f}" for p in peers if p["like"] == label)
        accuracy.append([name, f"{r['size_mb']:.1f}", f"{r['cos_min']:.4f}", f"{r['cos_mean']:.4f}", same or "-"])
    return lines + _table(["method", "model MB", "cos min", "cos mean", "peers (cos min)"], accuracy)


def _grad(rows: list[dict]) -> list[str]:
    lines = ["### Grad mode (plain `model(x)`, trainable bias) vs `torch.no_grad`", ""]
    return lines + _table(
        ["model", "size", "method", "no_grad ms", "grad ms", "grad / no_grad", "grad mode vs bf16", "grad mode vs fp32"],
        [[r["model"], r["size"], r["method"], f"{r['no_grad_ms']:.3f}", f"{r['grad_ms']:.3f}", f"{r['grad_ratio']:.2f}",
          f"{r['grad_speedup_bf16']:.2f}x", f"{r['grad_speedup']:.2f}x"] for r in rows])


def _compile(rows: list[dict]) -> list[str]:
    lines = ["### torch.compile vs eager", ""]
    return lines + _table(["model", "method", "size", "eager ms", "compiled ms", "eager / compiled"],
                          [[r["model"], r["method"], r["size"], f"{r['eager_ms']:.3f}", f"{r['compiled_ms']:.3f}",
                            f"{r['ratio']:.2f}x"] for r in rows])


def _compile_bf16(rows: list[dict]) -> list[str]:
    lines = ["### torch.compile on bf16 models: all-MiniLM-L6-v2 (sequence 128), each compiled, against the compiled bf16 model", ""]
    return lines + _table(["method", "batch", "compiled ms", "spread", "vs compiled bf16"],
                          [[r["method"], str(r["batch"]), f"{r['ms']:.2f}", f"±{100 * r['spread']:.0f}%", f"{r['vs_bf16']:.2f}x"]
                           for r in rows])


def _quantize(q: dict) -> list[str]:
    return [f"quantize_ on MiniLM: {q['quantize_s']:.3f} s, peak memory {q['peak_ratio']:.2f}x the float model "
            f"({q['model_mb']:.1f} MB)."]


def _cnn(rows: list[dict]) -> list[str]:
    lines = ["### Digits CNN (Conv-BN-ReLU ResNet-style, BatchNorm folded)", ""]
    return lines + _table(["method", "batch", "ms", "vs bf16", "vs fp32", "top-1"],
                          [[r["method"], str(r["batch"]), f"{r['ms']:.3f}", f"{r['speedup_bf16']:.2f}x", f"{r['speedup']:.2f}x",
                            f"{r['top1']:.2f}%"] for r in rows])


def _kv_cache(rows: list[dict]) -> list[str]:
    lines = ["### KV cache (random-init Llama, bf16; bytes after generate, logits after 40 single-token steps)", ""]
    return lines + _table(["cache", "group", "bytes vs bf16 DynamicCache", "next-token logits cosine vs bf16 cache"],
                          [[f"QuantizedKVCache(qtype={r['qtype']!r})", str(r["group_size"] or "head dim"),
                            f"{r['bytes_ratio']:.3f}x", f"{r['logits_cosine']:.5f}"] for r in rows])


def _intx(rows: list[dict]) -> list[str]:
    linear = [r for r in rows if r["kind"] == "linear"]
    minilm = [r for r in rows if r["kind"] == "minilm"]
    lines = ["### Intx weights: linear at M=1, and MiniLM cosine (round to nearest)", ""]
    lines += _table(["method", "size", "ms", "spread", "vs bf16", "vs fp32", "vs Int4WeightOnly"],
                    [[r["method"], r["size"], f"{r['ms']:.3f}", f"±{100 * r['spread']:.0f}%", f"{r['speedup_bf16']:.2f}x",
                      f"{r['speedup']:.2f}x", f"{r['vs_int4']:.2f}x"] for r in linear])
    return lines + [""] + _table(["config", "bits", "group", "cos min", "cos mean"],
                                 [[r["method"], str(r["bits"]), str(r["group"]), f"{r['cos_min']:.4f}", f"{r['cos_mean']:.4f}"]
                                  for r in minilm])


SECTIONS = {"linear": _linear, "minilm": _minilm, "grad": _grad, "compile": _compile, "compile_bf16": _compile_bf16,
            "quantize": _quantize,
            "cnn": _cnn, "kv_cache": _kv_cache, "intx": _intx, "cuda": cuda_markdown}


def busy_spread(report: dict) -> tuple[str, float]:
    """The largest timing spread of the report and where it was."""
    worst = ("", 0.0)
    for section, rows in report.items():
        for r in rows if isinstance(rows, list) else []:
            if isinstance(r, dict) and r.get("spread", 0.0) > worst[1]:
                worst = (f"{section}: {r['method']}", r["spread"])
    return worst


def markdown(report: dict) -> str:
    lines = [f"Machine: {report['machine']}", "",
             "Times are medians over interleaved rounds (each baseline and candidate take turns in one process); "
             "spread: interquartile range of the rounds relative to the median."]
    where, spread = busy_spread(report)
    if spread > BUSY_SPREAD:
        lines += ["", f"**Warning: the machine was busy** (spread up to {100 * spread:.0f}%, {where}): ratios may be off by that much."]
    if report.get("notes"):
        lines += ["", "Notes:", *(f"- {note}" for note in report["notes"])]
    for key, render in SECTIONS.items():
        if key in report:
            lines += ["", *render(report[key])]
    return "\n".join(lines) + "\n"
