"""``lowbit bench``: the benchmark harness (linear layers, MiniLM end to end, grad mode, torch.compile,
quantize_ cost, the digits CNN, the KV cache)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..bench.harness import SECTIONS


def add_parser(subparsers, parent: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "bench", parents=[parent], help="run the benchmark harness (tens of minutes; --quick for a shorter run)",
        description="Measure every lowbit config against fp32, bf16 and the installed peers (torch.ao, torchao, "
                    "optimum-quanto) in one process, baselines and candidates in interleaved rounds, under "
                    "inference_mode and in plain grad mode; write bench.json and bench.md.",
    )
    parser.add_argument("--quick", action="store_true", help="one linear shape, three M, batch 1 only, fewer rounds")
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), metavar="SECTION",
                        help=f"run only these sections ({', '.join(SECTIONS)}; default: all)")
    parser.add_argument("--out", type=Path, default=Path("lowbit-bench"), help="folder for bench.json and bench.md (default: %(default)s)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..bench.harness import run as run_harness
    from ..bench.profiles import FULL, QUICK

    run_harness(QUICK if args.quick else FULL, args.out, echo=lambda line: print(line, flush=True), sections=args.only)
    return 0
