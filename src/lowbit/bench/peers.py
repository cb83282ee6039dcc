"""Peer libraries measured beside lowbit when installed: torch.ao, torchao, optimum-quanto (all optional)."""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn


def _torch_ao(model):
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def _torchao(config_name):
    def make(model):
        import torchao.quantization as tq

        tq.quantize_(model, getattr(tq, config_name)())
        return model

    return make


def _quanto(model):
    from optimum.quanto import freeze, qint8, quantize

    quantize(model, weights=qint8)
    freeze(model)
    return model


def PEERS():
    """(name, make) for every peer importable here."""
    yield "peer torch.ao quantize_dynamic (fbgemm)", _torch_ao
    try:
        import torchao.quantization  # noqa: F401

        yield "peer torchao Int8WeightOnlyConfig", _torchao("Int8WeightOnlyConfig")
        yield "peer torchao Int8DynamicActivationInt8WeightConfig", _torchao("Int8DynamicActivationInt8WeightConfig")
    except Exception:  # not installed, or built for another torch
        pass
    try:
        import optimum.quanto  # noqa: F401

        yield "peer optimum-quanto qint8 weights", _quanto
    except Exception:
        pass
