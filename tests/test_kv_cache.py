"""The quantized KV cache inside a transformers decoder's generate()."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from lowbit.kv_cache import QuantizedKVCache  # noqa: E402


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval().to(torch.bfloat16)


def _bf16_cache_bytes(cache):
    return sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
               for layer in cache.layers)


@pytest.mark.parametrize("qtype, max_ratio", [("int4", 0.5), ("int8", 0.55), ("float8_e4m3fn", 0.55)])
def test_generate_with_a_quantized_cache(model, qtype, max_ratio):
    prompt = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    reference_cache, cache = DynamicCache(config=model.config), QuantizedKVCache(model.config, qtype=qtype)
    with torch.inference_mode():
        expected = model.generate(prompt, past_key_values=reference_cache, max_new_tokens=24, do_sample=False)
        out = model.generate(prompt, past_key_values=cache, max_new_tokens=24, do_sample=False)
    assert out.shape == expected.shape == (2, 36)
    assert cache.get_seq_length() == reference_cache.get_seq_length() == 35
    ratio = cache.storage_bytes() / _bf16_cache_bytes(reference_cache)
    assert ratio <= max_ratio, ratio
    assert torch.equal(out[:, :13], expected[:, :13])  # the prompt attends to its exact states
    # later tokens of a random-init model flip easily (near-flat logits): closeness is checked on logits below


def test_next_token_logits_stay_close_to_the_bf16_cache(model):
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(2))
    logits = {}
    for name, cache in (("bf16", DynamicCache(config=model.config)), ("int8", QuantizedKVCache(model.config, qtype="int8")),
                        ("float8", QuantizedKVCache(model.config, qtype="float8_e4m3fn")),
                        ("int4", QuantizedKVCache(model.config, qtype="int4"))):
        with torch.inference_mode():
            for t in range(ids.shape[1]):  # token by token: every step reads the cache
                out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
        logits[name] = out.logits[0, -1].float()
    for name, floor in (("int8", 0.9995), ("float8", 0.999), ("int4", 0.99)):
        cosine = torch.nn.functional.cosine_similarity(logits[name], logits["bf16"], dim=0).item()
        assert cosine > floor, (name, cosine)


def test_bad_cache_arguments(model):
    with pytest.raises(ValueError, match="qtype must be one of"):
        QuantizedKVCache(model.config, qtype="int3")
    with pytest.raises(ValueError, match="group_size"):
        QuantizedKVCache(model.config, qtype="int8", group_size=3)
    cache = QuantizedKVCache(model.config, qtype="int8", group_size=48)  # 64 channels per head: not a multiple
    with pytest.raises(ValueError, match="not a multiple"):
        model(torch.tensor([[1, 2]]), past_key_values=cache, use_cache=True)
