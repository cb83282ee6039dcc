"""The export flow on all-MiniLM-L6-v2 and the digits CNN: lowbit's lowered int8 graphs against float, ONNX Runtime
and torchao's PT2E flow.

Run: python benchmarks/export_flow.py [--models minilm,cnn] [--config StaticInt8] [--modes grad,inference]
                                      [--quick] [--threads 2]

Each model is captured with ``torch.export`` (dynamic batch and sequence), annotated by ``X86Quantizer`` with the
config, prepared, calibrated, converted, and compiled: ``torch.compile(converted)`` lowers the Q/DQ patterns to
lowbit's fused int8 kernels (``import lowbit.export.lowering``); under ``torch.autocast("cpu", torch.bfloat16)``
the float parts run in bf16 (int8-mixed-bf16). Rows per model and batch:

- fp32 eager, fp32 compiled, bf16 compiled (``model.to(torch.bfloat16)``): the baselines;
- lowbit int8 compiled, int8-mixed-bf16 compiled (Inductor freezing off, the default; and one row with it on);
- ONNX Runtime fp32 (``torch.onnx.export(..., dynamo=True)`` of the float model) and int8 (``lowbit.export.onnx
  .to_onnx`` of the converted graph, a QDQ model), ORT_ENABLE_ALL, intra-op threads = torch's threads;
- torchao's PT2E flow (``X86InductorQuantizer``, default config; optional), int8 and int8-mixed-bf16, compiled with
  Inductor freezing (its documented setting). As documented it crashes on MiniLM (an unused pooler partition has no
  outputs): the exported graph is dead-code-eliminated by hand first.

Columns: median ms over interleaved rounds (``lowbit.bench.timing``), the spread, speed-up vs the compiled bf16 and
fp32 models, and accuracy: MiniLM, cosine of the mean-pooled embeddings to fp32's on held-out sentences (min / mean);
the CNN, top-1 on the digits test split. ``--modes``: ``grad`` times plain ``model(*x)`` calls, as users call models
(grad mode on: Inductor does not freeze; the float models compile training graphs), ``inference`` under
``torch.inference_mode()``. Compiled models use ``dynamic=False`` (one static graph per batch size). Costs: seconds of
export, of prepare + calibrate + convert and of each compiled model's first call (compilation; Inductor's caches are
off so it is real), and the patterns lowering replaced in that compilation (a silent fallback shows as none).
Everything prints as markdown; timings depend on the machine's load, accuracies do not.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch._functorch.config
import torch._inductor.config
from torch._dynamo.utils import counters

import lowbit
import lowbit.export.lowering  # noqa: F401  (registers the lowering pass)
from lowbit.bench.minilm import calibration_batches, latency_batch
from lowbit.bench.timing import GRAD_MODES, Timed, interleaved_ms
from lowbit.export import X86Quantizer, convert_pt2e, prepare_pt2e

MODELS = ("minilm", "cnn")
MODES = {"grad": "plain calls", "inference": "inference_mode"}
CONFIGS = ("StaticInt8", "Int8DynamicActivation", "StaticFloat8", "Float8DynamicActivation", "Int8WeightOnly")
BERT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # BertModel.forward's order: inputs go positionally
EVAL_OFFSET = 1024  # held-out sentences: disjoint from calibration (offset 512) and latency (256) text
ORT_INT8_OPS = ("Integer", "QLinear", "QGemm", "QAttention", "DynamicQuantize")  # op types of ORT's int8 kernels
BASELINES = ("fp32 eager", "fp32 compiled", "bf16 compiled")


@dataclass(frozen=True)
class Settings:
    """Sizes of a run (``--quick`` shrinks them to a smoke run)."""

    eval_sentences: int = 256
    calibration_sentences: int = 32
    minilm_batches: tuple[int, ...] = (1, 32)
    minilm_layers: Optional[int] = None  # all 6
    cnn_batches: tuple[int, ...] = (1, 256)
    digits_epochs: int = 12
    test_images: Optional[int] = None  # all 397
    rounds: int = 7
    target_s: float = 0.05
    torchao: bool = True


QUICK = Settings(eval_sentences=16, calibration_sentences=16, minilm_batches=(1,), minilm_layers=1, cnn_batches=(1,),
                 digits_epochs=1, test_images=64, rounds=2, target_s=0.0, torchao=False)


def table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|---" * len(header) + "|",
                      *("| " + " | ".join(row) + " |" for row in rows)])


# --- what is measured -------------------------------------------------------------------------------------------

@dataclass
class Workload:
    """A float model, its inputs (positional tuples) and how to score its outputs against the float model's."""

    title: str
    model: torch.nn.Module
    example: tuple  # export example: batch and sequence >= 2, so torch.export keeps them dynamic
    dynamic: tuple  # dynamic_shapes, one dict per input
    calibration: list[tuple]
    batches: dict[int, tuple]  # batch size -> timing inputs
    evaluation: list[tuple[tuple, int]]  # (inputs padded to the largest timing batch, rows that count)
    accuracy_header: str
    score: Callable[[torch.Tensor], str]  # the evaluation outputs, concatenated -> accuracy cell


