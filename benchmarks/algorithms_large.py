"""Cost of the data-driven algorithms on a model of over 1B parameters, block by block on one CPU.

Run: python benchmarks/algorithms_large.py [--algorithms gptq,awq] [--layers 22] [--tokens 2x256] [--device cpu]

Builds a Llama from a ``transformers`` config the size of TinyLlama-1.1B (hidden 2048, MLP 5632, 22 layers, GQA 32/4
heads, vocabulary 32000) with random weights (cost does not depend on the values), then runs
``prepare`` / ``calibrate`` / ``convert`` with ``Int4WeightOnly(group_size=128, algorithm=...)`` on random token
batches. Prints the wall time of each step, the peak resident memory of the process (``ru_maxrss``), what the
float model itself holds, and the peak above it: block-by-block calibration must hold one block's inputs and
one layer's statistics, not the activations of the whole model. Each algorithm runs in a fresh process so that
its peak is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_one(algorithm: str, layers: int, batches: int, tokens: int, device: str) -> dict:
    import transformers

    import lowbit

    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
    torch.manual_seed(0)
    start = time.perf_counter()
    model = transformers.LlamaForCausalLM(config).eval().to(device)
    build_s = time.perf_counter() - start
    parameters = sum(p.numel() for p in model.parameters())
    model_mib = _current_rss_mib()
    data = [{"input_ids": torch.randint(0, 32000, (1, tokens), device=device)} for _ in range(batches)]
    quant = lowbit.Int4WeightOnly(group_size=128, algorithm=algorithm)
    start = time.perf_counter()
    lowbit.prepare(model, quant)
    lowbit.calibrate(model, data, progress=True)
    calibrate_s = time.perf_counter() - start
    start = time.perf_counter()
    lowbit.convert(model)
    convert_s = time.perf_counter() - start
    peak = _rss_mib()
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    return {"algorithm": algorithm, "parameters": parameters, "layers": layers, "tokens": batches * tokens,
            "build_s": build_s, "calibrate_s": calibrate_s, "convert_s": convert_s, "model_mib": model_mib,
            "peak_mib": peak, "gpu_peak_mib": gpu_peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", default="gptq,awq")
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--tokens", default="2x256", help="BATCHESxTOKENS of calibration data")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process's algorithm
    args = parser.parse_args()
    batches, tokens = map(int, args.tokens.split("x"))
    if args.one:
        print(json.dumps(run_one(args.one, args.layers, batches, tokens, args.device)))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    print("| algorithm | parameters | calibration tokens | prepare + calibrate | convert | float model RSS | peak RSS | "
          "peak above the model | peak GPU memory |")
    print("|---|---|---|---|---|---|---|---|---|")
    for algorithm in args.algorithms.split(","):
        child = subprocess.run([sys.executable, __file__, "--one", algorithm, "--layers", str(args.layers), "--tokens",
                                args.tokens, "--device", args.device], capture_output=True, text=True)
        if child.returncode:
            print(f"| {algorithm} | failed: {child.stderr.strip().splitlines()[-1]} |")
            continue
        r = json.loads(child.stdout.strip().splitlines()[-1])
        gpu = "—" if r["gpu_peak_mib"] is None else f"{r['gpu_peak_mib']:.0f} MiB"
        print(f"| {algorithm} | {r['parameters'] / 1e9:.2f} B | {r['tokens']} | {r['calibrate_s']:.0f} s | {r['convert_s']:.1f} s "
              f"| {r['model_mib']:.0f} MiB | {r['peak_mib']:.0f} MiB | {r['peak_mib'] - r['model_mib']:.0f} MiB | {gpu} |",
              flush=True)


if __name__ == "__main__":
    main()
