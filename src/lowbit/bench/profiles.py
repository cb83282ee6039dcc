"""How much the benchmark measures: the full run behind BENCHMARKS.md and ``--quick``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

Echo = Callable[[str], None]  # receives the progress lines


@dataclass(frozen=True)
class Profile:
    """Shapes, batches and timing effort of one benchmark run.

    ``rounds`` and ``target_s`` go to :func:`lowbit.bench.timing.interleaved_ms`: every group of
    baseline and candidate takes ``rounds`` turns of about ``target_s`` seconds each.
    """

    linear_shapes: tuple[tuple[int, int], ...]  # (in_features, out_features), LLaMA-7B-like
    linear_rows: tuple[int, ...]
    grad_shape: tuple[int, int]  # the grad-mode table's linear
    grad_rows: tuple[int, ...]
    grad_minilm: bool  # the grad-mode table's MiniLM rows (batch 1)
    minilm_batches: tuple[int, ...]
    sentences: int  # evaluation sentences of the MiniLM accuracy columns
    calibration_sentences: int  # MiniLM's static configs calibrate on these (disjoint from the others)
    compile_shape: tuple[int, int]  # the torch.compile table's linear
    compile_rows: tuple[int, ...]
    compile_minilm_configs: tuple[str, ...]  # names from lowbit.configs.NAMED_CONFIGS
    cnn_batches: tuple[int, ...]
    rounds: int
    target_s: float


FULL = Profile(
    linear_shapes=((4096, 4096), (4096, 11008), (11008, 4096)), linear_rows=(1, 8, 32, 128, 512),
    grad_shape=(4096, 11008), grad_rows=(1, 32), grad_minilm=True,
    minilm_batches=(1, 32), sentences=256, calibration_sentences=128,
    compile_shape=(4096, 11008), compile_rows=(1, 32, 128), compile_minilm_configs=("int8-dynamic", "int8-weight-only", "int4-weight-only"),
    cnn_batches=(1, 256, 1024), rounds=7, target_s=0.05,
)
QUICK = Profile(
    linear_shapes=((4096, 11008),), linear_rows=(1, 32, 512),
    grad_shape=(4096, 11008), grad_rows=(1, 32), grad_minilm=True,
    minilm_batches=(1,), sentences=128, calibration_sentences=128,
    compile_shape=(4096, 11008), compile_rows=(1, 128), compile_minilm_configs=("int8-dynamic",),
    cnn_batches=(1, 256), rounds=3, target_s=0.02,
)
