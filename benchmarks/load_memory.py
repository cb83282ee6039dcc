"""Peak memory and time of ``lowbit.load`` into a model built on the meta device.

all-MiniLM-L6-v2 is quantized with Int8WeightOnly and saved as a directory (in a subprocess: the
parent only starts processes and prints, so its threads cannot skew timings). A fresh subprocess then
builds the model from its config with parameters on the meta device (buffers real), resets the
kernel's peak-RSS counter (``/proc/self/clear_refs``), loads the checkpoint and reads the peak
(``VmHWM``). The figure is that peak over the RSS just before loading, divided by the bytes the
checkpoint stores (target <= 1.10). Other subprocesses time ``lowbit.load_pretrained`` end to end;
each process times a first (cold: lazy imports, kernel library) and a second load. All check that
the loaded model gives the saved model's outputs exactly.

Run: ``.venv/bin/python benchmarks/load_memory.py`` (Linux; needs the ``models`` extras).
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import lowbit
from lowbit.embedded import load_minilm, stdlib_sentences

REPEATS = 3


def _status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes."""
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def _outputs(model, inputs) -> torch.Tensor:
    with torch.inference_mode():
        return model(**inputs).last_hidden_state


def _meta_model(directory: str):
    import transformers

    config = transformers.AutoConfig.from_pretrained(directory)
    with lowbit.serialization.meta_parameters():
        return transformers.AutoModel.from_config(config)


def child(directory: str, mode: str) -> None:
    """Load ``directory`` in this fresh process (cold), then once more (warm); print one JSON line."""
    reference = torch.load(Path(directory) / "reference.pt")
    peak = None
    if mode == "load":
        model = _meta_model(directory)
        baseline = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        start = time.perf_counter()
        lowbit.load(model, directory)
        cold = time.perf_counter() - start
        peak = _status("VmHWM") - baseline
        again = _meta_model(directory)
        start = time.perf_counter()
        lowbit.load(again, directory)
    else:
        start = time.perf_counter()
        model = lowbit.load_pretrained(directory)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        lowbit.load_pretrained(directory)
    warm = time.perf_counter() - start
    same = torch.equal(_outputs(model.eval(), reference["inputs"]), reference["outputs"])
    print(json.dumps({"cold": cold, "warm": warm, "peak_bytes": peak, "same_outputs": same}))


def prepare(directory: str) -> None:
    """Quantize MiniLM, save it to ``directory`` with reference inputs and outputs beside it."""
    model, tokenizer = load_minilm()
    lowbit.quantize_(model, lowbit.Int8WeightOnly())
    inputs = dict(tokenizer(stdlib_sentences(8), padding=True, return_tensors="pt"))
    lowbit.save(model, directory)
    torch.save({"inputs": inputs, "outputs": _outputs(model, inputs)}, Path(directory) / "reference.pt")


def run_child(*args: str) -> dict | None:
    """Run this script with ``args`` in a fresh process (an idle parent: its threads cannot skew timings)."""
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True).stdout.strip()
    return json.loads(out.splitlines()[-1]) if out else None


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "minilm-int8"
        run_child("--prepare", str(directory))
        stored = lowbit.serialization.describe(directory)["totals"]["stored_bytes"]
        loads = [run_child("--child", str(directory), "load") for _ in range(REPEATS)]
        pretrained = [run_child("--child", str(directory), "load_pretrained") for _ in range(REPEATS)]
    peak = max(r["peak_bytes"] for r in loads)
    median = {(name, key): statistics.median(r[key] for r in runs) * 1e3
              for name, runs in (("load", loads), ("pretrained", pretrained)) for key in ("cold", "warm")}
    print(f"MiniLM-L6 Int8WeightOnly checkpoint: {stored / 1e6:.2f} MB stored")
    print(f"lowbit.load into a meta model: peak memory over baseline {peak / 1e6:.2f} MB = {peak / stored:.3f}x the "
          f"checkpoint (target <= 1.10, worst of {REPEATS} processes)")
    print(f"lowbit.load time: first in a process {median['load', 'cold']:.0f} ms, again {median['load', 'warm']:.0f} ms")
    print(f"lowbit.load_pretrained (build + load) time: first in a process (imports transformers) "
          f"{median['pretrained', 'cold']:.0f} ms, "
          f"again {median['pretrained', 'warm']:.0f} ms")
    print(f"outputs identical to the saved model: {all(r['same_outputs'] for r in loads + pretrained)}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 3 and sys.argv[1] == "--prepare":
        prepare(sys.argv[2])
    else:
        main()
