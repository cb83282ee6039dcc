"""Quantization-aware training on real tasks: MiniLM distilled to its float self, the digits CNN, the cost of a step.

Run: python benchmarks/qat.py [--sections minilm,digits,step] [--quick] [--threads 2]

minilm: all-MiniLM-L6-v2 at int4 (groups of 32 and 128) and 3/2-bit weights (groups of 32), post-training
    (``quantize_``) against QAT (prepare, distil, convert; the converted model is the one evaluated). The student
    learns the float model's mean-pooled, normalised sentence embeddings (loss 1 - cosine) on docstring sentences of
    some standard library modules (sequence 64); evaluation is on sentences of other modules at sequence 128: cosine
    to the float embeddings (min, mean), retrieval top-1 agreement (each held-out sentence's nearest other
    held-out sentence under the float embeddings and under the quantized model's: the fraction that agree) and the
    fraction of the PTQ gap recovered, ``1 - (1 - cos mean QAT) / (1 - cos mean PTQ)``.
digits: the digits CNN (Conv-BN-ReLU, ``lowbit.embedded``) at StaticInt8 and at 3/2-bit per-channel weights: top-1
    of the float model, PTQ (BatchNorm folded first) and QAT (``fuse(qat=True)``, fine-tuned, BN statistics and
    static ranges frozen part way, converted); and the float model fine-tuned the same way, as a control.
step: one MiniLM training step (batch 16, sequence 64: forward, backward, AdamW step) float against QAT-prepared,
    timed interleaved (lowbit.bench.timing); peak memory of each in a fresh process (resident-set growth over the
    steps, from ``resource.getrusage``); the compiled QAT step against the compiled float one.

Every table is printed as markdown. Seeds are fixed; timings depend on the machine's load, accuracies do not.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import lowbit
from lowbit.bench.algorithms import retrieval_agreement, table
from lowbit.bench.timing import Timed, interleaved_ms
from lowbit.qat import QATConfig, freeze_bn_stats, freeze_ranges

SECTIONS = ("minilm", "digits", "step")
TRAIN_MODULES = (  # standard library modules whose docstrings are the training text (none of HELD_OUT_MODULES)
    "os", "subprocess", "argparse", "logging", "threading", "socket", "shutil", "tempfile", "typing", "asyncio",
    "tarfile", "pickle", "http.client", "email", "string", "textwrap", "datetime", "decimal", "inspect", "ast", "enum",
    "io", "multiprocessing", "concurrent.futures", "sqlite3", "ssl", "gzip", "bz2", "lzma", "hashlib", "uuid",
    "calendar", "locale", "gettext", "optparse", "configparser", "mailbox", "smtplib", "imaplib", "ftplib",
    "http.server", "http.cookies", "urllib.request", "xmlrpc.client", "ipaddress", "queue", "sched", "selectors",
    "codecs", "difflib", "pprint", "numbers", "operator", "weakref", "types", "traceback", "warnings", "pdb", "doctest",
    "timeit", "importlib", "tokenize", "dis", "pickletools", "shelve", "glob", "fnmatch", "filecmp", "fileinput",
    "base64", "html.parser", "xml.dom.minidom", "xml.etree.ElementTree", "zoneinfo", "graphlib", "secrets", "abc",
    "copyreg", "plistlib", "netrc", "mimetypes", "platform", "sysconfig", "zipimport", "pkgutil", "runpy",
)
HELD_OUT_MODULES = ("re", "json", "collections", "itertools", "functools", "pathlib", "random", "statistics", "heapq",
                    "bisect", "csv", "urllib.parse", "unittest", "dataclasses", "contextlib", "zipfile")
MINILM_CONFIGS = (lowbit.Int4WeightOnly(group_size=32), lowbit.Int4WeightOnly(group_size=128),
                  lowbit.IntxWeightOnly(bits=3, group_size=32), lowbit.IntxWeightOnly(bits=2, group_size=32))
RANGE_LEARNING_CONFIGS = (lowbit.Int4WeightOnly(group_size=128), lowbit.IntxWeightOnly(bits=2, group_size=32))
DIGITS_CONFIGS = (lowbit.StaticInt8(), lowbit.IntxWeightOnly(bits=3, group_size=None), lowbit.IntxWeightOnly(bits=2, group_size=None))
STEP_CONFIGS = {"float": None, "QAT Int4WeightOnly(group_size=128)": lowbit.Int4WeightOnly(group_size=128),
                "QAT Int8DynamicActivation()": lowbit.Int8DynamicActivation(), "QAT StaticInt8()": lowbit.StaticInt8()}
CONV_OR_LINEAR = lambda m, fqn: isinstance(m, (nn.Conv2d, nn.Linear))  # noqa: E731


@dataclass(frozen=True)
class Settings:
    """Sizes and hyperparameters of a run (``--quick`` shrinks them to seconds)."""

    train_sentences: int = 3072  # of TRAIN_MODULES, less any that are held out too
    eval_sentences: int = 512
    train_length: int = 64
    eval_length: int = 128
    batch: int = 32
    steps: int = 300
    lr: float = 1e-4
    range_lr: float = 1e-5  # Adam on learned scales / zero points: it moves each by about this much per step
    warmup: int = 10
    hidden_weight: float = 1.0  # weight of the last hidden states' relative squared error in the loss
    digits_epochs: int = 12  # the float model's training (train_digits_cnn)
    qat_epochs: int = 6
    qat_lr: float = 5e-4
    step_batch: int = 16
    step_rounds: int = 7
    memory_steps: int = 3
    compile: bool = True


QUICK = Settings(train_sentences=16, eval_sentences=24, batch=4, steps=2, warmup=1, digits_epochs=1, qat_epochs=2,
                 step_batch=2, step_rounds=1, memory_steps=1, compile=False)



# --- MiniLM: distillation ---------------------------------------------------------------------------------------

def pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the unmasked tokens of ``hidden`` (B, T, H), L2-normalised (``lowbit.embedded.embed``'s recipe)."""
    mask = mask.unsqueeze(-1).float()  # (B, T, 1)
    return F.normalize((hidden.float() * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)


def pooled_embeddings(model, batch: dict) -> torch.Tensor:
    return pool(model(**batch).last_hidden_state, batch["attention_mask"])


class Distillation:
    """The training sentences tokenized once (padded to ``train_length``) and the float model's last hidden states."""

    def __init__(self, teacher, tokenizer, sentences: list[str], settings: Settings):
        self.tokens = dict(tokenizer(sentences, padding="max_length", truncation=True, max_length=settings.train_length,
                                     return_tensors="pt"))
        self.settings = settings
        self.hidden = torch.zeros(len(sentences), settings.train_length, teacher.config.hidden_size)  # (N, T, H)
        with torch.inference_mode():
            for idx in torch.arange(len(sentences)).split(64):
                hidden = teacher(**self.batch(idx)).last_hidden_state  # (64, T', H), T' the longest of the 64
                self.hidden[idx, : hidden.shape[1]] = hidden
        self.targets = pool(self.hidden, self.tokens["attention_mask"])  # (N, H)

    def batch(self, idx: torch.Tensor) -> dict:
        """The sentences ``idx``, cut to the longest of them."""
        length = int(self.tokens["attention_mask"][idx].sum(1).max())
        return {name: t[idx, :length] for name, t in self.tokens.items()}

    def epoch(self, generator: torch.Generator, pool_batches: int = 32) -> list[torch.Tensor]:
        """One pass over the sentences in batches of ``batch``, each of sentences of similar lengths (less padding):
        shuffled, sorted by length within pools of ``pool_batches`` batches, batch order shuffled."""
        size, lengths = self.settings.batch, self.tokens["attention_mask"].sum(1)
        order = torch.randperm(len(lengths), generator=generator)
        batches = []
        for chunk in order.split(size * pool_batches):
            batches += list(chunk[lengths[chunk].argsort(stable=True)].split(size))
        batches = [b for b in batches if len(b) == size]  # whole batches only
        return [batches[i] for i in torch.randperm(len(batches), generator=generator)]

    def loss(self, student, idx: torch.Tensor) -> torch.Tensor:
        """1 - cosine of the sentence embeddings, plus ``hidden_weight`` x the relative squared error of the last
        hidden states (over real tokens)."""
        batch = self.batch(idx)
        hidden, mask = student(**batch).last_hidden_state, batch["attention_mask"]  # (B, T', H), (B, T')
        target, tokens = self.hidden[idx, : hidden.shape[1]], mask.unsqueeze(-1).float()
        relative = ((hidden - target).square() * tokens).sum() / (target.square() * tokens).sum()
        return (1 - (pool(hidden, mask) * self.targets[idx]).sum(-1)).mean() + self.settings.hidden_weight * relative

    def train(self, student, seed: int = 0) -> float:
        """Distil into ``student`` (AdamW, linear warm-up then cosine decay; learned ranges at ``range_lr``);
        returns the last step's loss."""
        s = self.settings
        student.eval()  # no dropout: the student matches the teacher's deterministic embeddings
        student.embeddings.requires_grad_(False)  # not quantized; training them would fit the training text's tokens
        trained = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
        ranges = [p for n, p in trained if n.endswith((".scale", ".zero_point"))]
        others = [p for n, p in trained if not n.endswith((".scale", ".zero_point"))]
        groups = [{"params": others, "lr": s.lr}] + ([{"params": ranges, "lr": s.range_lr}] if ranges else [])
        optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / s.warmup)
                                                     * 0.5 * (1 + math.cos(math.pi * i / s.steps)))
        generator = torch.Generator().manual_seed(seed)
        batches: list[torch.Tensor] = []
        for _ in range(s.steps):
            if not batches:
                batches = self.epoch(generator)
            loss = self.loss(student, batches.pop())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        return loss.item()



