"""A checkpoint entry's spec, read strictly and checked against the tensor it describes.

Format 2 stores each quantized tensor's :class:`~lowbit.specs.QuantSpec` (plain JSON, never evaluated); loading
refuses a spec that would not have made the tensor beside it, so a file says exactly how it was quantized.
"""

from __future__ import annotations

from ..specs import QuantSpec, WeightSpec, spec_from_json
from ..tensors.schemes import scheme_for
from .codec import Node
from .container import CheckpointError, shown


SMOOTHING_ALGORITHMS = ("awq", "smoothquant")  # weight algorithms whose tensors carry per-input-channel divisors


def read_spec(value, where: str) -> QuantSpec:
    """The spec of a header's ``spec`` field, validated.

    Raises:
        CheckpointError: not a spec (a missing or extra field, a value of the wrong type, an invalid spec).
    """
    try:
        return spec_from_json(value)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{where}: field 'spec': {error}; received {shown(value)}") from None


def check_spec(spec: QuantSpec, node: Node, where: str) -> None:
    """Raise CheckpointError unless ``spec`` would have made ``node``'s tensor: the same scheme (so class),
    qtype, block size, activation quantization and smoothing divisors (only where the weight algorithm smooths)."""
    outer = node.fields["weight"] if node.cls.__name__ == "SmoothedTensor" else node  # the weight-only or dynamic tensor
    weight = node.block
    activation = spec.activation
    try:
        scheme = scheme_for(spec.weight.scheme, "none" if activation is None else activation.mode).name
    except ValueError as error:
        raise CheckpointError(f"{where}: field 'spec': {error}") from None
    smoothing = spec.weight.algorithm in SMOOTHING_ALGORITHMS
    checks = (  # (what, what the spec allows, what the tensor has)
        ("scheme", (scheme,), node.scheme),
        ("qtype", (spec.weight.qtype,), weight.meta["qtype"]),
        ("block_size", _block_sizes(spec.weight, weight.shape, weight.meta.get("groups")), weight.meta["block_size"]),
        ("activation", (None if activation is None else activation.quant,), outer.meta.get("activation")),
        # a smoothing algorithm's conv or embedding layers carry no divisors, so they may be absent
        ("act_smooth", ("present", "absent") if smoothing else ("absent",), "present" if "act_smooth" in node.fields else "absent"),
    )
    for what, allowed, received in checks:
        if received not in allowed:
            expected = " or ".join(map(str, allowed)) if allowed else "none (it does not quantize such a weight)"
            raise CheckpointError(f"{where}: field 'spec': the spec gives {what} {expected}; the tensor has {what} {received}")


def _block_sizes(spec: WeightSpec, shape: tuple[int, ...], groups: int | None) -> tuple[tuple[int, ...], ...]:
    """The block sizes ``spec`` may give a weight of ``shape``: per group, channel or tensor for a linear or
    embedding weight (or its transpose: transformers' Conv1D stores (in, out)), one block per output channel of a
    Conv or ConvTranspose weight (as lowbit.targets.conv_layout does)."""
    if groups is not None:
        if spec.granularity != "per_channel":
            return ()
        return (1, *shape[1:]), (shape[0] // groups, 1, *shape[2:])
    sizes = []
    for flip in (False, True) if len(shape) == 2 else (False,):
        try:
            block = tuple(spec.block_size(shape[::-1] if flip else shape))
        except ValueError:  # the group size does not divide the shape
            continue
        sizes.append(block[::-1] if flip else block)
    return tuple(sizes)
