"""``lowbit quantize``'s directories: a float model to read, an output to replace as a whole."""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..serialization.container import HEADER_NAME, METADATA_KEY, WEIGHTS_NAME
from .common import UsageError


def check_model_dir(model_dir: Path) -> None:
    """Raise unless ``model_dir`` is a transformers model directory holding a float model."""
    config_json = model_dir / "config.json"
    if not config_json.is_file():
        what = "has no config.json" if model_dir.is_dir() else "does not exist"
        raise FileNotFoundError(f"MODEL_DIR must be a transformers model directory (config.json + weights); {model_dir} {what}")
    quantized = _quantized_by(model_dir, config_json)
    if quantized:
        raise ValueError(f"MODEL_DIR must hold a float model; {model_dir} is {quantized}: quantize the original float "
                         f"model instead (lowbit.load_pretrained loads a lowbit checkpoint as it is)")


def _quantized_by(model_dir: Path, config_json: Path) -> str | None:
    """What says that ``model_dir`` is already quantized, or None."""
    if (model_dir / HEADER_NAME).is_file():
        return f"a lowbit checkpoint (it holds {HEADER_NAME})"
    try:
        config = json.loads(config_json.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{config_json} must be a JSON object; it is not valid JSON ({error})") from None
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    if isinstance(quantization, dict) and "lowbit" in quantization:
        return "a lowbit checkpoint (its config.json has lowbit's quantization_config)"
    if quantization:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization
        return f"already quantized (config.json: quantization_config with quant_method {method!r})"
    weights = model_dir / WEIGHTS_NAME
    if weights.is_file():
        from safetensors import safe_open

        with safe_open(weights, "pt") as file:
            if METADATA_KEY in (file.metadata() or {}):
                return f"a lowbit checkpoint ({WEIGHTS_NAME} has lowbit's header)"
    return None


def check_output(output: Path, model_dir: Path, overwrite: bool) -> None:
    """Raise unless ``output`` can receive the quantized model: a new or empty directory, or (with
    ``overwrite``) one that may be replaced whole."""
    if output.resolve() == model_dir.resolve():
        raise UsageError(f"OUT must differ from MODEL_DIR; received {output} for both")
    if not output.exists():
        return
    if not output.is_dir():
        raise UsageError(f"OUT must be a directory; {output} is a file")
    entries = sorted(p.name for p in output.iterdir())
    if entries and not overwrite:
        shown = ", ".join(entries[:4]) + (f" and {len(entries) - 4} more" if len(entries) > 4 else "")
        raise UsageError(f"OUT {output} is not empty (it holds {shown}); pass --overwrite to replace it "
                         f"(its files are deleted), or name a new directory")
    if overwrite and output.resolve() in model_dir.resolve().parents:
        raise UsageError(f"--overwrite would delete MODEL_DIR {model_dir}, which is inside OUT {output}")


@contextmanager
def replacing(output: Path):
    """Yield a new directory beside ``output`` to write into; when the block ends without an error it
    replaces ``output`` (deleting what was there), otherwise it is deleted and ``output`` is untouched."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    try:
        yield staging
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