def training_sentences(count: int, held_out: list[str]) -> list[str]:
    """The first ``count`` sentences of :data:`TRAIN_MODULES` less those among ``held_out`` (modules share a few
    docstrings)."""
    from lowbit.embedded import stdlib_sentences

    excluded = set(held_out)
    return [s for s in stdlib_sentences(count, modules=TRAIN_MODULES) if s not in excluded]


def minilm_section(settings: Settings) -> str:
    from lowbit.embedded import embed, load_minilm, stdlib_sentences

    teacher, tokenizer = load_minilm()
    held_out = stdlib_sentences(settings.eval_sentences, modules=HELD_OUT_MODULES)
    reference = embed(teacher, tokenizer, held_out, max_length=settings.eval_length)
    data = Distillation(teacher, tokenizer, training_sentences(settings.train_sentences, held_out), settings)

    def evaluate(model) -> dict:
        emb = embed(model, tokenizer, held_out, max_length=settings.eval_length)
        cos = (emb * reference).sum(-1)
        return {"cos_min": cos.min().item(), "cos_mean": cos.mean().item(), "top1": retrieval_agreement(reference, emb)}

    rows = []
    variants = [(c, False) for c in MINILM_CONFIGS] + [(c, True) for c in RANGE_LEARNING_CONFIGS]
    for config, range_learning in variants:
        torch.manual_seed(0)
        ptq = evaluate(lowbit.quantize_(copy.deepcopy(teacher), config))
        student = lowbit.quantize_(copy.deepcopy(teacher), QATConfig(config, range_learning=range_learning))
        start = time.perf_counter()
        loss = data.train(student)
        seconds = time.perf_counter() - start
        lowbit.quantize_(student, QATConfig(config, step="convert", range_learning=range_learning))
        qat = evaluate(student)
        recovered = 1 - (1 - qat["cos_mean"]) / (1 - ptq["cos_mean"])
        label = config.label() + (" + range learning" if range_learning else "")
        rows.append([label, f"{ptq['cos_min']:.4f} / {ptq['cos_mean']:.4f}", f"{qat['cos_min']:.4f} / {qat['cos_mean']:.4f}",
                     f"{100 * ptq['top1']:.1f}% / {100 * qat['top1']:.1f}%", f"{100 * recovered:.0f}%",
                     f"{settings.steps}", f"{seconds:.0f}", f"{loss:.5f}"])
        print(f"  minilm {label}: PTQ {ptq} QAT {qat} recovered {recovered:.3f} in {seconds:.0f} s", file=sys.stderr)
    header = ["config", "PTQ cos min / mean", "QAT cos min / mean", "retrieval top-1 PTQ / QAT", "gap recovered",
              "steps", "train s", "last loss"]
    return (f"### all-MiniLM-L6-v2: PTQ vs QAT (distilled on {settings.train_sentences} sentences of "
            f"{len(TRAIN_MODULES)} modules at sequence {settings.train_length}, batch {settings.batch}, AdamW lr "
            f"{settings.lr:g}; evaluated on {settings.eval_sentences} sentences of {len(HELD_OUT_MODULES)} other "
            f"modules at sequence {settings.eval_length})\n\n" + table(header, rows))


