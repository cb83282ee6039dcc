"""``lowbit inspect``: schemes, sizes and a per-layer summary of a checkpoint saved with ``lowbit.save``."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from ..serialization import describe
from .report import table

COLUMNS = [
    ("tensor", lambda r: r["name"], ""),
    ("class", lambda r: r["class"], ""),
    ("scheme", lambda r: r["scheme"], ""),
    ("qtype", lambda r: r["qtype"] or "-", ""),
    ("block", lambda r: "x".join(map(str, r["block_size"])) if r["block_size"] else "-", ""),
    ("shape", lambda r: "x".join(map(str, r["shape"])) or "scalar", ""),
    ("dtype", lambda r: r["dtype"], ""),
    ("KB", lambda r: f"tied to {r['tied_to']}" if r["tied_to"] else f"{r['bytes'] / 1e3:.1f}", ">"),
]


def add_parser(subparsers, parent: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "inspect", parents=[parent], help="summarise a checkpoint saved with lowbit.save",
        description="Print the format, model, schemes and sizes of a lowbit checkpoint and one line per tensor, "
                    "from the file's header (the tensors are not loaded).",
    )
    parser.add_argument("path", type=Path, metavar="PATH", help="a .safetensors file or a directory written by lowbit.save")
    parser.add_argument("--json", action="store_true", help="print lowbit.serialization.describe(PATH) as JSON instead")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    info = describe(args.path)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    totals, model = info["totals"], info["model"] or {}
    dense, stored = totals["dense_bytes"], totals["stored_bytes"]
    specs = Counter(r["spec"] for r in info["tensors"] if r["spec"] and not r["tied_to"])
    print(f"{info['path']}: lowbit checkpoint format {info['format_version']}, written by lowbit {info['lowbit_version']}")
    if model:
        print(f"model: {model.get('class')} ({model.get('module')}), {model.get('dtype')}")
    print(f"tensors: {totals['tensors']} ({totals['quantized']} quantized, {totals['float']} float, {totals['tied']} tied)")
    print(f"size: {stored / 1e6:.2f} MB stored, {dense / 1e6:.2f} MB as dense tensors ({dense / max(stored, 1):.2f}x); "
          f"quantized {totals['quantized_bytes'] / 1e6:.2f} MB, float {totals['float_bytes'] / 1e6:.2f} MB; "
          f"file {totals['file_bytes'] / 1e6:.2f} MB")
    print("schemes: " + ", ".join(f"{scheme} x{count}" for scheme, count in totals["schemes"].items()))
    if specs:
        print("specs: " + "; ".join(f"{spec} x{count}" for spec, count in specs.items()))
    print()
    print(table(info["tensors"], COLUMNS))
    return 0
