"""Run the benchmark harness (``lowbit.bench``) and write its results to benchmarks/results.

Run: python benchmarks/bench.py [--quick] [--out DIR]   (the same as ``lowbit bench --out benchmarks/results``)
"""

import sys
from pathlib import Path

from lowbit.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--out", str(Path(__file__).parent / "results"), *sys.argv[1:]]))
