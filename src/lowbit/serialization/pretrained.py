"""Hugging Face transformers models: rebuild a saved directory's model class from its config, then load."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
import torch.nn as nn

from .codec import FLOAT_DTYPES
from .container import CheckpointError, read_checkpoint, shown
from .loading import load


@contextlib.contextmanager
def meta_parameters():
    """Build modules with every parameter on the meta device and buffers as usual.

    Buffers a model computes at construction (rotary frequencies, position ids) are not stored in
    checkpoints when they are non-persistent, so they have to be real; parameters, which
    :func:`lowbit.load` replaces, take no memory. While active it patches
    ``nn.Module.register_parameter``: do not build models in other threads meanwhile.

    Example:
        >>> with meta_parameters():
        ...     layer = torch.nn.BatchNorm1d(4)
        >>> layer.weight.device.type, layer.running_mean.device.type
        ('meta', 'cpu')
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_pretrained(directory: str | os.PathLike, kernel: str = "auto") -> nn.Module:
    """Rebuild a transformers model saved with :func:`lowbit.save` as a directory, in eval mode.

    The model class recorded in the header is looked up by name in the ``transformers`` module only,
    built from the directory's ``config.json`` with parameters on the meta device, and filled by
    :func:`lowbit.load` with the kernel preference ``kernel``.

    Raises:
        NotADirectoryError: ``directory`` is a file (a single ``.safetensors`` file loads with
            :func:`lowbit.load` into a model you build).
        FileNotFoundError: the directory does not exist or lacks ``model.safetensors`` or ``config.json``.
        CheckpointError: the header names no transformers model class, or the checkpoint is invalid.

    Example:
        >>> model = lowbit.load_pretrained("tiny-llama-int8")  # doctest: +SKIP
        >>> model.generate(input_ids, max_new_tokens=8)  # doctest: +SKIP
    """
    directory = Path(directory)
    if not directory.is_dir():
        expected = "lowbit.load_pretrained expects a directory written by lowbit.save (config.json, model.safetensors)"
        if directory.exists():
            raise NotADirectoryError(f"{expected}; received the file {directory} (a single file loads with "
                                     f"lowbit.load(model, path) into a model you build)")
        raise FileNotFoundError(f"{expected}; {directory} does not exist")
    checkpoint = read_checkpoint(directory)
    info = checkpoint.header.get("model") if isinstance(checkpoint.header.get("model"), dict) else {}
    try:
        import transformers
    except ImportError as error:
        raise ImportError('lowbit.load_pretrained needs transformers: pip install "lowbit[models]"') from error
    name = info.get("class")
    cls = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise CheckpointError(f"{checkpoint.path}: header field 'model.class': expected a model class of the transformers "
                              f"module; received {shown(name)} (build the model yourself and call lowbit.load)")
    dtype = info.get("dtype")
    if not isinstance(dtype, str) or dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{checkpoint.path}: header field 'model.dtype': expected one of {sorted(FLOAT_DTYPES)}; "
                              f"received {shown(dtype)}")
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} has no config.json: expected a directory saved by lowbit.save from a "
                                f"transformers model")
    config = cls.config_class.from_pretrained(directory)
    with meta_parameters(), _default_dtype(FLOAT_DTYPES[dtype]):
        model = cls(config)
    if (directory / "generation_config.json").is_file() and getattr(model, "generation_config", None) is not None:
        model.generation_config = transformers.GenerationConfig.from_pretrained(directory)
    return load(model, directory, kernel=kernel).eval()
