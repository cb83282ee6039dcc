"""``lowbit quantize``: quantize a local transformers model directory and save it with ``lowbit.save``."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from ..api import quantize_
from ..bench.variants import parameter_megabytes
from ..calibration import calibrate, convert, prepare
from ..configs import NAMED_CONFIGS, STATIC_CONFIGS, config_from_name
from ..specs import WEIGHT_ALGORITHMS
from ..serialization import save
from ..tensors import QuantizedTensor
from .calibration_text import CALIBRATION_SENTENCES, calibration_batches, read_calibration_text
from .common import UsageError, config_name, int_at_least
from .directories import check_model_dir, check_output, replacing

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


def add_parser(subparsers, parent: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "quantize", parents=[parent], help="quantize a local transformers model directory and save it",
        description="Load a transformers model directory (the class named in its config.json), quantize every "
                    "nn.Linear with one config and save it with lowbit.save, copying the tokenizer files along. "
                    "Static configs and data-driven algorithms (gptq, awq, smoothquant) calibrate on the lines of "
                    "--calib-data, or on standard-library sentences. "
                    "The result loads with lowbit.load_pretrained(OUT); transformers' from_pretrained refuses it.",
    )
    parser.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="a directory written by save_pretrained (a float model)")
    parser.add_argument("--config", required=True, type=config_name, metavar="NAME", help=f"one of: {', '.join(NAMED_CONFIGS)}")
    parser.add_argument("--group-size", type=int_at_least(1), metavar="N", help="group size, for the configs that take one")
    parser.add_argument("--algorithm", choices=WEIGHT_ALGORITHMS, metavar="NAME",
                        help="how weights are chosen: rtn (round to nearest, the default), hqq (no data), gptq, awq, "
                             "smoothquant (int8/float8 dynamic activations) from calibration text")
    parser.add_argument("--calib-data", type=Path, metavar="FILE",
                        help=f"UTF-8 text file, one calibration sample per line (static configs and data-driven algorithms; "
                             f"default: {CALIBRATION_SENTENCES} standard-library sentences)")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="OUT", help="output directory (new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it holds files (they are deleted)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from_name(args.config, args.group_size, args.algorithm)
    except ValueError as error:
        raise UsageError(str(error)) from None
    calibrated = isinstance(config, STATIC_CONFIGS) or config.spec().weight.data_driven  # calibrates on text
    if args.calib_data is not None and not calibrated:
        raise UsageError(f"--calib-data is for the static configs (static-int8, static-float8) and the data-driven algorithms "
                         f"(gptq, awq, smoothquant); received {config.label()}")
    check_model_dir(args.model_dir)
    check_output(args.output, args.model_dir, args.overwrite)
    tokenizer_files = [name for name in TOKENIZER_FILES if (args.model_dir / name).is_file()]
    if calibrated and not tokenizer_files:
        raise ValueError(f"{args.config} calibrates on text, but {args.model_dir} has no tokenizer (expected one of "
                         f"{', '.join(TOKENIZER_FILES[:6])}, ...); save one there or use a weight-only config")
    text = read_calibration_text(args.calib_data) if calibrated else None

    model = _load_model(args.model_dir)
    before = parameter_megabytes(model)
    if calibrated:
        from transformers import AutoTokenizer

        embeddings = model.get_input_embeddings()
        vocabulary = getattr(embeddings, "num_embeddings", None)
        batches = calibration_batches(AutoTokenizer.from_pretrained(args.model_dir), text, vocabulary)
        prepare(model, config)
        calibrate(model, batches)
        convert(model)
    else:
        quantize_(model, config)
    with replacing(args.output) as staging:
        save(model, staging)
        for name in tokenizer_files:
            shutil.copy2(args.model_dir / name, staging / name)
    after = parameter_megabytes(model)
    quantized = sum(isinstance(p, QuantizedTensor) for p in model.parameters())
    print(f"{args.model_dir} ({type(model).__name__}, {before:.1f} MB) -> {args.output} with {config.label()}: "
          f"{quantized} weights quantized, {after:.1f} MB ({before / after:.2f}x smaller)")
    return 0


def _load_model(model_dir: Path):
    """The class named by ``config.architectures[0]`` in transformers, else ``AutoModel``; eval mode."""
    import transformers

    model_config = transformers.AutoConfig.from_pretrained(model_dir)
    architecture = (model_config.architectures or [None])[0]
    model_class = getattr(transformers, architecture, None) if architecture else None
    return (model_class or transformers.AutoModel).from_pretrained(model_dir).eval()
