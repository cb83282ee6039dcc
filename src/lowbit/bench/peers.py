"""Peer libraries measured beside lowbit when installed: torch.ao (in torch), torchao and optimum-quanto
(optional installs, not lowbit dependencies)."""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn


def _torch_ao(model):
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def _torchao(make_config):
    def make(model):
        import torchao.quantization as tq

        tq.quantize_(model, make_config(tq))
        return model

    return make


def _quanto(model):
    from optimum.quanto import freeze, qint8, quantize

    quantize(model, weights=qint8)
    freeze(model)
    return model


# (peer name, the lowbit config label it is compared with, make(model) -> model). torchao 0.18 on CPU:
# Int4WeightOnlyConfig needs CUDA packing (mslk), so IntxWeightOnlyConfig is its CPU int4 path;
# Float8DynamicActivationFloat8WeightConfig needs CUDA compute capability >= 8.9.
TORCHAO = [
    ("peer torchao Int8WeightOnlyConfig", "Int8WeightOnly()", _torchao(lambda tq: tq.Int8WeightOnlyConfig())),
    ("peer torchao Int8DynamicActivationInt8WeightConfig", "Int8DynamicActivation()",
     _torchao(lambda tq: tq.Int8DynamicActivationInt8WeightConfig())),
    ("peer torchao IntxWeightOnlyConfig(int4, group 128)", "Int4WeightOnly()",
     _torchao(lambda tq: tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=tq.PerGroup(128)))),
    ("peer torchao Float8WeightOnlyConfig", "Float8WeightOnly()", _torchao(lambda tq: tq.Float8WeightOnlyConfig())),
]


def peer_list(notes: list[str]) -> list[tuple[str, str, object]]:
    """(name, like, make) for every peer importable here; a line in ``notes`` for each library that is not."""
    found = [("peer torch.ao quantize_dynamic (fbgemm)", "Int8DynamicActivation()", _torch_ao)]
    for module, label, entries in (("torchao.quantization", "torchao", TORCHAO),
                                   ("optimum.quanto", "optimum-quanto", [("peer optimum-quanto qint8 weights", "Int8WeightOnly()", _quanto)])):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                __import__(module)
        except Exception as error:  # not installed, or built for another torch
            notes.append(f"{label} not measured: import {module} failed ({type(error).__name__}: {error}); "
                         f"pip install -c constraints.txt {label} to add it")
            continue
        found += entries
    return found
