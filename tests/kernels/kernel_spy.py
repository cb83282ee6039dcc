"""Which kernels quantized tensors actually call: ``(op, kernel name)`` per call, in order."""

import pytest

from lowbit.tensors import blockwise


@pytest.fixture
def kernels_run(monkeypatch) -> list[tuple[str, str]]:
    calls = []
    call_kernel = blockwise.call_kernel

    def spy(kernel, x, tensors, meta, bias):
        calls.append((kernel.op, kernel.name))
        return call_kernel(kernel, x, tensors, meta, bias)

    monkeypatch.setattr(blockwise, "call_kernel", spy)
    return calls