# --- Digits CNN -------------------------------------------------------------------------------------------------

def top1(model, x, y) -> float:
    with torch.inference_mode():
        return (model(x).argmax(-1) == y).float().mean().item() * 100


def fine_tune(model, x, y, settings: Settings, on_epoch=lambda epoch: None, seed: int = 0) -> nn.Module:
    """Adam at ``qat_lr`` with cosine decay over ``qat_epochs``, batches of 64; ``on_epoch(e)`` before epoch e."""
    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.qat_lr)
    batches = math.ceil(len(y) / 64)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings.qat_epochs * batches)
    for epoch in range(settings.qat_epochs):
        on_epoch(epoch)
        for batch in torch.randperm(len(y)).split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def digits_section(settings: Settings) -> str:
    from lowbit.embedded import digits_data, train_digits_cnn

    x_train, y_train, x_test, y_test = digits_data()
    trained = train_digits_cnn(x_train, y_train, epochs=settings.digits_epochs)
    float_top1 = top1(trained, x_test, y_test)
    control = fine_tune(copy.deepcopy(trained), x_train, y_train, settings)
    freeze_bn_at, freeze_ranges_at = settings.qat_epochs // 2, (3 * settings.qat_epochs) // 4
    rows = []
    for config in DIGITS_CONFIGS:
        ptq = lowbit.fuse(copy.deepcopy(trained).eval())
        if isinstance(config, lowbit.StaticInt8):
            lowbit.prepare(ptq, config, filter_fn=CONV_OR_LINEAR)
            lowbit.calibrate(ptq, [x_train[b] for b in torch.arange(512).split(64)], progress=False)
            lowbit.convert(ptq)
        else:
            lowbit.quantize_(ptq, config, filter_fn=CONV_OR_LINEAR)
        qat = lowbit.fuse(copy.deepcopy(trained).train(), qat=True)
        lowbit.quantize_(qat, QATConfig(config), filter_fn=CONV_OR_LINEAR)

        def on_epoch(epoch, qat=qat):
            if epoch == freeze_bn_at:
                freeze_bn_stats(qat)
            if epoch == freeze_ranges_at:
                freeze_ranges(qat)

        start = time.perf_counter()
        fine_tune(qat, x_train, y_train, settings, on_epoch)
        seconds = time.perf_counter() - start
        lowbit.quantize_(qat, QATConfig(config, step="convert"))
        rows.append([config.label(), f"{float_top1:.2f}%", f"{top1(ptq, x_test, y_test):.2f}%",
                     f"{top1(qat, x_test, y_test):.2f}%", f"{top1(control, x_test, y_test):.2f}%", f"{seconds:.1f}"])
    header = ["config", "float top-1", "PTQ top-1", "QAT top-1", "float fine-tuned alike", "QAT s"]
    return (f"### Digits CNN (Conv-BN-ReLU, {len(y_test)} test images): QAT fine-tunes the trained float model "
            f"{settings.qat_epochs} epochs (Adam lr {settings.qat_lr:g}, cosine), BN statistics frozen from epoch "
            f"{freeze_bn_at}, static ranges from epoch {freeze_ranges_at}\n\n" + table(header, rows))


