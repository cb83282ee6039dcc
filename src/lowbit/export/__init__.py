"""The export flow: quantize ``torch.export`` graphs with torch.ao / torchao's names, from lowbit configs.

Example:
    >>> import torch, lowbit
    >>> from lowbit.export import X86Quantizer, convert_pt2e, prepare_pt2e
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU()).eval()
    >>> graph = torch.export.export(model, (torch.randn(2, 16),)).module()
    >>> prepared = prepare_pt2e(graph, X86Quantizer().set_global(lowbit.StaticInt8()))
    >>> _ = prepared(torch.randn(32, 16))  # calibrate
    >>> converted = convert_pt2e(prepared)
    >>> tuple(converted(torch.randn(2, 16)).shape)
    (2, 8)
"""

from .annotation import (
    DerivedQuantizationSpec,
    EdgeOrNode,
    FixedQParamsQuantizationSpec,
    QuantizationAnnotation,
    QuantizationSpec,
    QuantizationSpecBase,
    Quantizer,
    SharedQuantizationSpec,
)
from . import lowering  # registers the Inductor pass: torch.compile(converted) runs lowbit's fused int8 kernels
from .convert import convert_pt2e
from .graph_utils import set_train_mode
from .lowering import lower
from .onnx import to_onnx
from .prepare import SmoothingObserver, prepare_pt2e, prepare_qat_pt2e
from .x86_quantizer import X86Quantizer


def move_exported_model_to_eval(model):
    """Put an exported (prepared or converted) graph's dropout, batch norm and observers in eval mode."""
    return set_train_mode(model, False)


def move_exported_model_to_train(model):
    """Put an exported graph's dropout, batch norm and fake quantizers in training mode (graph QAT)."""
    return set_train_mode(model, True)


__all__ = [
    "DerivedQuantizationSpec",
    "EdgeOrNode",
    "FixedQParamsQuantizationSpec",
    "QuantizationAnnotation",
    "QuantizationSpec",
    "QuantizationSpecBase",
    "Quantizer",
    "SharedQuantizationSpec",
    "SmoothingObserver",
    "X86Quantizer",
    "convert_pt2e",
    "lower",
    "lowering",
    "move_exported_model_to_eval",
    "move_exported_model_to_train",
    "prepare_pt2e",
    "prepare_qat_pt2e",
    "to_onnx",
]