@dataclass
class Row:
    """One way to run the model: ``run(inputs)`` returns its main output as a float tensor."""

    name: str
    run: Optional[Callable[[tuple], torch.Tensor]] = None
    unavailable: str = ""
    compiled: bool = False
    first_call_s: Optional[float] = None
    lowered: str = "-"


@dataclass
class Costs:
    """Seconds of each step of one flow, and what its compilation lowered."""

    export_s: Optional[float] = None
    quantize_s: Optional[float] = None  # prepare + calibrate + convert
    extra: dict = field(default_factory=dict)


def main_output(out) -> torch.Tensor:
    """The first output (a model output's ``last_hidden_state``, a list's first array) as a float32 tensor."""
    if not isinstance(out, torch.Tensor):
        out = out[0]
    return (torch.from_numpy(out) if not isinstance(out, torch.Tensor) else out).float()


def eager_row(name: str, model, context: Callable = contextlib.nullcontext, cast_floats: Optional[torch.dtype] = None,
              compiled: bool = False) -> Row:
    def run(inputs: tuple) -> torch.Tensor:
        if cast_floats is not None:
            inputs = tuple(t.to(cast_floats) if t.is_floating_point() else t for t in inputs)
        with context():
            return main_output(model(*inputs))

    return Row(name, run, compiled=compiled)


def bf16_autocast():
    return torch.autocast("cpu", torch.bfloat16)


def reason(error: BaseException) -> str:
    """The error on one line (a table cell)."""
    return " ".join(f"{type(error).__name__}: {error}".split())[:160].replace("|", "/")


def unavailable(name: str, error: BaseException) -> Row:
    return Row(name, unavailable=f"not available: {reason(error)}")


# --- the flows --------------------------------------------------------------------------------------------------

def lowbit_rows(work: Workload, config, costs: dict, tmp: Path) -> list[Row]:
    start = time.perf_counter()
    graph = torch.export.export(work.model, work.example, dynamic_shapes=work.dynamic).module()
    flow = costs["lowbit"] = Costs(export_s=time.perf_counter() - start)
    start = time.perf_counter()
    prepared = prepare_pt2e(graph, X86Quantizer().set_global(config))
    for inputs in work.calibration:
        prepared(*inputs)
    converted = convert_pt2e(prepared)
    flow.quantize_s = time.perf_counter() - start
    rows = [eager_row("lowbit int8 compiled", torch.compile(converted, dynamic=False), compiled=True),
            eager_row("lowbit int8-mixed-bf16 compiled", torch.compile(copy.deepcopy(converted), dynamic=False),
                      bf16_autocast, compiled=True),
            eager_row("lowbit int8-mixed-bf16 compiled, freezing", torch.compile(
                copy.deepcopy(converted), dynamic=False, options={"freezing": True}), bf16_autocast, compiled=True)]
    return rows + onnx_rows(work, converted, costs, tmp)


