"""(f) The quantized KV cache in a random-init Llama (2 layers, 2 KV heads of 64 channels, bf16): bytes
against the bf16 ``DynamicCache`` after ``generate`` (batch 2, prompt 12 + 24 new tokens), and the cosine
of the next-token logits against the bf16 cache after 40 tokens fed one at a time (every step reads
the cache). The setup of ``tests/test_kv_cache.py``."""

from __future__ import annotations

import torch

from .profiles import Echo

QTYPES = ("int4", "int8", "float8_e4m3fn")
VOCAB = 256


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval().to(torch.bfloat16)


def _bf16_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def _last_logits(model, cache, ids: torch.Tensor) -> torch.Tensor:
    from lowbit.kv_cache import cache_argument

    with torch.inference_mode():
        for t in range(ids.shape[1]):
            out = model(ids[:, t : t + 1], **{cache_argument(model): cache}, use_cache=True)
    return out.logits[0, -1].float()


def bench_kv_cache(echo: Echo) -> list[dict]:
    from transformers import DynamicCache

    from lowbit.kv_cache import QuantizedKVCache, cache_argument

    model = _model()
    prompt = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(2))
    generate = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False, pad_token_id=0)
    reference = DynamicCache(config=model.config)
    with torch.inference_mode():
        model.generate(prompt, **{cache_argument(model): reference}, **generate)
    reference_logits = _last_logits(model, DynamicCache(config=model.config), ids)
    rows = []
    for qtype in QTYPES:
        cache = QuantizedKVCache(model.config, qtype=qtype)
        with torch.inference_mode():
            model.generate(prompt, **{cache_argument(model): cache}, **generate)
        logits = _last_logits(model, QuantizedKVCache(model.config, qtype=qtype), ids)
        row = dict(qtype=qtype, group_size=cache.layers[0].group_size, bytes_ratio=cache.storage_bytes() / _bf16_bytes(reference),
                   logits_cosine=torch.nn.functional.cosine_similarity(logits, reference_logits, dim=0).item())
        rows.append(row)
        echo(f"kv cache {qtype:<14} group {row['group_size'] or 'head dim'}: {row['bytes_ratio']:.3f}x the bf16 cache, "
             f"next-token logits cosine {row['logits_cosine']:.5f}")
    return rows
