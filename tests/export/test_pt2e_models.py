"""The graph flow on real model graphs: MiniLM as exported, random-init GPT-2 / Llama / ViT, the digits CNN.

Each graph holds partition shapes eager quantization never sees (an unused pooler branch, a tied weight, a
constant input, transformers' Conv1D as addmm, BatchNorm after a conv); every one must prepare, calibrate and
convert, quantize every weight it should, and keep the model's outputs.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from export_helpers import DEQUANTIZE, QUANTIZE, count, eager_twin

import lowbit
from lowbit.export import X86Quantizer, convert_pt2e, prepare_pt2e

transformers = pytest.importorskip("transformers")


def _int8_weights(graph) -> int:
    return sum(1 for n in graph.graph.nodes if n.target is DEQUANTIZE and n.args[0].op == "get_attr"
               and getattr(graph, n.args[0].target).dtype == torch.int8)


def _graph_flow(model, kwargs_batches, config, dynamic=True):
    first = kwargs_batches[0]
    shapes = None
    if dynamic:
        batch, seq = torch.export.Dim("batch", max=64), torch.export.Dim("seq", max=256)
        shapes = {k: {0: batch, 1: seq} for k in first}
    graph = torch.export.export(model, (), dict(first), dynamic_shapes=shapes).module()
    prepared = prepare_pt2e(graph, X86Quantizer().set_global(config))
    with torch.no_grad():
        for batch in kwargs_batches:
            prepared(**batch)
    return convert_pt2e(prepared)


def _cosine(a, b) -> float:
    return F.cosine_similarity(a.flatten(1).double(), b.flatten(1).double()).min().item()


def test_minilm_as_exported_equals_the_eager_static_flow():
    from lowbit.embedded import load_minilm, stdlib_sentences

    model, tokenizer = load_minilm()
    texts = stdlib_sentences(24)
    batches = [dict(tokenizer(texts[i:i + 8], padding=True, return_tensors="pt")) for i in range(0, 24, 8)]
    config = replace(lowbit.StaticInt8(), kernel="reference")
    graph = _graph_flow(model, batches, config)  # the pooler branch, masks and position ids as exported
    eager = eager_twin(model, config, batches)
    assert _int8_weights(graph) == sum(isinstance(m, nn.Linear) for m in model.modules()) == 37
    probe = dict(tokenizer(stdlib_sentences(3, offset=100), padding=True, return_tensors="pt"))
    with torch.no_grad():
        out, ref = graph(**probe), eager(**probe)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, rtol=1e-4, atol=1e-4)


def _tokens(vocab, batches=3, shape=(2, 12), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, shape, generator=g)} for _ in range(batches)]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_random_init_decoders_quantize_every_projection(arch):
    if arch == "gpt2":
        cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64)
        model = transformers.GPT2LMHeadModel(cfg).eval()  # Conv1D (addmm) projections, lm_head tied to wte
        projections = 4 * cfg.n_layer + 1
    else:
        cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)
        model = transformers.LlamaForCausalLM(cfg).eval()
        projections = 7 * cfg.num_hidden_layers + 1
    model.config.use_cache = False
    batches = _tokens(256)
    graph = _graph_flow(model, batches, lowbit.StaticInt8())
    assert _int8_weights(graph) == projections
    with torch.no_grad():
        probe = _tokens(256, 1, (3, 10), seed=1)[0]
        assert _cosine(graph(**probe).logits, model(**probe).logits) > 0.99


def test_random_init_vit_quantizes_its_patch_convolution_and_linears():
    cfg = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                 image_size=32, patch_size=8)
    model = transformers.ViTModel(cfg).eval()
    g = torch.Generator().manual_seed(0)
    images = [{"pixel_values": torch.randn(2, 3, 32, 32, generator=g)} for _ in range(3)]
    graph = torch.export.export(model, (), images[0]).module()
    prepared = prepare_pt2e(graph, X86Quantizer().set_global(lowbit.StaticInt8()))
    with torch.no_grad():
        for batch in images:
            prepared(**batch)
    converted = convert_pt2e(prepared)
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert _int8_weights(converted) == linears + 1  # + the patch embedding conv
    with torch.no_grad():
        assert _cosine(converted(**images[0]).last_hidden_state, model(**images[0]).last_hidden_state) > 0.99


def test_digits_cnn_folds_batch_norm_and_shares_qparams_through_pooling():
    from lowbit.embedded import digits_cnn

    model = digits_cnn().eval()
    for m in model.modules():  # BatchNorm statistics a trained network would have
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    data = [torch.randn(16, 1, 8, 8) for _ in range(3)]
    graph = torch.export.export(model, (data[0],), dynamic_shapes=({0: torch.export.Dim("batch", max=512)},)).module()
    prepared = prepare_pt2e(graph, X86Quantizer().set_global(lowbit.StaticInt8()))
    assert count(prepared, torch.ops.aten.batch_norm.default) == 0
    folded = lowbit.fuse(model)(data[0])
    torch.testing.assert_close(prepared(data[0]), folded, rtol=1e-5, atol=1e-5)  # observers and folding change nothing
    for x in data[1:]:
        prepared(x)
    converted = convert_pt2e(prepared)
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert _int8_weights(converted) == convs + linears
    pool = next(n for n in converted.graph.nodes if n.target is torch.ops.aten.adaptive_avg_pool2d.default)
    fc_input = next(n for n in converted.graph.nodes if n.target is torch.ops.aten.linear.default).args[0]
    while fc_input.target is not QUANTIZE:  # dq <- q <- flatten <- dq <- q <- pool: one scale all along
        fc_input = fc_input.args[0]
    assert fc_input.args[1].target == pool.args[0].args[1].target
    x = torch.randn(7, 1, 8, 8)
    assert _cosine(converted(x), model(x)) > 0.99


class _Shapes(nn.Module):
    """Partitions eager quantization never sees: an unused branch, a constant input, attention's matmul of two
    activations, a cat of two convolutions."""

    def __init__(self):
        super().__init__()
        self.left, self.right = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.query, self.key = nn.Linear(8, 8), nn.Linear(8, 8)
        self.unused = nn.Linear(8, 8)
        self.head = nn.Linear(8, 8)
        self.register_buffer("prompt", torch.randn(3, 8))

    def forward(self, image, tokens):
        self.unused(tokens)  # traced, never read
        features = torch.cat([self.left(image), self.right(image)], dim=1)  # (B, 8, H, W)
        scores = torch.matmul(self.query(tokens), self.key(tokens).transpose(-1, -2))  # (B, T, T)
        return features.mean((2, 3)), scores, self.head(self.prompt)  # head reads a constant


def test_unused_branches_constants_matmul_and_cat_all_convert():
    model = _Shapes().eval()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(2, 3, 6, 6, generator=g), torch.randn(2, 5, 8, generator=g)) for _ in range(3)]
    graph = torch.export.export(model, batches[0]).module()
    prepared = prepare_pt2e(graph, X86Quantizer().set_global(lowbit.StaticInt8(smoothing=None)))
    for batch in batches:
        prepared(*batch)
    converted = convert_pt2e(prepared)
    assert count(converted, torch.ops.aten.linear.default) == 3  # the unused projection is gone
    matmul = next(n for n in converted.graph.nodes if n.target is torch.ops.aten.matmul.default)
    assert all(arg.target is DEQUANTIZE for arg in matmul.args)
    cat = next(n for n in converted.graph.nodes if n.target is torch.ops.aten.cat.default)
    assert all(arg.target is not DEQUANTIZE for arg in cat.args[0])  # conv outputs are not quantized before cat
    head = [n for n in converted.graph.nodes if n.target is torch.ops.aten.linear.default][-1]
    assert head.args[0].op == "get_attr" and head.args[1].target is DEQUANTIZE  # a constant input stays float
    for out, ref in zip(converted(*batches[0]), model(*batches[0])):
        assert _cosine(out.reshape(1, -1), ref.reshape(1, -1)) > 0.99
