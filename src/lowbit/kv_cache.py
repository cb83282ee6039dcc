"""A quantized KV cache for Hugging Face transformers decoders (``generate(cache=...)``; before
transformers 5.24 the argument is ``past_key_values=...``).

Each new key/value token is quantized once, per head and group of ``group_size`` channels, and
appended: nothing is re-quantized as the sequence grows (unlike a residual window that is flushed
and re-quantized). Scales are bfloat16 (rounded up, floored at bf16's smallest normal); int4 packs
two values per byte with a uint8 zero point per group. Bytes per cached value, against 2 for bf16:
int8 ``1 + 2/group`` (0.52x at group 64), float8 the same, int4 ``0.5 + 3/group`` (0.30x at group 32).

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM  # doctest: +SKIP
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2))  # doctest: +SKIP
    >>> cache = QuantizedKVCache(model.config, qtype="int4")  # doctest: +SKIP
    >>> out = model.generate(torch.tensor([[1, 2, 3]]), cache=cache, max_new_tokens=8)  # doctest: +SKIP
"""

from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .primitives.affine import choose_qparams, dequantize, quantize
from .primitives.packing import pack_int4, unpack_int4

QTYPES = {"int8": "int8", "int4": "uint4", "float8_e4m3fn": "float8_e4m3fn"}  # name -> storage qtype
_SCALE_DTYPE = torch.bfloat16


def cache_argument(model) -> str:
    """The keyword ``model``'s forward and ``generate`` take a cache by: ``"cache"`` from transformers
    5.24, ``"past_key_values"`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class QuantizedKVLayer(DynamicLayer):
    """One decoder layer's keys and values, stored quantized (B, H, T, D) with per-group scales.

    Built on ``DynamicLayer`` (transformers 5.0 and later) with its own bookkeeping: the quantized
    states live in ``_quantized_keys`` / ``_quantized_values`` (dicts of tensors whose dim -2 is T).
    """

    is_croppable = False

    def __init__(self, qtype: str = "int4", group_size: int | None = None):
        super().__init__()
        if qtype not in QTYPES:
            raise ValueError(f"KV cache qtype must be one of {sorted(QTYPES)}; received {qtype!r}")
        if group_size is not None and (not isinstance(group_size, int) or group_size < 2 or group_size % 2):
            raise ValueError(f"group_size must be None (the whole head dim) or an even int >= 2; received {group_size!r}")
        self.qtype, self.group_size = qtype, group_size
        self._quantized_keys = self._quantized_values = None

    def _block(self, x: torch.Tensor) -> tuple[int, ...]:
        head_dim = x.shape[-1]
        group = self.group_size or head_dim
        if head_dim % group:
            raise ValueError(f"the head dim {head_dim} is not a multiple of the KV cache group_size {group}")
        return (1,) * (x.dim() - 1) + (group,)

    def _quantize(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        qtype, block = QTYPES[self.qtype], self._block(x)
        symmetric = qtype != "uint4"
        scale, zero_point = choose_qparams(x, block, qtype, symmetric=symmetric, scale_dtype=_SCALE_DTYPE, ignore_nonfinite=True)
        q = quantize(x, scale, zero_point, block, qtype, saturate_nonfinite=True)
        state = {"q": pack_int4(q) if qtype == "uint4" else q, "scale": scale}
        if zero_point is not None:
            state["zero_point"] = zero_point
        return state

    def _dequantize(self, state: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        q = unpack_int4(state["q"], signed=False) if self.qtype == "int4" else state["q"]
        return dequantize(q, state["scale"], state.get("zero_point"), self._block(q), dtype)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new states (quantized once) and return all keys and values, dequantized to the
        states' dtype; a call on an empty cache (the prompt) returns its own exact states."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new_keys, new_values = self._quantize(key_states), self._quantize(value_states)
        if self._quantized_keys is None:
            self._quantized_keys, self._quantized_values = new_keys, new_values
            return key_states, value_states
        for stored, new in ((self._quantized_keys, new_keys), (self._quantized_values, new_values)):
            for name, part in new.items():
                stored[name] = torch.cat([stored[name], part], dim=-2)  # (B, H, T, ...)
        return self._dequantize(self._quantized_keys, key_states.dtype), self._dequantize(self._quantized_values, value_states.dtype)

    def get_seq_length(self) -> int:
        return 0 if self._quantized_keys is None else self._quantized_keys["scale"].shape[-2]

    def reset(self) -> None:
        super().reset()
        self._quantized_keys = self._quantized_values = None

    def _map_states(self, fn) -> None:
        for stored in (self._quantized_keys, self._quantized_values):
            for name, t in (stored or {}).items():
                stored[name] = fn(t)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch for beam search (quantized states move as they are)."""
        self._map_states(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_states(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_states(lambda t: t[indices])

    def crop(self, *args, **kwargs) -> None:
        raise NotImplementedError("QuantizedKVCache cannot be cropped (assisted generation needs a DynamicCache)")

    def storage_bytes(self) -> int:
        """Bytes held by the quantized keys and values, scales and zero points included."""
        return sum(t.numel() * t.element_size() for s in (self._quantized_keys, self._quantized_values) for t in (s or {}).values())


class QuantizedKVCache(Cache):
    """A transformers ``Cache`` whose every layer is a :class:`QuantizedKVLayer`.

    Args:
        config: the model's config (its decoder's ``num_hidden_layers`` layers get a quantized layer).
        qtype: ``"int4"`` (default; asymmetric, 0.30x of bf16 at group 32), ``"int8"`` or ``"float8_e4m3fn"``.
        group_size: channels sharing a scale; None: the whole head dim (default 32 for int4).
    """

    def __init__(self, config, qtype: str = "int4", group_size: int | None = None):
        text_config = config.get_text_config(decoder=True)
        if qtype == "int4" and group_size is None:
            group_size = 32
        layers = [QuantizedKVLayer(qtype, group_size) for _ in range(text_config.num_hidden_layers)]
        super().__init__(layers=layers)

    def storage_bytes(self) -> int:
        """Bytes held by every layer's quantized keys and values."""
        return sum(layer.storage_bytes() for layer in self.layers)
