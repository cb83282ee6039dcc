"""Tied weights stay tied: quantized once and shared where the config takes every layer using them, otherwise
left float (and tied) with a warning naming them."""

import warnings

import pytest
import torch
import torch.nn as nn

import lowbit

transformers = pytest.importorskip("transformers")


def _tiny_gpt2():
    """GPT-2 with lm_head.weight tied to transformer.wte.weight (an nn.Linear and an nn.Embedding)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=1000, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


IDS = torch.randint(0, 1000, (2, 8), generator=torch.Generator().manual_seed(1))


def test_tied_head_and_embedding_are_quantized_once_where_the_config_takes_both(tmp_path):
    model = _tiny_gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lowbit.quantize_(model, lowbit.Int8WeightOnly())
    assert model.lm_head.weight is model.transformer.wte.weight
    assert isinstance(model.lm_head.weight, lowbit.Int8Tensor)
    with torch.no_grad():
        expected = model(IDS).logits
    lowbit.save(model, tmp_path / "gpt2")
    loaded = lowbit.load_pretrained(tmp_path / "gpt2")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight and isinstance(loaded.lm_head.weight, lowbit.Int8Tensor)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, expected)


def test_tied_pair_stays_float_and_tied_with_a_warning_where_the_config_cannot_take_the_embedding(tmp_path):
    model = _tiny_gpt2()
    weight, hidden = model.lm_head.weight, torch.randn(2, 8, 64)
    original = weight.detach().clone()
    with torch.no_grad():
        head, embedded = model.lm_head(hidden), model.transformer.wte(IDS)
    with pytest.warns(UserWarning, match=r"'transformer.wte.weight' and 'lm_head.weight' are one tied weight: they stay "
                                         r"float and tied, as Int8DynamicActivation quantizes linear weights only, not "
                                         r"nn.Embedding \('transformer.wte'\)"):
        lowbit.quantize_(model, lowbit.Int8DynamicActivation())
    assert model.lm_head.weight is weight and model.transformer.wte.weight is weight
    assert type(weight) is nn.Parameter and torch.equal(weight, original)
    with torch.no_grad():
        assert torch.equal(model.lm_head(hidden), head) and torch.equal(model.transformer.wte(IDS), embedded)
    assert isinstance(model.transformer.h[0].mlp.c_fc.weight, lowbit.DynamicActivationTensor)  # the rest is quantized
    lowbit.save(model, tmp_path / "gpt2")
    loaded = lowbit.load_pretrained(tmp_path / "gpt2")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_prepare_leaves_tied_layers_float_with_a_warning():
    model = _tiny_gpt2()
    with pytest.warns(UserWarning, match=r"'lm_head.weight' are one tied weight: .* static quantization gives each "
                                         r"layer its own activation scale"):
        lowbit.prepare(model, lowbit.StaticInt8())
    assert not hasattr(model.lm_head, "lowbit_observer") and hasattr(model.transformer.h[0].attn.c_attn, "lowbit_observer")
    lowbit.calibrate(model, [IDS], progress=False)
    lowbit.convert(model)
    assert model.lm_head.weight is model.transformer.wte.weight and type(model.lm_head.weight) is nn.Parameter


def test_module_swap_leaves_tied_linears_float_with_a_warning():
    model = nn.ModuleDict({"a": nn.Linear(16, 16), "b": nn.Linear(16, 16), "c": nn.Linear(16, 8)})
    model.b.weight = model.a.weight
    with pytest.warns(UserWarning, match=r"'a.weight' and 'b.weight' are one tied weight: .* module_swap gives each layer "
                                         r"its own buffers"):
        lowbit.quantize_(model, lowbit.Int8WeightOnly(), module_swap=True)
    assert type(model.a) is nn.Linear and model.a.weight is model.b.weight
    assert isinstance(model.c, lowbit.QuantizedLinear)