def ort_session(path: Path, ort) -> tuple[object, str]:
    """An ONNX Runtime session (all graph optimizations, torch's thread count) and the int8 ops it optimized to."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.optimized_model_filepath = str(path.with_suffix(".optimized.onnx"))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    import onnx

    ops = [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]
    int8 = sorted({op for op in ops if any(key in op for key in ORT_INT8_OPS)})
    return session, ", ".join(f"{op} {ops.count(op)}" for op in int8) or "none"


def ort_row(name: str, session) -> Row:
    names = [i.name for i in session.get_inputs()]

    def run(inputs: tuple) -> torch.Tensor:
        return main_output(session.run(None, {n: t.numpy() for n, t in zip(names, inputs)}))

    return Row(name, run)


def onnx_rows(work: Workload, converted, costs: dict, tmp: Path) -> list[Row]:
    names = ("ONNX Runtime fp32", "ONNX Runtime int8")
    try:
        import onnxruntime as ort

        from lowbit.export.onnx import to_onnx
    except Exception as error:  # an optional dependency, or the module not there yet
        return [unavailable(name, error) for name in names]
    rows = []
    for name, export in ((names[0], lambda path: torch.onnx.export(
            work.model, work.example, str(path), dynamo=True, dynamic_shapes=work.dynamic, verbose=False)),
                         (names[1], lambda path: to_onnx(converted, work.example, path, dynamic_shapes=work.dynamic))):
        try:
            path = tmp / f"{name.split()[-1]}.onnx"
            start = time.perf_counter()
            export(path)
            seconds = time.perf_counter() - start
            start = time.perf_counter()
            session, int8_ops = ort_session(path, ort)
            costs[name] = Costs(export_s=seconds, extra={"session s": time.perf_counter() - start, "lowered": int8_ops})
            rows.append(ort_row(name, session))
        except Exception as error:  # noqa: BLE001  (a failing exporter is a result to print, not a crash)
            rows.append(unavailable(name, error))
    return rows


def torchao_rows(work: Workload, costs: dict) -> list[Row]:
    names = ("torchao int8 compiled, freezing", "torchao int8-mixed-bf16 compiled, freezing")
    try:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e as ao_convert, prepare_pt2e as ao_prepare

        start = time.perf_counter()
        graph = torch.export.export(work.model, work.example, dynamic_shapes=work.dynamic).module()
        graph.graph.eliminate_dead_code()  # the workaround: without it MiniLM's unused pooler crashes prepare_pt2e
        graph.recompile()
        flow = costs["torchao"] = Costs(export_s=time.perf_counter() - start)
        start = time.perf_counter()
        quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = ao_prepare(graph, quantizer)
        for inputs in work.calibration:
            prepared(*inputs)
        converted = ao_convert(prepared)
        flow.quantize_s = time.perf_counter() - start
    except Exception as error:  # noqa: BLE001  (an optional peer)
        return [unavailable(name, error) for name in names]
    return [eager_row(names[0], torch.compile(converted, dynamic=False, options={"freezing": True}), compiled=True),
            eager_row(names[1], torch.compile(copy.deepcopy(converted), dynamic=False, options={"freezing": True}),
                      bf16_autocast, compiled=True)]


def lowered_counts() -> dict[str, int]:
    """lowbit's replacements and torchao's (Inductor's int8 pattern matchers) so far."""
    found = {f"lowbit {k}": v for k, v in counters["lowbit"].items()}
    found.update({k.removesuffix("_matcher_count"): v for k, v in counters["inductor"].items()
                  if k.endswith("_matcher_count") and ("qlinear" in k or "qconv" in k)})
    return found


def first_call(row: Row, inputs: tuple, mode: str) -> None:
    """Compile ``row`` by calling it once; record the seconds and the patterns that compilation lowered."""
    before = lowered_counts()
    start = time.perf_counter()
    try:
        with GRAD_MODES[mode]():
            row.run(inputs)
    except Exception as error:  # noqa: BLE001  (a compilation that fails is a result: its row says so)
        row.run, row.unavailable = None, f"failed: {reason(error)}"
        return
    row.first_call_s = time.perf_counter() - start
    after = lowered_counts()
    lowered = {k: v - before.get(k, 0) for k, v in after.items() if v > before.get(k, 0)}
    row.lowered = ", ".join(f"{k} {v}" for k, v in sorted(lowered.items())) or "none"


# --- the workloads ----------------------------------------------------------------------------------------------

def padded_chunks(tensors: tuple, size: int) -> list[tuple[tuple, int]]:
    """``tensors`` split along dim 0 into chunks of ``size`` rows, the last one padded with the first rows (so a
    compiled model sees the timing shape), each with its count of real rows."""
    count = len(tensors[0])
    chunks = []
    for start in range(0, count, size):
        real = min(size, count - start)
        chunk = tuple(torch.cat([t[start:start + real], t[: size - real]]) for t in tensors)
        chunks.append((chunk, real))
    return chunks


def bert_inputs(tokens: dict) -> tuple:
    return tuple(tokens[name] for name in BERT_INPUTS)


def minilm_workload(settings: Settings) -> Workload:
    from lowbit.embedded import load_minilm, stdlib_sentences

    model, tokenizer = load_minilm()
    if settings.minilm_layers is not None:
        model.encoder.layer = model.encoder.layer[: settings.minilm_layers]
        model.config.num_hidden_layers = settings.minilm_layers
    calibration = [bert_inputs(b) for b in calibration_batches(tokenizer, settings.calibration_sentences)]
    held_out = bert_inputs(tokenizer(stdlib_sentences(settings.eval_sentences, offset=EVAL_OFFSET), padding="max_length",
                                     truncation=True, max_length=128, return_tensors="pt"))
    evaluation = padded_chunks(held_out, max(settings.minilm_batches))
    with torch.inference_mode():
        reference = pooled(torch.cat([model(*x)[0][:n] for x, n in evaluation]), held_out[1])

    def score(hidden: torch.Tensor) -> str:
        cos = (pooled(hidden, held_out[1]) * reference).sum(-1)
        return f"{cos.min():.4f} / {cos.mean():.4f}"

    layers = "" if settings.minilm_layers is None else f", its first {settings.minilm_layers} of 6 layers (--quick)"
    seq = torch.export.Dim("seq", max=512)
    batch = torch.export.Dim("batch", max=1024)
    return Workload(f"all-MiniLM-L6-v2{layers}, sequence 128", model, calibration[0], ({0: batch, 1: seq},) * 3,
                    calibration, {b: bert_inputs(latency_batch(tokenizer, b)) for b in settings.minilm_batches},
                    evaluation, f"cos min / mean ({settings.eval_sentences} held-out sentences)", score)


def pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the unmasked tokens, L2-normalised (``lowbit.embedded.embed``'s recipe): (N, T, H) -> (N, H)."""
    mask = mask.unsqueeze(-1).float()  # (N, T, 1)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)


def cnn_workload(settings: Settings) -> Workload:
    from lowbit.embedded import digits_data, train_digits_cnn

    x_train, y_train, x_test, y_test = digits_data()
    model = train_digits_cnn(x_train, y_train, epochs=settings.digits_epochs)
    x_test, y_test = x_test[: settings.test_images], y_test[: settings.test_images]
    evaluation = padded_chunks((x_test,), max(settings.cnn_batches))

    def score(logits: torch.Tensor) -> str:
        return f"{100 * (logits.argmax(-1) == y_test).float().mean():.1f}%"

    batches = {b: (x_test[:b],) for b in settings.cnn_batches}
    return Workload("digits CNN (Conv-BN-ReLU ResNet, 8x8 images)", model, (x_train[:16],),
                    ({0: torch.export.Dim("batch", max=1024)},), [(x,) for x in x_train[:256].split(64)], batches,
                    evaluation, f"top-1 ({len(y_test)} test images)", score)


# --- running and printing ---------------------------------------------------------------------------------------

def speedup(base: Optional[float], ms: float) -> str:
    return "-" if base is None else f"{base / ms:.2f}x"


def bench(work: Workload, config, settings: Settings, modes: list[str], tmp: Path) -> tuple[str, dict]:
    costs: dict[str, Costs] = {}
    model = work.model
    rows = [eager_row("fp32 eager", model),
            eager_row("fp32 compiled", torch.compile(model, dynamic=False), compiled=True),
            eager_row("bf16 compiled", torch.compile(copy.deepcopy(model).to(torch.bfloat16), dynamic=False),
                      cast_floats=torch.bfloat16, compiled=True)]
    rows += lowbit_rows(work, config, costs, tmp)
    if settings.torchao:
        rows += torchao_rows(work, costs)
    first_batch = work.batches[min(work.batches)]
    for row in rows:
        if row.compiled and row.run is not None:
            print(f"  {work.title}: compiling {row.name}", file=sys.stderr, flush=True)
            first_call(row, first_batch, modes[0])
    live = [r for r in rows if r.run is not None]
    accuracy = {}
    for row in live:
        try:
            with GRAD_MODES[modes[0]]():  # the mode the compiled models were compiled for
                outputs = torch.cat([row.run(x)[:n] for x, n in work.evaluation]).detach()
            accuracy[row.name] = work.score(outputs.clone())  # clone: out of inference mode
        except Exception as error:  # noqa: BLE001  (as in first_call)
            accuracy[row.name] = f"failed: {reason(error)}"
    sections, results = [], {}
    for mode in modes:
        for size, inputs in work.batches.items():
            calls, failed = {}, {}
            for row in live:  # one call each first: compiles this batch size and grad mode, or fails
                try:
                    with GRAD_MODES[mode]():
                        row.run(inputs)
                    calls[row.name] = Timed(lambda r=row: r.run(inputs), mode=mode)
                except Exception as error:  # noqa: BLE001  (as in first_call)
                    failed[row.name] = f"failed: {reason(error)}"
            timings = interleaved_ms(calls, rounds=settings.rounds, target_s=settings.target_s)
            results[mode, size] = {name: t.ms for name, t in timings.items()}
            bf16, fp32 = (timings[n].ms if n in timings else None for n in ("bf16 compiled", "fp32 compiled"))
            body = []
            for row in rows:
                t = timings.get(row.name)
                body.append([row.name, failed.get(row.name) or row.unavailable, "-", "-", "-", "-"] if t is None else
                            [row.name, f"{t.ms:.2f}", f"{100 * t.spread:.0f}%", speedup(bf16, t.ms),
                             speedup(fp32, t.ms), accuracy[row.name]])
            sections.append(f"### {work.title}, batch {size}, {MODES[mode]} ({config.label()}, "
                            f"{torch.get_num_threads()} threads, {settings.rounds} rounds)\n\n"
                            + table(["variant", "ms", "spread", "vs compiled bf16", "vs compiled fp32",
                                     work.accuracy_header], body))
    sections.append(costs_table(work, rows, costs, modes[0]))
    results["accuracy"] = accuracy
    results["costs"] = costs
    return "\n\n".join(sections), results


def costs_table(work: Workload, rows: list[Row], costs: dict, mode: str) -> str:
    def seconds(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.1f}"

    body = []
    for row in rows:
        flow = costs.get(row.name if row.name.startswith("ONNX") else row.name.split()[0], Costs())
        first_s = row.first_call_s if row.compiled else flow.extra.get("session s")
        body.append([row.name, seconds(flow.export_s), seconds(flow.quantize_s), seconds(first_s),
                     row.unavailable or flow.extra.get("lowered", row.lowered)])
    return (f"### Costs on {work.title}: seconds of export (torch.export / ONNX), of prepare + calibrate "
            f"({sum(len(x[0]) for x in work.calibration)} samples) + convert, and of the first call (compilation at "
            f"batch {min(work.batches)}, {MODES[mode]}; ONNX Runtime: creating the session); what was lowered in that "
            f"compilation (ONNX Runtime: its int8 ops after graph optimization)\n\n"
            + table(["variant", "export s", "prepare + calibrate + convert s", "first call s", "lowered"], body))


def targets(results: dict, modes: list[str]) -> str:
    """The issue's targets on MiniLM, from the run's numbers (a row that failed reads as missed)."""
    mixed, frozen = "lowbit int8-mixed-bf16 compiled", "lowbit int8-mixed-bf16 compiled, freezing"
    torchao_mixed = "torchao int8-mixed-bf16 compiled, freezing"
    lines = ["### Targets (MiniLM)", ""]

    def ratio(ms: dict, base: str, candidates: tuple[str, ...], goal: float, label: str, what: str) -> str:
        times = [ms[c] for c in candidates if c in ms]
        if base not in ms or not times:
            return f"{label}: not measured ({what}: MISSED)"
        value = ms[base] / min(times)
        return f"{label}: {value:.2f}x ({what}: {'met' if value >= goal else 'MISSED'})"

    for mode in modes:
        for size, ms in sorted((k[1], v) for k, v in results.items() if isinstance(k, tuple) and k[0] == mode):
            goal = 1.3 if size >= 32 else 1.15
            lines.append("- " + ratio(ms, "bf16 compiled", (mixed,), goal, f"{MODES[mode]}, batch {size}: "
                                      "int8-mixed-bf16 vs compiled bf16", f"target >= {goal}x"))
            lines.append("  - " + ratio(ms, "bf16 compiled", (frozen,), goal, "with freezing", f"target >= {goal}x"))
            if torchao_mixed in ms:
                lines.append("  - " + ratio(ms, torchao_mixed, (mixed, frozen), 1.0, "vs torchao's lowered "
                                            "int8-mixed-bf16 (the faster lowbit row)", "target > 1"))
            lines.append("  - " + ratio(ms, "ONNX Runtime fp32", ("ONNX Runtime int8",), 1.0,
                                        "ONNX Runtime int8 vs ONNX Runtime fp32", "target > 1"))
    quantize_s = results["costs"]["lowbit"].quantize_s
    lines.append(f"- prepare + calibrate + convert: {quantize_s:.1f} s (target < 10 s: "
                 f"{'met' if quantize_s < 10 else 'MISSED'})")
    for name in ("lowbit int8 compiled", "lowbit int8-mixed-bf16 compiled", "ONNX Runtime int8"):
        cell = results["accuracy"].get(name, "not measured")
        cos_min = float(cell.split(" / ")[0]) if cell[:1].isdigit() else None
        met = "met" if cos_min is not None and cos_min >= 0.995 else "MISSED"
        lines.append(f"- {name}: cos min {cell if cos_min is None else f'{cos_min:.4f}'} (target >= 0.995: {met})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--config", default="StaticInt8", choices=CONFIGS, help="the lowbit config (default arguments)")
    parser.add_argument("--modes", default=None, help=f"comma-separated, of {', '.join(MODES)} (default: both; "
                                                      f"--quick: grad)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, batch 1, no torchao: a smoke run")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    models, modes = args.models.split(","), (args.modes or ("grad" if args.quick else "grad,inference")).split(",")
    for given, known, what in ((models, MODELS, "models"), (modes, MODES, "modes")):
        unknown = sorted(set(given) - set(known))
        if unknown:
            parser.error(f"unknown {what} {unknown}; expected some of {', '.join(known)}")
    torch.set_num_threads(args.threads)
    torch._inductor.config.fx_graph_cache = False  # every first call compiles (and lowering counts what it replaced)
    torch._functorch.config.enable_autograd_cache = False
    settings = QUICK if args.quick else Settings()
    config = getattr(lowbit, args.config)()
    print(f"lowbit {lowbit.__version__}, torch {torch.__version__}, {args.threads} threads"
          f"{' (--quick)' if args.quick else ''}\n")
    if "grad" in modes:
        print("Plain calls: Inductor freezes only with grad mode off, so the rows marked freezing compile as without it "
              "there; the float models' parameters require grad (training graphs), lowbit's converted graphs hold none.\n")
    if settings.torchao:
        print("torchao's flow: the exported graph is dead-code-eliminated by hand before prepare_pt2e (as documented it "
              "raises IndexError on MiniLM's unused pooler); compiled with Inductor freezing (its rows only).\n")
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            start = time.perf_counter()
            torch.manual_seed(0)
            work = minilm_workload(settings) if name == "minilm" else cnn_workload(settings)
            text, results = bench(work, config, settings, modes, Path(tmp))
            print(text)
            if name == "minilm":
                print("\n" + targets(results, modes))
            print(f"\n({name}: {time.perf_counter() - start:.0f} s)\n", flush=True)


if __name__ == "__main__":
    main()