# --- Cost of a training step ------------------------------------------------------------------------------------

def step_setup(name: str, settings: Settings, loaded=None):
    """(model, one-training-step callable) of a variant of :data:`STEP_CONFIGS`, on a fixed batch; the model is a
    copy of ``loaded`` = (MiniLM, tokenizer) when given."""
    from lowbit.embedded import load_minilm, stdlib_sentences

    torch.manual_seed(0)
    base, tokenizer = loaded or load_minilm()
    model = copy.deepcopy(base).train()
    config = STEP_CONFIGS[name]
    if config is not None:
        lowbit.quantize_(model, QATConfig(config))
    batch = dict(tokenizer(stdlib_sentences(settings.step_batch, modules=TRAIN_MODULES), padding="max_length",
                           truncation=True, max_length=settings.train_length, return_tensors="pt"))
    target = F.normalize(torch.randn(settings.step_batch, model.config.hidden_size), dim=-1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step(forward=model):
        loss = (1 - (pooled_embeddings(forward, batch) * target).sum(-1)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return model, step


def peak_memory(name: str, settings: Settings) -> dict:
    """In this (fresh) process: the resident set before the steps and its peak during ``memory_steps`` steps, MiB.

    The peak is Linux's high-water mark of this address space (``VmHWM``), reset to the current resident set just
    before the steps (``/proc/self/clear_refs``); ``getrusage``'s ``ru_maxrss`` is no use here, as it keeps the
    parent's peak across fork and exec."""
    _, step = step_setup(name, settings)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset the peak resident set
    before = _status_mib("VmRSS")
    for _ in range(settings.memory_steps):
        step()
    return {"before": before, "peak": _status_mib("VmHWM")}


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 1024


def step_section(settings: Settings, threads: int, quick: bool) -> str:
    from lowbit.embedded import load_minilm

    probes = {}  # fresh processes, one per variant, started now (their memory does not depend on what else runs)
    for name in STEP_CONFIGS:
        command = [sys.executable, __file__, "--memory-of", name, "--threads", "1"] + (["--quick"] if quick else [])
        probes[name] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    memory = {}
    for name, probe in probes.items():
        out, err = probe.communicate()
        if probe.returncode:
            raise RuntimeError(f"the memory probe of {name!r} failed:\n{err}")
        memory[name] = json.loads(out.splitlines()[-1])
    loaded = load_minilm()
    setups = {name: step_setup(name, settings, loaded) for name in STEP_CONFIGS}
    calls = {name: Timed(step, mode="grad") for name, (_, step) in setups.items()}
    timings = interleaved_ms(calls, rounds=settings.step_rounds, target_s=0.0, warmup=2)
    base = timings["float"].ms
    rows = [[name, f"{t.ms:.0f}", f"{100 * t.spread:.0f}%", f"{t.ms / base:.2f}x", f"{memory[name]['peak']:.0f}",
             f"{memory[name]['peak'] - memory[name]['before']:.0f}"] for name, t in timings.items()]
    if settings.compile:
        rows += compiled_rows(setups, settings)
    header = ["step", "ms", "spread", "vs float", "peak RSS MiB", "growth over the steps MiB"]
    note = "" if settings.compile else "\n\n(compiled steps skipped: --quick)"
    return (f"### Cost of a QAT training step: all-MiniLM-L6-v2, batch {settings.step_batch}, sequence "
            f"{settings.train_length}, forward + backward + AdamW step, {threads} threads (time interleaved, "
            f"{settings.step_rounds} rounds; memory: peak resident set of a fresh process per variant over "
            f"{settings.memory_steps} steps, and its growth from before the first step)\n\n" + table(header, rows) + note)


def compiled_rows(setups: dict, settings: Settings) -> list[list[str]]:
    """The float and int4 QAT steps with ``torch.compile(model)`` (the optimizer step stays eager)."""
    names = ("float", "QAT Int4WeightOnly(group_size=128)")
    calls, compile_s = {}, {}
    for name in names:
        model, step = setups[name]
        compiled = torch.compile(model)
        start = time.perf_counter()
        step(compiled)
        compile_s[name] = time.perf_counter() - start
        calls[f"compiled {name}"] = Timed(lambda s=step, c=compiled: s(c), mode="grad")
    timings = interleaved_ms(calls, rounds=settings.step_rounds, target_s=0.0, warmup=3)  # the 2nd and 3rd calls still compile
    base = timings["compiled float"].ms
    return [[f"{name} (first call {compile_s[name.removeprefix('compiled ')]:.0f} s)", f"{t.ms:.0f}",
             f"{100 * t.spread:.0f}%", f"{t.ms / base:.2f}x (vs compiled float)", "-", "-"] for name, t in timings.items()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of seconds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, help="MiniLM distillation steps per config")
    parser.add_argument("--lr", type=float, help="MiniLM distillation learning rate")
    parser.add_argument("--memory-of", choices=list(STEP_CONFIGS), help="(internal) one variant's peak memory, as JSON")
    args = parser.parse_args(argv)
    sections = args.sections.split(",")
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; expected some of {', '.join(SECTIONS)}")
    torch.set_num_threads(args.threads)
    settings = QUICK if args.quick else Settings()
    settings = replace(settings, **{k: v for k, v in (("steps", args.steps), ("lr", args.lr)) if v is not None})
    if args.memory_of:
        print(json.dumps(peak_memory(args.memory_of, settings)))
        return
    print(f"lowbit {lowbit.__version__}, torch {torch.__version__}, {args.threads} threads{' (--quick)' if args.quick else ''}\n")
    for section in sections:
        start = time.perf_counter()
        if section == "minilm":
            print(minilm_section(settings))
        elif section == "digits":
            print(digits_section(settings))
        else:
            print(step_section(settings, args.threads, args.quick))
        print(f"\n({section}: {time.perf_counter() - start:.0f} s)\n", flush=True)


if __name__ == "__main__":
    main()
