"""The benchmark harness behind ``lowbit bench``: lowbit against fp32, bf16 and installed peers.

``harness.run(profile, out, echo)`` measures and writes ``bench.json`` / ``bench.md``; ``timing`` holds
the interleaved timing shared with ``lowbit demo``; ``peers`` the optional peer libraries.
"""
