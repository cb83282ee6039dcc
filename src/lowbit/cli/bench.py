"""``lowbit bench``: the benchmark harness (linear layers, MiniLM end to end, torch.compile, quantize_ cost)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers, parent: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "bench", parents=[parent], help="run the benchmark harness (minutes; --quick for a shorter run)",
        description="Measure every lowbit config against fp32, bf16 and the installed peers (torch.ao, torchao, "
                    "optimum-quanto) in one process; write bench.json and bench.md.",
    )
    parser.add_argument("--quick", action="store_true", help="one linear shape, three M, batch 1 only")
    parser.add_argument("--out", type=Path, default=Path("lowbit-bench"), help="folder for bench.json and bench.md (default: %(default)s)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..bench.harness import run as run_harness

    run_harness(args.quick, args.out, echo=lambda line: print(line, flush=True))
    return 0
