"""Malformed checkpoints with valid CRCs: each case edits one field of a valid file (recomputing the CRCs of
edited tensors) and must raise CheckpointError naming the tensor and field, leaving the model unchanged."""

from __future__ import annotations

import importlib.util
import json
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

import lowbit
from lowbit.serialization import CheckpointError, describe, meta_parameters
from lowbit.specs import spec_to_json

FIXTURES = Path(__file__).parents[1] / "fixtures"
VALID = FIXTURES / "format_v3.safetensors"  # one layer per scheme (see make_fixture.py)
VALID_V1 = FIXTURES / "format_v1.safetensors"  # config labels and kernel names in the header


def _fixture_model_class():
    spec = importlib.util.spec_from_file_location("make_fixture", FIXTURES / "make_fixture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FixtureModel


FixtureModel = _fixture_model_class()


# -- editing a valid file ----------------------------------------------------------------------
def crc32(t: torch.Tensor) -> int:
    return zlib.crc32(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def rewrite(src: Path, out: Path, tensors=None, header=None) -> Path:
    """Copy ``src`` with ``tensors(dict)`` and ``header(dict)`` applied to its tensors and lowbit header,
    the CRC32 of every tensor recomputed."""
    with safe_open(str(src), "pt") as f:
        data = {name: f.get_tensor(name) for name in f.keys()}
        lowbit_header = json.loads(f.metadata()["lowbit"])
    if tensors is not None:
        tensors(data)
    if header is not None:
        header(lowbit_header)
    lowbit_header["crc32"] = {name: crc32(t) for name, t in data.items()}
    save_file(data, str(out), metadata={"lowbit": json.dumps(lowbit_header)})
    return out


def rewrite_table(src: Path, out: Path, edit) -> Path:
    """Copy ``src`` with its safetensors JSON table edited as text by ``edit(str) -> str`` (data unchanged)."""
    raw = src.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    table = edit(raw[8 : 8 + length].decode()).encode()
    table += b" " * (-len(table) % 8)
    out.write_bytes(len(table).to_bytes(8, "little") + table + raw[8 + length :])
    return out


def entry(header: dict, name: str) -> dict:
    """The header entry of ``name``; ``a::weight`` is the inner weight of wrapper ``a``."""
    outer, _, inner = name.partition("::")
    found = header["entries"][outer]
    return found["tensors"]["weight"] if inner else found


def set_value(name: str, *path, value):
    """Set a field of an entry, e.g. ``set_value("int8.weight", "meta", "qtype", value="int4")``."""

    def edit(header):
        node = entry(header, name)
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return edit


def set_element(file_name: str, index, value):
    def edit(data):
        data[file_name] = data[file_name].clone()
        data[file_name][index] = value

    return edit


def replace_tensor(file_name: str, make):
    def edit(data):
        data[file_name] = make(data[file_name])

    return edit


def add_tensor(name: str, field: str, tensor: torch.Tensor) -> dict:
    """Edits adding an inner tensor ``field`` to entry ``name`` (file name ``<name>::<field>``)."""

    def edit(data):
        data[f"{name}::{field}"] = tensor

    def edit_header(header):
        entry(header, name)["tensors"][field] = f"{name}::{field}"

    return {"tensors": edit, "header": edit_header}


def remove_tensor(name: str, field: str) -> dict:
    """Edits removing the inner tensor ``field`` of entry ``name`` from the header and the file."""

    def edit(data):
        del data[f"{name}::{field}"]

    def edit_header(header):
        del entry(header, name)["tensors"][field]

    return {"tensors": edit, "header": edit_header}


# -- the model is left exactly as it was ------------------------------------------------------
def build(target: str) -> nn.Module:
    if target == "float":
        return FixtureModel()
    with meta_parameters():
        return FixtureModel()


def snapshot(model: nn.Module):
    state = {n: (t, None if t.is_meta else t.detach().clone()) for n, t in model.state_dict(keep_vars=True).items()}
    return state, [(n, m, type(m), dict(vars(m))) for n, m in model.named_modules()]


def assert_unchanged(model: nn.Module, snap) -> None:
    state, modules = snap
    now = model.state_dict(keep_vars=True)
    assert list(now) == list(state)
    for name, (tensor, copy) in state.items():
        assert now[name] is tensor, name
        assert copy is None or torch.equal(tensor.detach(), copy), name
    assert [(n, m, type(m), dict(vars(m))) for n, m in model.named_modules()] == modules


def assert_rejected(path: Path, message: str, target: str = "float") -> None:
    model = build(target)
    snap = snapshot(model)
    with pytest.raises(CheckpointError, match=message):
        lowbit.load(model, path)
    assert_unchanged(model, snap)


def test_valid_fixture_loads():
    """The base of every case below passes all checks (rewriting alone changes nothing)."""
    lowbit.load(FixtureModel(), VALID)


def test_rewritten_unchanged_file_loads(tmp_path):
    lowbit.load(FixtureModel(), rewrite(VALID, tmp_path / "same.safetensors"))


# -- 5. scales, smoothing divisors and zero points -------------------------------------------
NAN, INF = float("nan"), float("inf")
BAD_VALUES = {  # file tensor, index, value, message
    "nan scale": ("int8.weight::scale", (3, 1), NAN, "'int8.weight': field 'tensors.scale'.*finite positive.*nan at index \\[3, 1\\]"),
    "inf scale": ("float8_weight.weight::scale", (0, 0), INF, "'float8_weight.weight': field 'tensors.scale'.*inf"),
    "-inf scale": ("embed.weight::scale", (4, 0), -INF, "'embed.weight': field 'tensors.scale'.*-inf"),
    "zero scale": ("int4.weight::scale", (5, 0), 0.0, "'int4.weight': field 'tensors.scale'.*received 0.0 at index \\[5, 0\\]"),
    "negative scale": ("int4_sym.weight::scale", (1, 1), -0.25, "'int4_sym.weight': field 'tensors.scale'.*-0.25"),
    "negative scale inside a wrapper": ("dynamic.weight::weight::scale", (2, 0), -0.5,
                                        "'dynamic.weight::weight': field 'tensors.scale'.*-0.5"),
    "scale of a module swap": ("swapped.weight::scale", (0, 0), NAN, "'swapped.weight': field 'tensors.scale'"),
    "nan act_scale": ("static.weight::act_scale", (), NAN, "'static.weight': field 'tensors.act_scale'.*nan"),
    "zero act_scale": ("static.weight::act_scale", (), 0.0, "'static.weight': field 'tensors.act_scale'.*0.0"),
    "negative act_scale": ("static.weight::act_scale", (), -0.1, "'static.weight': field 'tensors.act_scale'.*-0.1"),
    "zero act_smooth": ("static.weight::act_smooth", (7,), 0.0, "'static.weight': field 'tensors.act_smooth'.*index \\[7\\]"),
    "inf act_smooth": ("static.weight::act_smooth", (0,), INF, "'static.weight': field 'tensors.act_smooth'.*inf"),
    "negative act_smooth": ("static.weight::act_smooth", (63,), -1.0, "'static.weight': field 'tensors.act_smooth'.*-1.0"),
    "zero point above uint4": ("int4.weight::zero_point", (1, 1), 16,
                               "'int4.weight': field 'tensors.zero_point'.*\\[0, 15\\] \\(uint4\\).*received 16"),
}


@pytest.mark.parametrize("target", ["float", "meta"])
@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_values_are_rejected(case, target, tmp_path):
    file_name, index, value, message = BAD_VALUES[case]
    bad = rewrite(VALID, tmp_path / "bad.safetensors", tensors=set_element(file_name, index, value))
    assert_rejected(bad, message, target)


# -- 6. inner tensors: presence, dtype and shape against the scheme ---------------------------
BAD_INNER = {
    "zero point stored as float32": (
        {"tensors": replace_tensor("int4.weight::zero_point", lambda t: t.float())},
        "'int4.weight': field 'tensors.zero_point'.*expected shape \\[64, 2\\] uint8; received \\[64, 2\\] float32"),
    "zero point stored as int8": (
        {"tensors": replace_tensor("int4.weight::zero_point", lambda t: t.to(torch.int8))},
        "'int4.weight': field 'tensors.zero_point'.*uint8; received.*int8"),
    "zero point missing on uint4": (
        remove_tensor("int4.weight", "zero_point"),
        "'int4.weight': field 'tensors.zero_point': expected a zero_point tensor \\(uint4 values are offset.*received none"),
    "zero point on symmetric int4": (
        add_tensor("int4_sym.weight", "zero_point", torch.full((64, 2), 8, dtype=torch.int8)),
        "'int4_sym.weight': field 'tensors.zero_point': expected no zero_point \\(int4 is symmetric\\)"),
    "zero point on int8": (
        add_tensor("int8.weight", "zero_point", torch.zeros(64, 2, dtype=torch.int8)),
        "'int8.weight': field 'tensors.zero_point': expected no zero_point \\(int8 is symmetric\\)"),
    "zero point on float8": (
        add_tensor("float8_weight.weight", "zero_point", torch.zeros(64, 1, dtype=torch.float8_e4m3fn)),
        "'float8_weight.weight': field 'tensors.zero_point': expected no zero_point"),
    "zero point in a wrapped int8 weight": (
        add_tensor("dynamic.weight::weight", "zero_point", torch.zeros(64, 1, dtype=torch.int8)),
        "'dynamic.weight::weight': field 'tensors.zero_point': expected no zero_point"),
    "scale stored as int32": (
        {"tensors": replace_tensor("int8.weight::scale", lambda t: t.to(torch.int32))},
        "'int8.weight': field 'tensors.scale'.*float32/bfloat16/float16; received \\[64, 2\\] int32"),
    "act_zero_point missing on asymmetric activations": (
        remove_tensor("static.weight", "act_zero_point"),
        "'static.weight': field 'tensors.act_zero_point': expected a act_zero_point tensor \\(asymmetric"),
    "act_zero_point stored as float32": (
        {"tensors": replace_tensor("static.weight::act_zero_point", lambda t: t.float())},
        "'static.weight': field 'tensors.act_zero_point'.*expected shape \\[\\] int8; received \\[\\] float32"),
    "act_scale of shape (1,)": (
        {"tensors": replace_tensor("static.weight::act_scale", lambda t: t.reshape(1))},
        "'static.weight': field 'tensors.act_scale'.*expected shape \\[\\].*received \\[1\\]"),
    "act_smooth of the wrong length": (
        {"tensors": replace_tensor("static.weight::act_smooth", lambda t: t[:32].clone())},
        "'static.weight': field 'tensors.act_smooth'.*expected shape \\[64\\].*received \\[32\\]"),
    "act_smooth stored as int32": (
        {"tensors": replace_tensor("static.weight::act_smooth", lambda t: t.to(torch.int32))},
        "'static.weight': field 'tensors.act_smooth'.*received \\[64\\] int32"),
    "activation qtype not the weight's": (
        {"header": set_value("float8.weight", "meta", "activation", "ActivationQuant", "qtype", value="int8")},
        "'float8.weight': field 'meta.activation': expected the weight's qtype 'float8_e4m3fn'"),
    "static activations per token": (
        {"header": set_value("static.weight", "meta", "activation", "ActivationQuant", "granularity", value="per_token")},
        "'static.weight': field 'meta.activation'.*per_tensor"),
    "groups on a linear weight": (
        {"header": set_value("int8.weight", "meta", "groups", value=2)},
        "'int8.weight': field 'meta.groups'"),
    "scheme not the class's": (
        {"header": set_value("int8.weight", "scheme", value="int4")},
        "'int8.weight': field 'scheme': expected 'int8'.*received 'int4'"),
    "wrapper scheme not its weight's": (
        {"header": set_value("static.weight", "scheme", value="float8_static")},
        "'static.weight': field 'scheme': expected 'int8_static'"),
}


@pytest.mark.parametrize("target", ["float", "meta"])
@pytest.mark.parametrize("case", list(BAD_INNER))
def test_inner_tensors_follow_the_scheme(case, target, tmp_path):
    edits, message = BAD_INNER[case]
    assert_rejected(rewrite(VALID, tmp_path / "bad.safetensors", **edits), message, target)


@pytest.fixture(scope="module")
def static_float8(tmp_path_factory) -> tuple[Path, type]:
    """A checkpoint with symmetric static activations (StaticFloat8) and the model class it loads into."""

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 32)

        def forward(self, x):
            return self.fc(x)

    model = lowbit.prepare(Two(), lowbit.StaticFloat8())
    lowbit.calibrate(model, [torch.randn(4, 64) for _ in range(2)], progress=False)
    return lowbit.save(lowbit.convert(model), tmp_path_factory.mktemp("static") / "f8.safetensors"), Two


@pytest.mark.parametrize("zero_point", [torch.zeros((), dtype=torch.int8), torch.zeros((), dtype=torch.float8_e4m3fn)])
def test_act_zero_point_on_symmetric_activations_is_rejected(zero_point, static_float8, tmp_path):
    path, cls = static_float8
    lowbit.load(cls(), path)
    bad = rewrite(path, tmp_path / "bad.safetensors", **add_tensor("fc.weight", "act_zero_point", zero_point))
    model = cls()
    snap = snapshot(model)
    with pytest.raises(CheckpointError, match="'fc.weight': field 'tensors.act_zero_point': expected no act_zero_point "
                                              "\\(the activations are symmetric\\)"):
        lowbit.load(model, bad)
    assert_unchanged(model, snap)


# -- 7. specs ---------------------------------------------------------------------------------
def _spec(config) -> dict:
    return spec_to_json(config.spec())


def _edited(config, part: str, **changes) -> dict:
    spec = _spec(config)
    spec[part] = {**spec[part], **changes}
    return spec


BAD_SPECS = {  # entry, spec, message
    "not an object": ("int8.weight", "Int8WeightOnly()", "'int8.weight': field 'spec': expected an object"),
    "missing field": ("int8.weight", {"weight": _spec(lowbit.Int8WeightOnly())["weight"]}, "'int8.weight': field 'spec'"),
    "extra field": ("int8.weight", {**_spec(lowbit.Int8WeightOnly()), "code": "os.system"}, "'int8.weight': field 'spec'"),
    "string for an int": ("int4.weight", _edited(lowbit.Int4WeightOnly(group_size=32), "weight", group_size="32"),
                          "'int4.weight': field 'spec': weight.group_size: expected int \\| None; received '32'"),
    "bool for an int": ("int4.weight", _edited(lowbit.Int4WeightOnly(group_size=32), "weight", group_size=True),
                        "'int4.weight': field 'spec': weight.group_size"),
    "invalid spec": ("int4.weight", _edited(lowbit.Int4WeightOnly(group_size=32), "weight", symmetric=True),
                     "'int4.weight': field 'spec': uint4 weights are affine"),
    "unknown scheme": ("int8.weight", _edited(lowbit.Int8WeightOnly(group_size=32), "weight", scheme="int9"),
                       "'int8.weight': field 'spec': unknown scheme|no 'none' activation scheme"),
    "int4 spec on an int8 tensor": ("int8.weight", _spec(lowbit.Int4WeightOnly(group_size=32)),
                                    "'int8.weight': field 'spec'.*gives scheme int4; the tensor has scheme int8"),
    "weight-only spec on a dynamic tensor": ("dynamic.weight", _spec(lowbit.Int8WeightOnly()), "'dynamic.weight': field 'spec'.*scheme"),
    "spec of a module swap": ("swapped.weight", _spec(lowbit.Float8WeightOnly()), "'swapped.weight': field 'spec'.*scheme"),
    "symmetric spec on uint4": ("int4.weight", _spec(lowbit.Int4WeightOnly(group_size=32, symmetric=True)),
                                "'int4.weight': field 'spec'.*qtype int4; the tensor has qtype uint4"),
    "other float8 dtype": ("float8_weight.weight", _spec(lowbit.Float8WeightOnly(float8_dtype=torch.float8_e5m2)),
                           "'float8_weight.weight': field 'spec'.*qtype float8_e5m2"),
    "other group size": ("int4.weight", _spec(lowbit.Int4WeightOnly(group_size=64)),
                         "'int4.weight': field 'spec'.*block_size \\(1, 64\\).*; the tensor has block_size \\(1, 32\\)"),
    "per-group spec on per-channel": ("embed.weight", _spec(lowbit.Int8WeightOnly(group_size=32)), "'embed.weight': field 'spec'.*block_size"),
    "group size that does not divide": ("int4.weight", _spec(lowbit.Int4WeightOnly(group_size=256)), "'int4.weight': field 'spec'.*block_size"),
    "other activation symmetry": ("dynamic.weight", _spec(lowbit.Int8DynamicActivation(act_symmetric=True)),
                                  "'dynamic.weight': field 'spec'.*activation.*symmetric=True"),
    "static symmetric spec on asymmetric": ("static.weight", _spec(lowbit.StaticInt8(act_symmetric=True)),
                                            "'static.weight': field 'spec'.*activation"),
    "no smoothing in the spec": ("static.weight", _spec(lowbit.StaticInt8(smoothing=None)),
                                 "'static.weight': field 'spec'.*act_smooth absent; the tensor has act_smooth present"),
}


@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_spec_is_read_strictly_and_agrees_with_its_tensor(case, tmp_path):
    name, spec, message = BAD_SPECS[case]
    bad = rewrite(VALID, tmp_path / "bad.safetensors", header=set_value(name, "spec", value=spec))
    assert_rejected(bad, message)
    with pytest.raises(CheckpointError, match=message):
        describe(bad)


EVERY_FIELD_SET = [  # one config per class with each field off its default
    lowbit.Int8WeightOnly(group_size=32, kernel="reference"),
    lowbit.Int4WeightOnly(group_size=64, symmetric=True, kernel="reference"),
    lowbit.IntxWeightOnly(bits=5, group_size=64, symmetric=True, kernel="reference"),
    lowbit.Int8DynamicActivation(act_symmetric=True, group_size=32, kernel="reference"),
    lowbit.Float8WeightOnly(float8_dtype=torch.float8_e5m2, kernel="reference"),
    lowbit.Float8DynamicActivation(granularity="per_tensor", float8_dtype=torch.float8_e5m2, kernel="reference"),
    lowbit.StaticInt8(act_symmetric=True, smoothing=0.5, kernel="reference"),
    lowbit.StaticInt8(observer="minmax", smoothing=None),
    lowbit.StaticFloat8(float8_dtype=torch.float8_e5m2, observer="percentile", kernel="reference"),
]


def test_every_config_spec_round_trips_through_json():
    assert {type(c) for c in EVERY_FIELD_SET} == set(lowbit.configs.CONFIGS + lowbit.configs.STATIC_CONFIGS)
    for config in EVERY_FIELD_SET:
        encoded = json.loads(json.dumps(spec_to_json(config.spec())))
        assert lowbit.specs.spec_from_json(encoded) == config.spec()


def test_format_2_holds_no_kernel_and_format_1_no_spec(tmp_path):
    """Kernels are chosen where a model runs: a format-2 entry naming one is refused, a format-1 file's kernel is
    read and ignored (load's ``kernel`` decides); a spec belongs to format 2 only."""
    kernel = rewrite(VALID, tmp_path / "kernel.safetensors", header=set_value("int8.weight", "meta", "kernel", value="onednn"))
    assert_rejected(kernel, "'int8.weight': field 'meta': expected.*received.*'kernel'")
    spec = rewrite(VALID_V1, tmp_path / "spec.safetensors", header=set_value("int8.weight", "spec", value=_spec(lowbit.Int8WeightOnly())))
    with pytest.raises(CheckpointError, match="'int8.weight': field 'spec' is not part of format 1"):
        lowbit.load(FixtureModel(smoothed=False), spec)
    named = rewrite(VALID_V1, tmp_path / "named.safetensors", header=set_value("int8.weight", "meta", "kernel", value="no-such-kernel"))
    assert lowbit.load(FixtureModel(smoothed=False), named).int8.weight.kernel == "auto"
    assert lowbit.load(FixtureModel(), VALID, kernel="reference").int8.weight.kernel == "reference"


# -- 8. types of header fields, deep nesting ---------------------------------------------------
STRING_FIELDS = {  # entry and path of a field holding a string -> message naming it
    ("int8.weight", "class"): "'int8.weight': field 'class'",
    ("int8.weight", "scheme"): "'int8.weight': field 'scheme'",
    ("int8.weight", "dtype"): "'int8.weight': field 'dtype'",
    ("swapped.weight", "module"): "'swapped.weight': field 'module'",
    ("int8.weight", "meta", "qtype"): "'int8.weight': field 'meta.qtype'",
    ("int8.weight", "tensors", "scale"): "'int8.weight': field 'tensors.scale'",
    ("dynamic.weight::weight", "class"): "'dynamic.weight::weight': field 'class'",
    ("dynamic.weight::weight", "tensors", "qdata"): "'dynamic.weight::weight': field 'tensors.qdata'",
    ("dynamic.weight", "meta", "activation", "ActivationQuant", "qtype"): "'dynamic.weight': field 'meta.activation'",
    ("dynamic.weight", "meta", "activation", "ActivationQuant", "granularity"): "'dynamic.weight': field 'meta.activation'",
    ("norm.weight", "tensor"): "'norm.weight': field 'tensor'",
    ("int8.bias", "tied_to"): "'int8.bias': field 'tied_to'",
}


@pytest.mark.parametrize("value", [["int8"], {"int8": 1}], ids=["list", "object"])
@pytest.mark.parametrize("field", list(STRING_FIELDS), ids=".".join)
def test_list_or_object_for_a_string_is_rejected(field, value, tmp_path):
    name, *path = field
    if path == ["tied_to"]:
        edit = lambda header: header["entries"].__setitem__(name, {"tied_to": value})  # noqa: E731
    else:
        edit = set_value(name, *path, value=value)
    assert_rejected(rewrite(VALID, tmp_path / "bad.safetensors", header=edit), STRING_FIELDS[field])


OTHER_TYPES = {
    "bool symmetric as a string": (set_value("dynamic.weight", "meta", "activation", "ActivationQuant", "symmetric", value="no"),
                                   "'dynamic.weight': field 'meta.activation'.*'symmetric': bool"),
    "packed_dim as a string": (set_value("int4.weight", "meta", "packed_dim", value="1"), "'int4.weight': field 'meta.packed_dim'"),
    "groups as a float": (set_value("int8.weight", "meta", "groups", value=1.0), "'int8.weight': field 'meta.groups'"),
    "block size of strings": (set_value("int8.weight", "meta", "block_size", value=["1", "32"]), "'int8.weight': field 'meta.block_size'"),
    "unknown entry field": (set_value("int8.weight", "extra", value=1), "'int8.weight': expected the fields"),
    "format_version true": (lambda header: header.__setitem__("format_version", True), "'format_version'.*received True"),
}


@pytest.mark.parametrize("case", list(OTHER_TYPES))
def test_field_of_another_type_is_rejected(case, tmp_path):
    edit, message = OTHER_TYPES[case]
    assert_rejected(rewrite(VALID, tmp_path / "bad.safetensors", header=edit), message)


def test_list_for_a_stored_dtype_is_rejected(tmp_path):
    bad = rewrite_table(VALID, tmp_path / "bad.safetensors", lambda table: table.replace('"dtype":"I8"', '"dtype":["I8"]', 1))
    assert_rejected(bad, "tensor '.*': field 'dtype': expected one of.*received \\['I8'\\]")


@pytest.mark.parametrize("edit, message", [
    (lambda header: header.__setitem__("model", ["FixtureModel"]), "'model': expected a JSON object or null"),
    (lambda header: header["model"].__setitem__("class", {"FixtureModel": 1}), "'model.class': expected a string"),
    (lambda header: header.__setitem__("lowbit_version", [0, 1]), "'lowbit_version': expected a string"),
], ids=["model", "model.class", "lowbit_version"])
def test_describe_checks_the_header_records_it_reports(edit, message, tmp_path):
    with pytest.raises(CheckpointError, match=message):
        describe(rewrite(VALID, tmp_path / "bad.safetensors", header=edit))


def test_load_pretrained_checks_the_model_dtype_type(tmp_path):
    pytest.importorskip("transformers")
    directory = tmp_path / "mlp"
    directory.mkdir()
    edit = lambda header: header.__setitem__("model", {"class": "LlamaForCausalLM", "dtype": ["float32"]})  # noqa: E731
    rewrite(VALID, directory / "model.safetensors", header=edit)
    with pytest.raises(CheckpointError, match="'model.dtype'.*\\['float32'\\]"):
        lowbit.load_pretrained(directory)


DEPTH = 100_000


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("where", ["lowbit header", "header field", "safetensors table"])
def test_deeply_nested_json_is_rejected(where, tmp_path):
    out = tmp_path / "bad.safetensors"
    if where == "lowbit header":  # the header string itself
        deep_header = {"lowbit": _deep(DEPTH)}
        bad = rewrite_table(VALID, out, lambda table: json.dumps({**json.loads(table), "__metadata__": deep_header}))
        message = "lowbit header is corrupt, not JSON"
    elif where == "header field":  # a field inside the (otherwise valid) header string
        def edit(table):
            parsed = json.loads(table)
            metadata = parsed["__metadata__"]
            metadata["lowbit"] = metadata["lowbit"].replace('"block_size":', f'"block_size":{_deep(DEPTH)},"x":', 1)
            return json.dumps(parsed)

        bad, message = rewrite_table(VALID, out, edit), "lowbit header is corrupt, not JSON"
    else:  # outside the lowbit header, in the container's own JSON
        bad = rewrite_table(VALID, out, lambda table: table.rstrip()[:-1] + f',"deep":{_deep(DEPTH)}}}')
        message = "header is not JSON"
    assert_rejected(bad, message)


def test_nesting_below_the_parser_limit_is_rejected_briefly(tmp_path):
    """A nested list where ints are expected: rejected with a short message (not the whole value)."""
    deep = json.loads(_deep(200))
    bad = rewrite(VALID, tmp_path / "bad.safetensors", header=set_value("int8.weight", "meta", "block_size", value=deep))
    model = FixtureModel()
    with pytest.raises(CheckpointError, match="'int8.weight': field 'meta.block_size'") as error:
        lowbit.load(model, bad)
    assert len(str(error.value)) < 300
