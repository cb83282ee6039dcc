"""QAT's two steps through ``quantize_``: prepare (fake quantizers on every target) and convert (quantized
weights with the fake quantizers' qparams). :class:`QATHandler` is registered for :class:`QATConfig` by
:mod:`lowbit.api`.

A prepared layer keeps its float weight as a parameter (``torch.nn.utils.parametrize`` applies the weight
fake quantizer on every access, so functional uses of ``module.weight`` see it too; a :class:`ConvBn`
applies it to its BN-folded weight itself), gets an ``ActivationFakeQuantizer`` on its input (a forward
pre-hook) for configs that quantize activations, and records the base config (``lowbit_qat``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ..calibration.observers import NotCalibratedError
from ..modules import QuantizedLinear
from ..primitives.affine import check_finite
from ..specs import QuantSpec
from ..targets import (
    ALGORITHM_ATTR, QAT_ATTR, conv_layout, is_conv1d, module_weight, refuse_prepared, select_targets, set_submodule,
    validate_targets,
)
from ..tensors.from_spec import quantize_block, quantize_weight, with_static_activation
from .config import QATConfig
from .conv_bn import ConvBn
from .fake_quantizers import ActivationFakeQuantizer, WeightFakeQuantizer

ACT_ATTR = "lowbit_input_fake_quant"


class QATHandler:
    """``quantize_`` for :class:`QATConfig`: validate every target first, then prepare or convert them all."""

    def targets(self, model, config: QATConfig, filter_fn, module_swap):
        if config.step == "prepare":
            if module_swap:
                raise ValueError("QAT prepares layers in place; module_swap applies to the convert step only")
            base = config.base_config
            if base.spec().weight.data_driven and not _is_static(base.spec()):  # static smoothing trains in QAT
                return _calibrated_targets(model, config, filter_fn)
            refuse_prepared(model, "QAT's prepare step")
            static = _is_static(base.spec())
            per_layer = "static quantization gives each layer its own activation scale" if static else None
            return select_targets(model, filter_fn, base, per_layer, stacklevel=4)
        prepared = [(fqn, m) for fqn, m in model.named_modules() if hasattr(m, QAT_ATTR)]
        if not prepared:
            raise ValueError("no layer is prepared for QAT: run quantize_(model, QATConfig(base_config, step='prepare')) "
                             "and train first")
        return [(fqn, m) for fqn, m in prepared if filter_fn is None or filter_fn(m, fqn)]

    def validate(self, targets, config: QATConfig, module_swap):
        if config.step == "prepare":
            validate_targets(targets, config.base_config, module_swap=False)
            return
        spec = config.base_config.spec()
        for fqn, module in targets:
            prepared = getattr(module, QAT_ATTR)
            if prepared.spec() != spec:
                raise ValueError(f"{fqn!r} was prepared for {prepared.label()}; the convert step received "
                                 f"{config.base_config.label()} (only the kernel may differ)")
        blind = [fqn for fqn, m in targets if _is_static(spec) and not getattr(m, ACT_ATTR).observed]
        if blind:
            raise NotCalibratedError(f"no activation range was observed for {blind[:5]}: run training-mode forward "
                                     f"passes that reach these layers before the convert step")

    def apply(self, model, targets, config: QATConfig, module_swap):
        if config.step == "prepare":
            _prepare(targets, config)
        else:
            _convert(model, targets, config, module_swap)


def _calibrated_targets(model, config: QATConfig, filter_fn):
    """The layers a data-driven algorithm calibrated, for QAT to start from its weights and qparams."""
    base = config.base_config
    algorithm = base.spec().weight.algorithm
    if algorithm != "gptq":
        raise ValueError(f"QAT starts from GPTQ's weights and qparams (and from HQQ's, without data); {algorithm} divides "
                         f"the layers' inputs by factors QAT does not train: received {base.label()}")
    if not config.range_learning:
        raise ValueError(f"QAT from {algorithm} needs range_learning=True: min/max qparams chosen at each step would "
                         f"drop the ones {algorithm} chose")
    layers = [(fqn, m) for fqn, m in model.named_modules() if hasattr(m, ALGORITHM_ATTR)
              and (filter_fn is None or filter_fn(m, fqn))]
    calibrated = [(fqn, m) for fqn, m in layers if getattr(m, ALGORITHM_ATTR).result is not None]
    if not layers or len(calibrated) < len(layers):
        missing = [fqn for fqn, m in layers if (fqn, m) not in calibrated]
        raise ValueError(f"QAT from {algorithm} starts from its results: run lowbit.prepare(model, {base.label()}) and "
                         f"lowbit.calibrate(model, data) first (layers without results: {missing[:5]})")
    for fqn, module in calibrated:
        prepared = getattr(module, ALGORITHM_ATTR).config
        if prepared.spec() != base.spec():
            raise ValueError(f"{fqn!r} was calibrated for {prepared.label()}; QAT's prepare step received {base.label()}")
    return calibrated


def _algorithm_start(module: nn.Module):
    """The float weight (in the module's layout) and (scale, float zero point) a calibrated algorithm's result
    gives QAT to start from; the algorithm's state is removed."""
    result = getattr(module, ALGORITHM_ATTR).result
    delattr(module, ALGORITHM_ATTR)
    linear = result.t() if is_conv1d(module) else result
    block = getattr(linear, "weight", linear).canonical()  # a dynamic config's tensor wraps its weight
    zero_point = None if block.zero_point is None else block.zero_point.float()
    return result.dequantize(), (block.scale.float(), zero_point)


def _is_static(spec: QuantSpec) -> bool:
    return spec.activation is not None and spec.activation.mode == "static"


def _applied_weight(module: nn.Module) -> torch.Tensor:
    """The float weight the layer applies before fake quantization (a ConvBn's BN-folded one), in its stored layout."""
    if isinstance(module, ConvBn):
        return module.folded().weight.detach()
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original.detach()
    return module.weight.detach()


def weight_fake_quantizer(module: nn.Module) -> WeightFakeQuantizer:
    """The weight fake quantizer QAT put on ``module``."""
    if isinstance(module, ConvBn):
        return module.weight_fake_quant
    return module.parametrizations.weight[0]


def _prepare(targets, config: QATConfig) -> None:
    spec = config.base_config.spec()
    shared: dict[int, WeightFakeQuantizer] = {}  # a tied weight gets one fake quantizer
    for fqn, module in targets:
        key = id(module.weight)
        start = None
        if hasattr(module, ALGORITHM_ATTR):  # QAT from a calibrated algorithm: its values and qparams
            values, start = _algorithm_start(module)
            with torch.no_grad():
                module.weight.copy_(values)
        weight = _applied_weight(module)
        layout = conv_layout(module)
        linear = weight.t() if is_conv1d(module) else weight
        block = layout.get("block_size") or spec.weight.block_size(linear.shape)
        smoothed = _is_static(spec) and spec.activation.smoothing is not None and not layout  # linear layers only
        if key not in shared:
            shared[key] = WeightFakeQuantizer(spec.weight, linear, block, range_learning=config.range_learning,
                                              transposed=is_conv1d(module), smoothed=smoothed, initial_qparams=start)
        if isinstance(module, ConvBn):
            module.weight_fake_quant = shared[key]
        else:
            parametrize.register_parametrization(module, "weight", shared[key], unsafe=True)
        if spec.activation is not None:
            channels = linear.shape[1] if smoothed else None
            module.add_module(ACT_ATTR, ActivationFakeQuantizer(spec.activation, range_learning=config.range_learning,
                                                                channels=channels, device=linear.device))
            module.register_forward_pre_hook(_fake_quantize_input)
        setattr(module, QAT_ATTR, config.base_config)


def _fake_quantize_input(module: nn.Module, args):
    quantizer = getattr(module, ACT_ATTR)
    if quantizer.static and quantizer.smoothing_pending:  # once, on the first batch
        weights = weight_fake_quantizer(module)
        float_weight = _applied_weight(module)
        smoothing = quantizer.fix_smoothing(args[0], weights.applied(float_weight))
        weights.set_smoothing(smoothing, float_weight)
    return (quantizer(args[0]),) + tuple(args[1:])


def _convert(model: nn.Module, targets, config: QATConfig, module_swap: bool) -> None:
    base, spec = config.base_config, config.base_config.spec()
    planned, quantized = [], {}
    for fqn, module in targets:  # quantize everything before changing anything
        name = f"{fqn}.weight" if fqn else "weight"
        weights = weight_fake_quantizer(module)
        float_module = module.folded() if isinstance(module, ConvBn) else module
        layout = conv_layout(float_module)
        if id(weights) not in quantized:
            w = weights.applied(_applied_weight(module))
            check_finite(w, name)
            qparams = weights.convert_qparams(w)
            with torch.no_grad():
                if _is_static(spec):
                    quantized[id(weights)] = quantize_block(w, spec.weight, kernel=base.kernel, name=name, qparams=qparams, **layout)
                else:
                    quantized[id(weights)] = quantize_weight(w, spec, kernel=base.kernel, name=name, qparams=qparams, **layout)
        qweight = quantized[id(weights)]
        if _is_static(spec):
            inputs = getattr(module, ACT_ATTR)
            scale, zero_point = inputs.convert_qparams()
            qweight = with_static_activation(qweight, spec.activation, scale, zero_point, weights.smoothing)
        planned.append((fqn, module, float_module, qweight))
    parameters: dict[int, nn.Parameter] = {}
    for fqn, module, float_module, qweight in planned:
        _unprepare(module)
        if float_module is not module:
            set_submodule(model, fqn, float_module)
            module = float_module
        if module_swap and isinstance(module, nn.Linear):
            module = QuantizedLinear.from_quantized_weight(module, qweight)
            set_submodule(model, fqn, module)
        else:
            if id(qweight) not in parameters:
                parameters[id(qweight)] = nn.Parameter(module_weight(module, qweight), requires_grad=False)
            module.weight = parameters[id(qweight)]
        module.lowbit_spec = spec  # recorded by lowbit.save


def _unprepare(module: nn.Module) -> None:
    """Remove what the prepare step added: the parametrization (the float weight returns), the input hook and
    fake quantizer, the recorded config."""
    if parametrize.is_parametrized(module, "weight"):
        # deep copies share the class parametrize generated, and removal deletes the property from that class:
        # give this module a class of its own first, so its copies keep theirs
        cls = type(module)
        own = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
        module.__class__ = type(cls.__name__, cls.__bases__, own)
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
    for key, hook in list(module._forward_pre_hooks.items()):
        if hook is _fake_quantize_input:
            del module._forward_pre_hooks[key]
    for name in (ACT_ATTR, QAT_ATTR):
        if hasattr(module, name):
            delattr(module, name)


def range_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learned scales and zero points of ``model``'s fake quantizers (``range_learning=True``), e.g. for an
    optimizer parameter group of their own: LSQ's gradient scaling is tuned for SGD, while Adam moves every
    parameter by about its learning rate, so with Adam give these a learning rate near their size (1e-5 to 1e-4).

    Example:
        >>> import lowbit
        >>> model = nn.Sequential(nn.Linear(32, 8))
        >>> _ = lowbit.quantize_(model, QATConfig(lowbit.Int4WeightOnly(group_size=32), range_learning=True))
        >>> learned = range_parameters(model)
        >>> others = [p for p in model.parameters() if all(p is not q for q in learned)]
        >>> optimizer = torch.optim.Adam([{"params": others}, {"params": learned, "lr": 1e-5}], lr=1e-3)
    """
    found = {}
    for module in model.modules():
        if isinstance(module, (WeightFakeQuantizer, ActivationFakeQuantizer)) and module.range_learning:
            for p in (module.scale, module.zero_point):
                if p is not None:
                    found[id(p)] = p
    return list(found.values())


def freeze_ranges(model: nn.Module) -> nn.Module:
    """Stop updating every static activation range in ``model`` (with range learning, learning starts from them).

    Example:
        >>> import lowbit
        >>> model = nn.Sequential(nn.Linear(16, 8))
        >>> _ = lowbit.quantize_(model, QATConfig(lowbit.StaticInt8(smoothing=None)))
        >>> _ = model(torch.randn(4, 16))
        >>> _ = freeze_ranges(model)
    """
    for module in model.modules():
        if isinstance(module, ActivationFakeQuantizer):
            module.freeze()
    return model


def freeze_bn_stats(model: nn.Module) -> nn.Module:
    """Stop updating the running statistics of every QAT Conv-BN layer in ``model``; they use them from now on."""
    for module in model.modules():
        if isinstance(module, ConvBn):
            module.freeze_bn_stats()
    return model
