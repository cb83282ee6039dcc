"""``lowbit quantize``: quantize a local transformers model directory and save it with ``lowbit.save``."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from ..api import quantize_
from ..calibration import calibrate, convert, prepare
from ..configs import NAMED_CONFIGS, STATIC_CONFIGS, config_from_name
from ..serialization import save
from ..tensors import QuantizedTensor
from .common import UsageError, config_name, int_at_least, parameter_megabytes

CALIBRATION_SENTENCES = 64
CALIBRATION_BATCH = 8
MAX_LENGTH = 128
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


def add_parser(subparsers, parent: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "quantize", parents=[parent], help="quantize a local transformers model directory and save it",
        description="Load a transformers model directory (the class named in its config.json), quantize every "
                    "nn.Linear with one config and save it with lowbit.save, copying the tokenizer files along. "
                    "Static configs calibrate on the lines of --calib-data, or on standard-library sentences.",
    )
    parser.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="a directory written by save_pretrained")
    parser.add_argument("--config", required=True, type=config_name, metavar="NAME", help=f"one of: {', '.join(NAMED_CONFIGS)}")
    parser.add_argument("--group-size", type=int_at_least(1), metavar="N", help="group size, for the configs that take one")
    parser.add_argument("--calib-data", type=Path, metavar="FILE",
                        help=f"text file, one calibration sample per line (static configs; default: {CALIBRATION_SENTENCES} "
                             "standard-library sentences)")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="OUT", help="output directory")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from_name(args.config, args.group_size)
    except ValueError as error:
        raise UsageError(str(error)) from None
    static = isinstance(config, STATIC_CONFIGS)
    if args.calib_data is not None and not static:
        raise UsageError(f"--calib-data is for the static configs (static-int8, static-float8); received --config {args.config}")
    if not (args.model_dir / "config.json").is_file():
        what = "has no config.json" if args.model_dir.is_dir() else "does not exist"
        raise FileNotFoundError(f"MODEL_DIR must be a transformers model directory (config.json + weights); {args.model_dir} {what}")
    if args.output.resolve() == args.model_dir.resolve():
        raise UsageError(f"OUT must differ from MODEL_DIR; received {args.output} for both")
    tokenizer_files = [name for name in TOKENIZER_FILES if (args.model_dir / name).is_file()]
    if static and not tokenizer_files:
        raise ValueError(f"{args.config} calibrates on text, but {args.model_dir} has no tokenizer (expected one of "
                         f"{', '.join(TOKENIZER_FILES[:6])}, ...); save one there or use a weight-only config")
    texts = _calibration_texts(args.calib_data) if static else None

    model = _load_model(args.model_dir)
    before = parameter_megabytes(model)
    if static:
        from transformers import AutoTokenizer

        prepare(model, config)
        calibrate(model, _batches(AutoTokenizer.from_pretrained(args.model_dir), texts))
        convert(model)
    else:
        quantize_(model, config)
    save(model, args.output)
    for name in tokenizer_files:
        shutil.copy2(args.model_dir / name, args.output / name)
    after = parameter_megabytes(model)
    quantized = sum(isinstance(p, QuantizedTensor) for p in model.parameters())
    print(f"{args.model_dir} ({type(model).__name__}, {before:.1f} MB) -> {args.output} with {config.label()}: "
          f"{quantized} weights quantized, {after:.1f} MB ({before / after:.2f}x smaller)")
    return 0


def _calibration_texts(path: Path | None) -> list[str]:
    if path is None:
        from ..embedded import stdlib_sentences

        return stdlib_sentences(CALIBRATION_SENTENCES)
    if not path.is_file():
        raise FileNotFoundError(f"--calib-data must be a text file with one sample per line; {path} does not exist")
    texts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"--calib-data must hold at least one non-empty line; {path} has none")
    return texts


def _load_model(model_dir: Path):
    """The class named by ``config.architectures[0]`` in transformers, else ``AutoModel``; eval mode."""
    import transformers

    model_config = transformers.AutoConfig.from_pretrained(model_dir)
    architecture = (model_config.architectures or [None])[0]
    model_class = getattr(transformers, architecture, None) if architecture else None
    return (model_class or transformers.AutoModel).from_pretrained(model_dir).eval()


def _batches(tokenizer, texts: list[str]) -> list[dict]:
    """Tokenized calibration batches; one text per batch when the tokenizer cannot pad."""
    size = CALIBRATION_BATCH if tokenizer.pad_token is not None else 1
    batches = []
    for start in range(0, len(texts), size):
        encoded = tokenizer(texts[start : start + size], padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        batches.append({key: encoded[key] for key in tokenizer.model_input_names if key in encoded})
    return batches
