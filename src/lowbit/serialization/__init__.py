"""Safe save/load: safetensors plus a JSON header in its metadata; no pickle, no code from files.

Example:
    >>> import lowbit, torch
    >>> model = lowbit.quantize_(torch.nn.Sequential(torch.nn.Linear(64, 8)), lowbit.Int8WeightOnly())
    >>> path = lowbit.save(model, "/tmp/mlp.safetensors")
    >>> _ = lowbit.load(torch.nn.Sequential(torch.nn.Linear(64, 8)), path)
"""

from .container import FORMAT_VERSION, CheckpointError
from .loading import load
from .pretrained import load_pretrained, meta_parameters
from .saving import save
from .summary import describe

__all__ = ["FORMAT_VERSION", "CheckpointError", "describe", "load", "load_pretrained", "meta_parameters", "save"]
