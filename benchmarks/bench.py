"""Run the benchmark harness (``lowbit.bench``) and write its results to benchmarks/results.

Run: python benchmarks/bench.py [--quick] [--only SECTION ...]   (the same as ``lowbit bench --out benchmarks/results``)

Every table of BENCHMARKS.md's speed and accuracy sections comes from this run's bench.md: linear layers and
MiniLM against fp32 and bf16 (peers beside them when installed: pip install -c constraints.txt torchao
optimum-quanto), grad mode vs no_grad, torch.compile, quantize_ cost, the digits CNN and the KV cache.
"""

import sys
from pathlib import Path

from lowbit.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--out", str(Path(__file__).parent / "results"), *sys.argv[1:]]))
