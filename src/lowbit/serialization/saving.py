"""``lowbit.save``: a model's state (quantized tensors in their canonical layout) as safetensors + header."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from ..modules import QuantizedLinear
from ..specs import spec_to_json
from ..version import __version__
from ..tensors import QuantizedTensor
from .codec import dtype_name, encode, swapped_weight
from .container import FORMAT, FORMAT_VERSION, HEADER_NAME, WEIGHTS_NAME, crc32, write_checkpoint

SPEC_ATTR = "lowbit_spec"  # set on a module by quantize_/convert/load: the QuantSpec its weight was quantized with


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Save ``model``'s parameters and persistent buffers without pickle.

    Quantized weights are stored in their canonical layout (no kernel-packed fields, so the file loads
    on any machine) with a JSON header in the safetensors metadata: format and lowbit versions, and per
    tensor its class, scheme, metadata, outer shape and dtype, the file names of its inner tensors, the
    spec it was quantized with and a CRC32 of each stored tensor. Tied parameters are stored once.

    Args:
        model: a float, quantized (tensor subclasses or :class:`~lowbit.QuantizedLinear`) or mixed model.
        path: a ``.safetensors`` file, or a directory that receives ``model.safetensors``,
            ``lowbit.json`` (the header, indented) and, for a Hugging Face model, its ``config.json``
            and ``generation_config.json``; a quantized model's ``config.json`` gets a
            ``quantization_config`` that makes ``transformers``' ``from_pretrained`` refuse the directory.

    Returns:
        The path of the file or directory written.

    Raises:
        ValueError: a tensor cannot be stored (on the meta device, module extra state, a class that is
            not lowbit's).

    Example:
        >>> import lowbit, torch
        >>> model = lowbit.quantize_(torch.nn.Sequential(torch.nn.Linear(64, 8)), lowbit.Int8WeightOnly())
        >>> lowbit.save(model, "/tmp/mlp.safetensors").name
        'mlp.safetensors'
    """
    path = Path(path)
    tensors, header = _collect(model)
    if path.suffix == ".safetensors":
        path.parent.mkdir(parents=True, exist_ok=True)
        write_checkpoint(path, tensors, header)
        return path
    path.mkdir(parents=True, exist_ok=True)
    write_checkpoint(path / WEIGHTS_NAME, tensors, header)
    (path / HEADER_NAME).write_text(json.dumps(header, indent=2) + "\n")
    quantized = any(entry.get("class", "float") != "float" for entry in header["entries"].values())
    for attr in ("config", "generation_config"):
        hf_config = getattr(model, attr, None)
        if hasattr(hf_config, "save_pretrained"):
            hf_config.save_pretrained(path)
            if attr == "config" and quantized:
                _refuse_transformers_loading(path / "config.json")
    return path


def _refuse_transformers_loading(config_json: Path) -> None:
    """Add a ``quantization_config`` that makes ``transformers``' ``from_pretrained`` raise on this
    directory: it cannot read lowbit's quantized tensors and would return a randomly initialised model.
    (It skips a ``quant_method`` it does not know, with only a log message; a missing one raises.)"""
    config = json.loads(config_json.read_text())
    config["quantization_config"] = {
        "quant_method": None,
        "lowbit": "quantized by lowbit, which transformers cannot load: use lowbit.load_pretrained(directory)",
    }
    config_json.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _collect(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """File tensors by name and the header describing them."""

    entries, files, first, model_dtype = {}, {}, {}, None
    for name, (value, module) in _state(model).items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{name}: lowbit.save stores tensors; received {type(value).__name__} (a module's extra state)")
        if value.device.type == "meta":
            raise ValueError(f"{name} is on the meta device: it holds no data to save")
        if id(value) in first:
            entries[name] = {"tied_to": first[id(value)]}
            continue
        first[id(value)] = name
        if model_dtype is None and value.dtype.is_floating_point:
            model_dtype = dtype_name(value.dtype)
        if isinstance(value, QuantizedTensor):
            entry = encode(value, name, files)
            spec = getattr(module, SPEC_ATTR, None)
            entry["spec"] = None if spec is None else spec_to_json(spec)
            if isinstance(module, QuantizedLinear):
                entry["module"] = "QuantizedLinear"
        else:
            if name in files:
                raise ValueError(f"{name}: the name is taken by an inner tensor of another entry")
            files[name] = value
            entry = {"class": "float", "tensor": name}
        entries[name] = entry
    files = _on_cpu(files)
    header = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "lowbit_version": __version__,
        "model": {"class": type(model).__name__, "module": type(model).__module__, "dtype": model_dtype},
        "entries": entries, "crc32": {name: crc32(t) for name, t in files.items()},
    }
    return files, header


def _state(model: nn.Module) -> dict[str, tuple[object, nn.Module]]:
    """``state_dict`` entries (the objects themselves) with their owning module; the buffers of a
    QuantizedLinear become one ``<fqn>.weight`` tensor subclass."""
    state, out = model.state_dict(keep_vars=True), {}
    for name, value in state.items():
        prefix, _, attr = name.rpartition(".")
        module = model.get_submodule(prefix)
        if isinstance(module, QuantizedLinear) and attr in module.tensor_names:
            weight = f"{prefix}.weight" if prefix else "weight"
            if weight not in out:
                out[weight] = (swapped_weight(module), module)
            continue
        out[name] = (value, module)
    return out


def _on_cpu(files: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().to("cpu").contiguous() for name, t in files.items()}
