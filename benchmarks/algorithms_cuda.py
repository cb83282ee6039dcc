"""The weight algorithms on a CUDA device: GPTQ's arithmetic agrees with the CPU's, the block-by-block flow runs on
a CUDA model, its results run on lowbit's CUDA kernels, and what each costs.

Run: python benchmarks/algorithms_cuda.py   (skips with a message where no CUDA device is present)
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn

import lowbit
from lowbit.algorithms.gptq import HessianCollector, gptq_quantize
from lowbit.bench.algorithms import quantize_timed
from lowbit.specs import weight_spec


def gptq_agreement() -> None:
    torch.manual_seed(0)
    x = torch.randn(2048, 2048) @ (torch.randn(2048, 2048) / 45) + 0.3
    w = torch.randn(4096, 2048) * 0.02
    spec = weight_spec("int4", "uint4", 128)
    collector = HessianCollector(2048)
    collector.add(x)
    results = {}
    for device in ("cpu", "cuda"):
        h, weight = collector.hessian.to(device), w.to(device)
        gptq_quantize(weight, h, spec, (1, 128), act_order=True, clip_steps=10)  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        w_hat, _, _ = gptq_quantize(weight, h, spec, (1, 128), act_order=True, clip_steps=10)
        torch.cuda.synchronize()
        results[device] = (w_hat.cpu(), time.perf_counter() - start)
    same = torch.isclose(results["cpu"][0], results["cuda"][0], rtol=1e-5, atol=1e-7).float().mean().item()
    error = {d: (x @ (w - r[0]).t()).pow(2).mean().item() for d, r in results.items()}
    print(f"GPTQ 4096x2048 int4 g128: cpu {results['cpu'][1]:.2f} s, cuda {results['cuda'][1]:.2f} s; values equal "
          f"{same:.4f}; output error cpu {error['cpu']:.4e} cuda {error['cuda']:.4e}")


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class Stack(nn.Module):
    def __init__(self, width=1024, depth=4):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, width)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def flow_on_cuda() -> None:
    torch.manual_seed(0)
    reference = Stack().cuda().eval()
    data = [torch.randn(4, 128, 1024, device="cuda") * torch.linspace(0.1, 3, 1024, device="cuda") for _ in range(8)]
    held_out = torch.randn(4, 128, 1024, device="cuda") * torch.linspace(0.1, 3, 1024, device="cuda")
    with torch.no_grad():
        want = reference(held_out)
    for algorithm in ("rtn", "hqq", "gptq", "awq"):
        import copy

        model, config = copy.deepcopy(reference), lowbit.Int4WeightOnly(group_size=128, algorithm=algorithm)
        torch.cuda.synchronize()
        try:
            seconds = quantize_timed(model, config, data)  # GPTQ's loop synchronizes: its time is the GPU's too
        except Exception as error:  # report and go on: one algorithm's failure must not hide the others'
            print(f"{algorithm}: failed: {type(error).__name__}: {error}")
            continue
        with torch.no_grad():
            got = model(held_out)
        weight = model.blocks[0].up.weight
        kernel = getattr(getattr(weight, "weight", weight), "kernel", "?")
        relative = ((got - want).norm() / want.norm()).item()
        print(f"{algorithm}: quantize {seconds:.2f} s, held-out relative error {relative:.4f}, weight "
              f"{type(weight).__name__} on {weight.device} (kernel {kernel})")


def main() -> None:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    gptq_agreement()
    flow_on_cuda()


if __name__ == "__main__":
    main()
