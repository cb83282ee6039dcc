"""The benchmark's CUDA section: ratios to bf16 on a GPU, and a report that none was present elsewhere."""

import json

import pytest
import torch

from lowbit.bench import cuda as cuda_bench
from lowbit.bench import harness
from lowbit.bench.profiles import Profile
from lowbit.kernels import registry

TINY = Profile(linear_shapes=((128, 96),), linear_rows=(1,), grad_shape=(128, 96), grad_rows=(1,), grad_minilm=False,
               minilm_batches=(1,), sentences=8, calibration_sentences=16, compile_shape=(128, 96), compile_rows=(1,),
               compile_minilm_configs=(), cnn_batches=(1,), rounds=2, target_s=0.0)


def test_without_a_gpu_the_section_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    report = harness.run(TINY, tmp_path, echo=lambda line: None, sections=["cuda"])
    assert report["cuda"] == {"device": None, "rows": []}
    assert json.loads((tmp_path / "bench.json").read_text())["cuda"] == report["cuda"]
    assert "Not measured: no GPU on this machine." in (tmp_path / "bench.md").read_text()


def test_the_measurement_times_every_config_against_bf16_at_every_m(monkeypatch):
    """What the section measures on a GPU, run on CPU (the CUDA kernels need a GPU: auto picks CPU ones here)."""
    monkeypatch.setattr(cuda_bench, "SHAPES", ((256, 128),))
    rows = cuda_bench.measure(TINY, lambda line: None, torch.device("cpu"))
    methods = ["bf16", *(f"lowbit {c.label()}" for c in cuda_bench.CONFIGS)]
    assert [(r["method"], r["rows"]) for r in rows] == [(name, m) for m in cuda_bench.ROWS for name in methods]
    assert all(r["speedup_bf16"] > 0 for r in rows)
    assert all(r["kernel"] == "-" and r["speedup_bf16"] == 1.0 for r in rows if r["method"] == "bf16")
    # 4-bit rounding leaves about 20 dB on Gaussian weights (6 dB a bit, less the range's crest factor)
    assert all(r["kernel"] != "-" and 15 < r["sqnr_db"] < float("inf") for r in rows if r["method"] != "bf16")
    lines = cuda_bench.cuda_markdown({"device": "a GPU", "rows": rows})
    assert "GPU: a GPU" in lines and any(line.startswith("| lowbit Int4WeightOnly() |") for line in lines)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_on_a_gpu_the_cuda_kernels_run(tmp_path, monkeypatch):
    monkeypatch.setattr(cuda_bench, "SHAPES", ((256, 128),))
    report = harness.run(TINY, tmp_path, echo=lambda line: None, sections=["cuda"])
    kernels = {r["method"]: r["kernel"] for r in report["cuda"]["rows"]}
    for config in cuda_bench.CONFIGS:
        reason = next(k for k in registry._KERNELS[("linear", config.scheme)] if k.name == "cuda").requires("cuda")
        assert kernels[f"lowbit {config.label()}"] == ("cuda" if reason is None else "reference")
    assert report["cuda"]["device"] in (tmp_path / "bench.md").read_text()
