"""The benchmark harness behind ``lowbit bench``: lowbit against fp32, bf16 and installed peers.

``harness.run(quick, out, echo)`` measures and writes ``bench.json`` / ``bench.md``; ``peers`` holds
the optional peer libraries. Measurement helpers (``median_ms``, ``lowbit_quantize``) are shared
with ``lowbit demo``.
"""
