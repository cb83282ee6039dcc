"""The quantized KV cache inside a transformers decoder's generate()."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.cache_utils import DynamicLayer  # noqa: E402

from lowbit.kv_cache import QuantizedKVCache, QuantizedKVLayer, cache_argument  # noqa: E402

QTYPES = ["int4", "int8", "float8_e4m3fn"]
CACHE_ARG = cache_argument(LlamaForCausalLM)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval().to(torch.bfloat16)


def _round_up_bf16(scale):
    """float32 -> bfloat16 never rounding down, floored at bf16's smallest normal."""
    cast = scale.to(torch.bfloat16)
    cast = torch.where(cast.float() < scale, torch.nextafter(cast, torch.full_like(cast, float("inf"))), cast)
    return cast.clamp(min=torch.finfo(torch.bfloat16).tiny).float()


def _round_trip(x, qtype, group):
    """What a cached value reads back as, written out from the formulas (B, H, T, D) -> same shape."""
    g = x.float().unflatten(-1, (-1, group))  # (B, H, T, D/group, group)
    if qtype == "int8":
        scale = _round_up_bf16(g.abs().amax(-1, keepdim=True) / 127)
        out = torch.round(g / scale).clamp(-128, 127) * scale
    elif qtype == "int4":  # asymmetric uint4 with an integer zero point
        lo, hi = g.amin(-1, keepdim=True).clamp(max=0), g.amax(-1, keepdim=True).clamp(min=0)
        scale = _round_up_bf16((hi - lo) / 15)
        zero_point = (-torch.round(lo / scale)).clamp(0, 15)
        out = ((torch.round(g / scale) + zero_point).clamp(0, 15) - zero_point) * scale
    else:
        scale = _round_up_bf16(g.abs().amax(-1, keepdim=True) / 448)
        out = (g / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale
    return out.flatten(-2).to(x.dtype)


def _emulated_cache(config, qtype, group):
    """A DynamicCache that stores every token's round trip and lets the prompt see its exact states:
    what QuantizedKVCache must return, computed without it."""

    class RoundTripLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            first = not self.is_initialized
            keys, values = super().update(_round_trip(key_states, qtype, group), _round_trip(value_states, qtype, group))
            return (key_states, value_states) if first else (keys, values)

    return transformers.cache_utils.Cache(layers=[RoundTripLayer() for _ in range(config.num_hidden_layers)])


def _bf16_cache_bytes(cache):
    return sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
               for layer in cache.layers)


def _generate(model, prompt, cache, **kwargs):
    with torch.inference_mode():
        out = model.generate(prompt, **{CACHE_ARG: cache}, max_new_tokens=24, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, attention_mask=torch.ones_like(prompt), **kwargs)
    return out.sequences, torch.stack(out.logits)


@pytest.mark.parametrize("qtype, group, max_ratio", [("int4", 32, 0.5), ("int8", 64, 0.55), ("float8_e4m3fn", 64, 0.55)])
def test_generate_reads_the_quantized_cache(model, qtype, group, max_ratio):
    """Every token after the first generated one attends to cached states read back from their quantized
    form: tokens and logits of all 24 steps equal those of a cache that stores the formulas' round trip."""
    prompt = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    cache, float_cache = QuantizedKVCache(model.config, qtype=qtype), DynamicCache(config=model.config)
    tokens, logits = _generate(model, prompt, cache)
    expected_tokens, expected_logits = _generate(model, prompt, _emulated_cache(model.config, qtype, group))
    float_tokens, float_logits = _generate(model, prompt, float_cache)
    assert tokens.shape == (2, 36) and cache.get_seq_length() == float_cache.get_seq_length() == 35
    assert torch.equal(tokens, expected_tokens)
    assert torch.equal(logits, expected_logits)
    assert torch.equal(logits[0], float_logits[0])  # the prompt step attends to its exact states
    assert not torch.equal(logits[1:], float_logits[1:])  # later steps read quantized states
    ratio = cache.storage_bytes() / _bf16_cache_bytes(float_cache)
    assert ratio <= max_ratio, ratio


def test_beam_search_reorders_the_quantized_cache(model):
    prompt = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(3))
    tokens, logits = _generate(model, prompt, QuantizedKVCache(model.config, qtype="int8"), num_beams=3)
    expected_tokens, expected_logits = _generate(model, prompt, _emulated_cache(model.config, "int8", 64), num_beams=3)
    assert torch.equal(tokens, expected_tokens) and torch.equal(logits, expected_logits)


def _error_bound(x, qtype, group):
    """Largest |read back - x| the formulas allow per value: half a step of the group's scale, the scale
    being range / levels rounded up to bf16 (at most 2^-7 relative); float8 e4m3: half a unit in the last
    of 3 mantissa bits (2^-4 relative), or half the subnormal step 2^-9 * scale. Plus float32 rounding."""
    g = x.unflatten(-1, (-1, group))
    amax = g.abs().amax(-1, keepdim=True)
    if qtype == "float8_e4m3fn":
        bound = g.abs() * 2.0 ** -4 + amax / 448 * (1 + 2.0 ** -7) * 2.0 ** -10
    else:
        span = amax / 127 if qtype == "int8" else (g.amax(-1, keepdim=True).clamp(min=0) - g.amin(-1, keepdim=True).clamp(max=0)) / 15
        bound = (span * (1 + 2.0 ** -7) / 2).expand_as(g)
    return (bound + amax * 2.0 ** -22).flatten(-2)


@pytest.mark.parametrize("qtype, group", [("int4", 32), ("int8", 16), ("int8", None), ("float8_e4m3fn", 8)])
def test_cached_states_are_within_the_quantization_step(qtype, group):
    layer = QuantizedKVLayer(qtype, group)
    generator = torch.Generator().manual_seed(4)
    steps = [torch.randn(2, 3, t, 64, generator=generator) * torch.logspace(-3, 2, 64) for t in (5, 1, 1, 3)]
    keys = [torch.randn(s.shape, generator=generator) for s in steps]
    prompt_keys, prompt_values = layer.update(keys[0], steps[0])
    assert prompt_keys is keys[0] and prompt_values is steps[0]  # the prompt attends to its exact states
    earlier = None
    for t in range(1, len(steps)):
        read_keys, read_values = layer.update(keys[t], steps[t])
        for read, written in ((read_keys, torch.cat(keys[:t + 1], -2)), (read_values, torch.cat(steps[:t + 1], -2))):
            assert read.shape == written.shape and read.dtype == torch.float32
            assert ((read - written).abs() <= _error_bound(written, qtype, group or 64)).all()
        if earlier is not None:  # quantized once: what was read back before reads back the same
            assert torch.equal(read_values[..., :earlier.shape[-2], :], earlier)
        earlier = read_values
    assert layer.get_seq_length() == 10


def test_bad_cache_arguments(model):
    with pytest.raises(ValueError, match="qtype must be one of"):
        QuantizedKVCache(model.config, qtype="int3")
    with pytest.raises(ValueError, match="group_size"):
        QuantizedKVCache(model.config, qtype="int8", group_size=3)
    cache = QuantizedKVCache(model.config, qtype="int8", group_size=48)  # 64 channels per head: not a multiple
    with pytest.raises(ValueError, match="not a multiple"):
        model(torch.tensor([[1, 2]]), **{CACHE_ARG: cache}, use_cache=True)
