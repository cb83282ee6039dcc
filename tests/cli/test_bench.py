"""The benchmark harness (``lowbit bench``): interleaved timing, grad modes, and every table from a tiny run."""

import json
from types import SimpleNamespace

import pytest
import torch

from lowbit.bench import harness, timing
from lowbit.bench.markdown import markdown
from lowbit.bench.profiles import Profile
from lowbit.bench.timing import Timed, interleaved_ms
from lowbit.bench.variants import DEFAULT_CONFIGS

TINY = Profile(linear_shapes=((128, 96),), linear_rows=(1, 16), grad_shape=(128, 96), grad_rows=(1, 32), grad_minilm=False,
               minilm_batches=(1,), sentences=8, calibration_sentences=16, compile_shape=(128, 96), compile_rows=(1,), compile_minilm_configs=(),
               cnn_batches=(1,), rounds=2, target_s=0.0)


def test_rounds_interleave_the_callables_in_a_rotating_order():
    calls = []
    timings = interleaved_ms({name: (lambda name=name: calls.append(name)) for name in "abc"}, rounds=3, target_s=0.0, warmup=1)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")  # warm-up, then one call each per round
    assert all(len(t.rounds) == 3 for t in timings.values())


def test_each_callable_runs_in_its_grad_mode():
    seen = {}

    def probe(mode):
        return lambda: seen.setdefault(mode, (torch.is_grad_enabled(), torch.is_inference_mode_enabled()))

    with torch.no_grad():  # the caller's mode does not leak into "grad"
        interleaved_ms({mode: Timed(probe(mode), mode) for mode in ("grad", "no_grad", "inference")}, rounds=1)
    assert seen == {"grad": (True, False), "no_grad": (False, False), "inference": (False, True)}
    with pytest.raises(ValueError, match="mode must be one of"):
        Timed(lambda: None, "eval")


def test_the_spread_shows_rounds_slowed_by_other_load(monkeypatch):
    clock, rounds = [0.0], iter(range(100))
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: clock[0]))  # a clock only the calls advance

    def advance(seconds):
        clock[0] += seconds

    def bursty():  # every other round is slowed down 5 ms, as by another process taking the core
        advance(0.005 if next(rounds) % 2 else 0.0)

    timings = interleaved_ms({"steady": lambda: advance(0.001), "bursty": bursty}, rounds=8, target_s=0.0, warmup=1)
    assert timings["bursty"].spread > 1.0  # the interquartile range spans the 0 and 5 ms rounds
    assert timings["steady"].spread < 1e-9 and timings["steady"].ms == pytest.approx(1.0)  # up to the clock sums' rounding


def test_a_tiny_run_writes_every_table(tmp_path):
    report = harness.run(TINY, tmp_path, echo=lambda line: None, sections=["linear", "grad", "cnn", "kv_cache"])
    assert json.loads((tmp_path / "bench.json").read_text()) == json.loads(json.dumps(report))
    linear = {(r["method"], r["rows"]) for r in report["linear"]}
    assert {("fp32", 1), ("bf16", 16), ("lowbit Int8WeightOnly()", 1), ("peer torch.ao quantize_dynamic (fbgemm)", 16)} <= linear
    assert all(r["speedup"] > 0 and r["speedup_bf16"] > 0 for r in report["linear"])
    bf16_rows = {r["method"]: r for r in report["linear"] if r["method"].endswith(" on bf16")}  # int8-mixed-bf16 rows
    assert {f"lowbit {config.label()} on bf16" for config in DEFAULT_CONFIGS} == set(bf16_rows)
    assert all(r["sqnr_db"] > 10 for r in bf16_rows.values())
    grad = {(r["method"], r["size"]): r for r in report["grad"]}
    for config in DEFAULT_CONFIGS:  # every config at every M, grad mode against no_grad
        for m in TINY.grad_rows:
            row = grad[(f"lowbit {config.label()}", f"M={m}")]
            assert row["grad_ratio"] == pytest.approx(row["grad_ms"] / row["no_grad_ms"])
    assert {r["method"] for r in report["cnn"]} == {"fp32", "bf16", "lowbit StaticInt8()", "lowbit StaticFloat8()"}
    assert [r["qtype"] for r in report["kv_cache"]] == ["int4", "int8", "float8_e4m3fn"]
    assert all(0.25 < r["bytes_ratio"] < 0.55 and r["logits_cosine"] > 0.99 for r in report["kv_cache"])
    text = (tmp_path / "bench.md").read_text()
    titles = ("speed-up vs bf16", "speed-up vs fp32", "Grad mode", "Digits CNN", "KV cache")
    assert sorted(titles, key=text.index) == list(titles)  # in this order: bf16 leads


def test_the_minilm_section_measures_the_extra_configs_and_the_peers_beside_lowbit(tmp_path):
    report = harness.run(TINY, tmp_path, echo=lambda line: None, sections=["minilm"])
    rows = {r["method"]: r for r in report["minilm"]}
    for extra in ("Int4WeightOnly(group_size=32)", "Int8DynamicActivation(act_symmetric=True)", "StaticInt8(smoothing=None)"):
        assert rows[f"lowbit {extra}"]["cos_min"] > 0.8
    fbgemm = rows["peer torch.ao quantize_dynamic (fbgemm)"]
    assert fbgemm["like"] == "Int8DynamicActivation()" and fbgemm["size_mb"] is None
    int8 = rows["lowbit Int8WeightOnly()"]
    assert int8["size_mb"] < 0.7 * rows["fp32"]["size_mb"] and int8["speedup_bf16"] > 0
    text = (tmp_path / "bench.md").read_text()
    dynamic = next(line for line in text.splitlines() if line.startswith("| lowbit Int8DynamicActivation() |") and "MB" not in line
                   and line.count("|") == 6)
    assert f"torch.ao quantize_dynamic (fbgemm) {fbgemm['cos_min']:.4f}" in dynamic
    assert any(line.startswith("| lowbit StaticInt8(smoothing=None) | ") and line.count("|") == 6 for line in text.splitlines())
