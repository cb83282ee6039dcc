"""``lowbit quantize``'s calibration text: ``--calib-data FILE`` or standard-library sentences, tokenized."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

CALIBRATION_SENTENCES = 64
CALIBRATION_BATCH = 8
MAX_LENGTH = 128


@dataclass(frozen=True)
class CalibrationText:
    """Samples with their line numbers in ``source`` (the file, or None for the default sentences)."""

    lines: list[tuple[int, str]]
    source: Path | None

    def where(self) -> str:
        return f"--calib-data {self.source}" if self.source else "the default calibration sentences"


def read_calibration_text(path: Path | None) -> CalibrationText:
    """The non-empty lines of ``path`` (UTF-8 text), or :data:`CALIBRATION_SENTENCES` standard-library
    sentences when ``path`` is None."""
    if path is None:
        from ..embedded import stdlib_sentences

        return CalibrationText(list(enumerate(stdlib_sentences(CALIBRATION_SENTENCES), 1)), None)
    expected = f"--calib-data {path}: expected a UTF-8 text file with one calibration sample per line"
    if path.is_dir():
        raise ValueError(f"{expected}; received a directory")
    if not path.is_file():
        raise FileNotFoundError(f"{expected}; it does not exist")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{expected}; byte {error.start} (0x{data[error.start]:02x}) is not UTF-8: a binary file?") from None
    if "\0" in text:
        raise ValueError(f"{expected}; it holds NUL bytes (first at character {text.index(chr(0))}): a binary file?")
    lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise ValueError(f"{expected}; it has no non-empty line")
    return CalibrationText(lines, path)


def calibration_batches(tokenizer, calibration: CalibrationText, vocabulary: int | None) -> list[dict]:
    """Tokenized calibration batches (one sample per batch when the tokenizer cannot pad). Raises if a
    token id falls outside the model's ``vocabulary`` (its input embedding rows): tokenizer and model
    do not match."""
    size = CALIBRATION_BATCH if tokenizer.pad_token is not None else 1
    batches = []
    for start in range(0, len(calibration.lines), size):
        chunk = calibration.lines[start : start + size]
        encoded = tokenizer([text for _, text in chunk], padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        ids = encoded["input_ids"]  # (B, T)
        if vocabulary is not None and ids.numel() and int(ids.max()) >= vocabulary:
            row = int(torch.nonzero(ids >= vocabulary)[0, 0])
            number, _ = chunk[row]
            raise ValueError(f"{calibration.where()}: line {number} tokenizes to id {int(ids[row].max())}, past the model's "
                             f"vocabulary of {vocabulary} tokens (its input embedding rows): the model directory's tokenizer "
                             f"does not match its model")
        batches.append({key: encoded[key] for key in tokenizer.model_input_names if key in encoded})
    return batches
