"""The experiment spec loader: `_base_` inheritance, `--set` overrides, error messages, helpers."""
from __future__ import annotations

import array
import os
import re
import sys
import textwrap
import time
import types
from pathlib import Path

import numpy as np
import pytest
import yaml

from orchestrator.errors import CvlabError
from orchestrator.config.schema import ExperimentSpec
from orchestrator.config.loader import (
    MAX_PARAM_CHARS,
    apply_overrides,
    flatten_spec,
    load_spec,
    load_spec_with_sources,
    parse_set,
    spec_from_dict,
    spec_to_dict,
    spec_yaml,
    to_plain,
)
from orchestrator.config.paths import nearest_path, valid_paths

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def no_model_registry(monkeypatch):
    """Validate without the model registry (tests of the loader alone stay independent of it)."""
    monkeypatch.setitem(sys.modules, "workloads.models", None)


@pytest.fixture
def fake_registry(monkeypatch):
    """A stand-in registry that follows the models contract (ValueError naming the key)."""
    mod = types.ModuleType("workloads.models")

    def validate_model_config(name, **overrides):
        if name not in ("cednet26", "cednet50", "rednet50"):
            raise ValueError(f"unknown model {name!r}")
        for key, value in overrides.items():
            if key not in ("reduction_ratio", "kernel_size", "num_classes"):
                raise ValueError(f"unknown override {key!r} for {name}")
            if key == "reduction_ratio" and value not in (1, 2, 4, 8):
                raise ValueError(f"reduction_ratio={value} does not fit layer 'layer1.0'")

    mod.validate_model_config = validate_model_config
    mod.list_models = lambda: ["cednet26", "cednet50", "rednet50"]
    monkeypatch.setitem(sys.modules, "workloads.models", mod)


# ---------------------------------------------------------------------------------------------- _base_


def test_base_inheritance_deep_merge(tmp_path, no_model_registry):
    write(tmp_path / "_base_" / "a.yaml", """
        experiment: {name: a, tags: {x: "1", y: "2"}}
        optim: {lr: 0.1, epochs: 10, betas: [0.8, 0.9]}
        model: {name: cednet26, out_indices: [0, 1, 2]}
    """)
    write(tmp_path / "_base_" / "b.yaml", """
        _base_: a.yaml           # relative to this file
        optim: {epochs: 20}
    """)
    child = write(tmp_path / "exp" / "child.yaml", """
        _base_: [../_base_/b.yaml]
        experiment: {tags: {y: "3"}}
        optim: {betas: [0.5, 0.6]}
        model: {out_indices: [3]}
    """)
    spec = load_spec(child)
    assert spec.experiment.name == "a"
    assert spec.experiment.tags == {"x": "1", "y": "3"}  # deep merge, child wins
    assert spec.optim.lr == 0.1 and spec.optim.epochs == 20  # nearer base wins over farther
    assert spec.optim.betas == (0.5, 0.6)
    assert spec.model.overrides == {"out_indices": [3]}  # lists are replaced, not merged
    spec2, sources = load_spec_with_sources(child)
    assert [Path(s).name for s in sources] == ["a.yaml", "b.yaml", "child.yaml"]
    assert spec2 == spec and spec.sources == sources


def test_several_bases_later_wins_and_delete(tmp_path, no_model_registry):
    write(tmp_path / "one.yaml", "optim: {lr: 1.0, epochs: 1}\nrun: {max_failures: 1}\n")
    write(tmp_path / "two.yaml", "optim: {lr: 2.0}\n")
    spec = load_spec(write(tmp_path / "c.yaml", "_base_: [one.yaml, two.yaml]\n"))
    assert spec.optim.lr == 2.0 and spec.optim.epochs == 1 and spec.run.max_failures == 1
    assert spec.sources == [str(tmp_path / n) for n in ("one.yaml", "two.yaml", "c.yaml")]
    write(tmp_path / "searched.yaml", "search: {num_samples: 2}\n")
    assert load_spec(write(tmp_path / "e.yaml", "_base_: searched.yaml\nsearch: null\n")).search is None
    spec = load_spec(write(tmp_path / "d.yaml", "_base_: one.yaml\noptim: {_delete_: true, lr: 3.0}\n"))
    assert spec.optim.lr == 3.0 and spec.optim.epochs == ExperimentSpec().optim.epochs


def test_base_cycle_is_detected(tmp_path, no_model_registry):
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: [a.yaml]\n")
    with pytest.raises(CvlabError, match=r"_base_ cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_spec(tmp_path / "a.yaml")


def test_missing_files(tmp_path, no_model_registry):
    with pytest.raises(CvlabError) as err:
        load_spec(tmp_path / "nope.yaml")
    assert str(err.value) == f"{tmp_path / 'nope.yaml'}: file not found"
    child = write(tmp_path / "c.yaml", "_base_: gone.yaml\n")
    with pytest.raises(CvlabError, match=r"gone\.yaml: file not found \(from .*c\.yaml\)"):
        load_spec(child)
    with pytest.raises(CvlabError, match="_base_ must be a file path or a list"):
        load_spec(write(tmp_path / "d.yaml", "_base_: 3\n"))
    with pytest.raises(CvlabError, match="is a directory"):
        load_spec(tmp_path)


# ---------------------------------------------------------------------------------------------- errors


def test_invalid_yaml_names_file_and_line(tmp_path):
    bad = write(tmp_path / "bad.yaml", "optim:\n  lr: 0.1\n  epochs: [1, 2\nrun: {}\n")
    with pytest.raises(CvlabError) as info:
        load_spec(bad)
    msg = str(info.value)
    assert str(bad) in msg and "invalid YAML" in msg
    assert f"{bad}:4:" in msg or f"{bad}:3:" in msg  # the line of the problem
    with pytest.raises(CvlabError, match=r"top level must be a mapping"):
        load_spec(write(tmp_path / "list.yaml", "- a\n- b\n"))
    with pytest.raises(CvlabError, match=r"dup\.yaml:3: duplicate key 'lr' \(first at line 2\)"):
        load_spec(write(tmp_path / "dup.yaml", "optim:\n  lr: 1\n  lr: 2\n"))
    with pytest.raises(CvlabError, match=r"key 'on' is not a string .*quote it"):
        load_spec(write(tmp_path / "bool.yaml", "experiment:\n  tags:\n    on: x\n"))


def test_unknown_key_names_file_path_and_suggestion(tmp_path, no_model_registry):
    write(tmp_path / "base.yaml", "optim:\n  lr: 0.1\n")
    child = write(tmp_path / "child.yaml", "_base_: base.yaml\noptim:\n  epochs: 2\n  lrr: 0.2\n")
    with pytest.raises(CvlabError) as info:
        load_spec(child)
    assert str(info.value) == f"{child}:4: optim.lrr: unknown key; did you mean optim.lr?"
    # An unknown key in a *base* file is blamed on the base file.
    write(tmp_path / "base2.yaml", "precision:\n  autocats: bf16\n")
    with pytest.raises(CvlabError, match=r"base2\.yaml:2: precision\.autocats: unknown key; did you mean "
                                         r"precision\.autocast\?"):
        load_spec(write(tmp_path / "c2.yaml", "_base_: base2.yaml\n"))
    with pytest.raises(CvlabError, match=r"optimizer: unknown key; did you mean optim\?"):
        load_spec(write(tmp_path / "c3.yaml", "optimizer: {lr: 1}\n"))


def test_wrong_type_names_file_path_expected_and_got(tmp_path, no_model_registry):
    path = write(tmp_path / "t.yaml", "data:\n  batch_size: many\nprecision: {autocast: fp8}\n")
    with pytest.raises(CvlabError) as info:
        load_spec(path)
    msg = str(info.value)
    assert "2 problems" in msg
    assert f"{path}:2: data.batch_size: expected int, got 'many' (str)" in msg
    assert "precision.autocast: expected one of 'fp32', 'bf16', 'fp16', got 'fp8'" in msg
    with pytest.raises(CvlabError, match=r"model: expected a mapping \(section\)( or null)?, got 'cednet50'"):
        load_spec(write(tmp_path / "m.yaml", "model: cednet50\n"))
    with pytest.raises(CvlabError, match=r"run\.name: expected str or null, got 5"):
        load_spec(write(tmp_path / "n.yaml", "run: {name: 5}\n"))


def _bomb(scalars: int) -> str:
    """A flow mapping whose 198 aliases expand it to 19906 + `scalars` values: 20000, the limit, at 94."""
    return (f"{{a: &a [{','.join(['0'] * 99)}], b: [{','.join(['*a'] * 198)}], "
            f"c: [{','.join(['0'] * scalars)}]}}")


@pytest.mark.parametrize("text, overrides, expected", [
    ("optim:\n  <<: {lr: 1, lr: 2}\n", [], ":2: duplicate key 'lr' (first at line 2)"),  # inside a merge
    ("optim:\n  <<: {lr: 1}\n  epochs: 1\n  epochs: 2\n", [], ":4: duplicate key 'epochs' (first at line 3)"),
    ("search:\n  space:\n    optim.lr: {grid: [{a: 1, a: 2}]}\n", [], ":3: duplicate key 'a' (first at line 3)"),
    ("experiment:\n  tags:\n    on: x\n", [], ":3: key 'on' is not a string (YAML reads it as bool); quote it"),
    ("experiment:\n  tags:\n    [a, b]: x\n", [], ":3: key 'a sequence' is not a string (YAML reads it as seq); "
     "quote it"),
    ("optim: {_delete_: 1}\n", [], ": optim._delete_ must be true or false, got 1 (int)"),
    ("_base_: [3]\n", [], ": _base_ must be a file path or a list of file paths, got [3] (list)"),
    ("_base_: ['  ']\n", [], ": _base_ must be a file path or a list of file paths, got ['  '] (list)"),
    ("- a\n- b\n", [], ": the top level must be a mapping of sections (experiment:, model:, ...), got ['a', 'b'] "
     "(list)"),
    ("search: {space: {a: " + "[" * 1000 + "]" * 1000 + "}}\n", [], ": invalid YAML: nested too deeply"),
    ("search: &s {space: {a: *s}}\n", [], ": invalid YAML: the node anchored at line 1 contains an alias to itself"),
    ("search: {space: &s [1, *s]}\n", [], ": invalid YAML: the node anchored at line 1 contains an alias to itself"),
    (_bomb(95) + "\n", [], ": refused: its anchors and aliases (198 uses) expand to 20001 values, more than the "
     "20000 an experiment file may hold"),
    # an override keeps the file's line of every other key
    ("optim:\n  lr: 0.1\n  epochs: x\n", ["optim.lr=0.2"], ":3: optim.epochs: expected int, got 'x' (str) (Input "
     "should be a valid integer, unable to parse string as an integer)"),
    # a rule about a path no file or override set is blamed on the file
    ("experiment: {name: x}\n", ["workload=detection"], ": detection.config: workload: detection needs a "
     "`detection:` section (at least detection.config)"),
])
def test_file_problems_are_named_exactly(tmp_path, no_model_registry, text, overrides, expected):
    """Each problem of a file, with the file's name, the line where the loader can tell it and the value."""
    path = write(tmp_path / "f.yaml", text)
    with pytest.raises(CvlabError) as err:
        load_spec(path, overrides)
    assert str(err.value) == f"{path}{expected}"


def test_key_lines_are_kept_thirteen_mappings_deep(tmp_path):
    """Messages name the line of a key down to 13 nested mappings (deeper keys: their nearest such ancestor)."""
    from orchestrator.config.loader import _read_yaml

    path = write(tmp_path / "deep.yaml", "".join(f"{'  ' * i}k{i}:\n" for i in range(15)) + "  " * 15 + "v: 1\n")
    _, lines = _read_yaml(path, None)
    assert max(map(len, lines)) == 13
    assert lines[tuple(f"k{i}" for i in range(13))] == f"{path}:13"


def test_merge_keys_empty_files_and_string_overrides(tmp_path, no_model_registry):
    merged = load_spec(write(tmp_path / "m.yaml", "experiment: {name: m}\noptim: {<<: {lr: 0.5, epochs: 3}, "
                                                  "epochs: 4}\n"))
    assert (merged.optim.lr, merged.optim.epochs) == (0.5, 4)
    empty = load_spec(write(tmp_path / "empty.yaml", ""), "optim.lr=0.25")  # one override as a plain string
    assert spec_to_dict(empty) == spec_to_dict(ExperimentSpec(optim={"lr": 0.25}))
    assert empty.sources == [str(tmp_path / "empty.yaml"), "--set optim.lr=0.25"]
    spec, sources = load_spec_with_sources(tmp_path / "m.yaml", ["optim.lr=0.3"])
    assert spec.optim.lr == 0.3 and sources == [str(tmp_path / "m.yaml"), "--set optim.lr=0.3"]


def test_dicts_are_checked_like_files(tmp_path, monkeypatch, no_model_registry):
    """`spec_from_dict`: a `_base_` relative to the cwd (blamed for its own lines), keys and `_delete_` checked."""
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "base.yaml", "optim: {lr: 0.5}\n")
    spec = spec_from_dict({"_base_": "base.yaml", "optim": {"epochs": 3}})
    assert (spec.optim.lr, spec.optim.epochs) == (0.5, 3)
    assert spec.sources == [str(tmp_path / "base.yaml"), "<dict>"]
    write(tmp_path / "bad.yaml", "optim:\n  epochs: x\n")
    for d, message in [
        ({"_base_": "bad.yaml"}, f"{tmp_path / 'bad.yaml'}:2: optim.epochs: expected int, got 'x' (str) (Input "
                                 "should be a valid integer, unable to parse string as an integer)"),
        ({"_base_": "gone.yaml"}, f"{tmp_path / 'gone.yaml'}: file not found (from <dict>)"),
        ({"experiment": {"tags": {1: "x"}}}, "<dict>: experiment.tags: key 1 is not a string; quote it"),
        ({"optim": {"_delete_": "yes"}}, "<dict>: optim._delete_ must be true or false, got 'yes' (str)"),
        (["not", "a", "dict"], "<dict>: an experiment spec must be a mapping of sections, got ['not', 'a', 'dict'] "
                               "(list)"),
    ]:
        with pytest.raises(CvlabError) as err:
            spec_from_dict(d)
        assert str(err.value) == message


def test_bad_set_overrides(tmp_path, no_model_registry):
    path = write(tmp_path / "ok.yaml", "optim: {lr: 0.1}\n")
    cases = {
        "optim.lr": "expected KEY=VALUE",
        "=3": "key before '=' is empty",
        "optim..lr=3": "empty key between dots",
        "optim.lrate=3": r"unknown path optim\.lrate; did you mean optim\.lr\?",
        "optim.lr.x=3": r"optim\.lr is float and has no key 'x'",
        "optim.lr=[1, 2": "not valid YAML",
        "optim.lr=fast": r"--set optim\.lr=fast:\d*:? ?optim\.lr: expected float, got 'fast'",
        "_base_=x.yaml": "cannot be set",
    }
    for item, pattern in cases.items():
        with pytest.raises(CvlabError, match=pattern):
            load_spec(path, [item])


@pytest.mark.parametrize("item, message", [
    ("optim.lrate=3", "unknown path optim.lrate; did you mean optim.lr?"),
    ("optim.lrr.epochs=3", "unknown path optim.lrr; did you mean optim.lr?"),  # a sibling, not optim.epochs
    ("optimm.lr=3", "unknown path optimm; did you mean optim?"),  # the section, not the whole path
    ("zzz.lr=3", "unknown path zzz; did you mean optim.lr?"),  # nothing like `zzz`: the whole path decides
    ("zzzz.qqqq=3", "unknown path zzzz"),
    ("optim.lr.x=3", "optim.lr is float and has no key 'x'"),
])
def test_bad_set_paths_are_named_exactly(tmp_path, no_model_registry, item, message):
    with pytest.raises(CvlabError) as err:
        load_spec(write(tmp_path / "ok.yaml", "optim: {lr: 0.1}\n"), [item])
    assert str(err.value) == f"--set {item}: {message}"


def test_set_values_are_yaml(tmp_path, no_model_registry):
    path = write(tmp_path / "ok.yaml", "tracking: {tracking_uri: http://x}\n")
    assert parse_set("optim.lr=0.1") == ("optim.lr", 0.1)
    assert parse_set(" model.out_indices = [0,1]") == ("model.out_indices", [0, 1])
    assert parse_set("a=b=c") == ("a", "b=c")
    assert parse_set("x=") == ("x", None)
    assert parse_set("model.drop_path_rate=1e-1") == ("model.drop_path_rate", 0.1)  # YAML 1.2 float
    sci = load_spec(write(tmp_path / "sci.yaml", "model: {name: cednet26, drop_path_rate: 5e-2}\noptim: {weight_decay: 1e-4}\n"))
    assert sci.model.overrides["drop_path_rate"] == 0.05 and sci.optim.weight_decay == 1e-4
    spec = load_spec(path, ["optim.lr=0.3", "model.name=cednet26", "model.out_indices=[0,1]", "tracking.tracking_uri=null",
                            "search.num_samples=4", "experiment.tags.team=vision",
                            "search.space.model.reduction_ratio={grid: [4, 8]}"])
    assert spec.optim.lr == 0.3
    assert spec.model.overrides["out_indices"] == [0, 1]
    assert spec.tracking.tracking_uri is None
    assert spec.search.num_samples == 4  # an unset optional section is created
    assert spec.experiment.tags == {"team": "vision"}
    assert spec.search.space == {"model.reduction_ratio": {"grid": [4, 8]}}  # dotted key kept whole
    assert spec.sources[-1].startswith("--set search.space")


# ---------------------------------------------------------------------------------------------- model


def test_model_errors_from_registry(tmp_path, fake_registry):
    path = write(tmp_path / "m.yaml", "model:\n  name: cednet50\n  reduction_ration: 4\n")
    with pytest.raises(CvlabError) as info:
        load_spec(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:3: model.reduction_ration: unknown override")
    assert "did you mean model.reduction_ratio?" in msg
    with pytest.raises(CvlabError, match=r"m2\.yaml:2: model\.name: unknown model 'cednet5'; did you mean "
                                         r"cednet50\?"):
        load_spec(write(tmp_path / "m2.yaml", "model:\n  name: cednet5\n"))
    with pytest.raises(CvlabError, match=r"--set model\.reduction_ratio=3: model\.reduction_ratio: "
                                         r"reduction_ratio=3 does not fit layer"):
        load_spec(write(tmp_path / "m3.yaml", "model: {name: cednet50}\n"), ["model.reduction_ratio=3"])
    assert load_spec(tmp_path / "m3.yaml", ["model.reduction_ratio=8"]).model.overrides == {"reduction_ratio": 8}


@pytest.mark.parametrize("error, overrides, message", [
    (KeyError("bad key 'foo'"), {"foo": 1}, "model.foo: bad key 'foo'"),  # a KeyError's text, unquoted
    (ValueError("a_ratio=2 is wrong"), {"ratio": 1, "a_ratio": 2},  # the longest key the message names
     "model.a_ratio: a_ratio=2 is wrong (did you mean model.reduction_ratio?)"),
    (ValueError("the layers do not fit"), {"reduction_ratio": 3}, "model.name: the layers do not fit"),
    (ValueError("the layers do not fit"), {"reduction_ratio": 3, "zzzzqqqq": 1}, "model.zzzzqqqq: the layers do not fit"),
    (ValueError("the layers do not fit"), {"reduction_ratoi": 3},
     "model.reduction_ratoi: the layers do not fit (did you mean model.reduction_ratio?)"),
    (TypeError("kernel_sise: did you mean kernel_size?"), {"kernel_sise": 3},
     "model.kernel_sise: kernel_sise: did you mean kernel_size?"),  # the registry's own hint is not doubled
])
def test_registry_verdicts_are_placed_exactly(monkeypatch, error, overrides, message):
    """Where the registry's message lands (which `model.` path) and what hint it gets, for every kind of error."""
    mod = types.ModuleType("workloads.models")

    def validate_model_config(name, **kwargs):
        raise error

    mod.validate_model_config = validate_model_config
    mod.list_models = lambda: ["cednet26", "cednet50"]
    monkeypatch.setitem(sys.modules, "workloads.models", mod)
    with pytest.raises(CvlabError) as err:
        spec_from_dict({"model": {"name": "cednet26", **overrides}})
    assert str(err.value) == f"<dict>: {message}"
    with pytest.raises(CvlabError) as err:
        spec_from_dict({"model": {"name": "nope"}})
    assert str(err.value) == "<dict>: model.name: unknown model 'nope' (known: cednet26, cednet50)"
    assert spec_from_dict({"model": {"name": "nope"}}, validate_model=False).model.name == "nope"


def test_model_errors_from_the_real_registry(tmp_path):
    with pytest.raises(CvlabError, match=r"r\.yaml:1: model\.name: .*rednet5"):
        load_spec(write(tmp_path / "r.yaml", "model: {name: rednet5}\n"))
    with pytest.raises(CvlabError, match=r"k\.yaml:1: model\.kernel_sise"):
        load_spec(write(tmp_path / "k.yaml", "model: {name: rednet50, kernel_sise: 7}\n"))


# ---------------------------------------------------------------------------------------------- helpers


def test_round_trip_flatten_and_paths(no_model_registry):
    spec = spec_from_dict({"model": {"name": "cednet26", "out_indices": [1, 2]},
                           "experiment": {"tags": {"a": "x" * 800, "b": "y" * MAX_PARAM_CHARS}}, "optim": {"lr": 0.5}})
    assert spec_from_dict(spec_to_dict(spec)) == spec
    assert spec_to_dict(spec)["optim"]["betas"] == [0.9, 0.999]  # JSON values: lists, not tuples
    assert flatten_spec(spec)["experiment.tags.b"] == "y" * MAX_PARAM_CHARS  # the limit is inclusive
    text = spec_yaml(spec)  # the resolved.yaml artifact: block style, sections in the schema's order
    assert text.startswith("experiment:\n  name: default\n") and "\noptim:\n  name: sgd\n" in text
    assert "\n  betas:\n  - 0.9\n  - 0.999\n" in text  # lists of scalars too
    assert list(yaml.safe_load(text)) == list(spec_to_dict(spec)) and yaml.safe_load(text) == spec_to_dict(spec)
    flat = flatten_spec(spec)
    assert flat["optim.lr"] == "0.5" and flat["model.out_indices"] == "[1, 2]"
    assert flat["optim.nesterov"] == "true" and flat["run.name"] == "null"
    assert len(flat["experiment.tags.a"]) == MAX_PARAM_CHARS and flat["experiment.tags.a"].endswith("...")
    assert all(isinstance(v, str) for v in flat.values())
    assert not any(k.startswith(("search", "detection")) for k in flat)  # unset sections left out
    paths = valid_paths(flatten_spec(spec))
    assert {"optim.lr", "model.name", "model.reduction_ratio", "search.num_samples",
            "detection.config"} <= set(paths)
    assert nearest_path("optim.lrr", paths) == "optim.lr"
    assert nearest_path("lr", paths) == "optim.lr"
    assert nearest_path("model.lr", paths) == "optim.lr"
    assert nearest_path("zzzz.qqqq", paths) is None
    with pytest.raises(CvlabError, match="must be a mapping"):
        spec_from_dict(["not", "a", "dict"])


def test_apply_overrides(tmp_path, fake_registry):
    base = load_spec(write(tmp_path / "b.yaml", "model: {name: cednet50}\noptim: {lr: 0.1}\n"))
    new = apply_overrides(base, {"model.reduction_ratio": np.int64(8), "optim.lr": np.float32(0.5)})
    assert new.model.overrides == {"reduction_ratio": 8} and type(new.model.overrides["reduction_ratio"]) is int
    assert new.optim.lr == 0.5
    assert base.model.overrides == {} and base.optim.lr == 0.1  # the original is untouched
    assert new.sources[0].endswith("b.yaml") and "override model.reduction_ratio" in new.sources
    unchecked = spec_from_dict({"model": {"name": "cednet99"}}, validate_model=False)
    for mapping, message in [
        ({"optim.weight_decy": 0.1}, "override optim.weight_decy: unknown path optim.weight_decy; did you mean "
                                     "optim.weight_decay?"),
        ({1: 2}, "override 1: a path must be a dotted string, got 1 (int)"),
        ([1], "overrides must be a mapping of dotted paths to values, got [1] (list)"),
    ]:
        with pytest.raises(CvlabError) as err:
            apply_overrides(base, mapping)
        assert str(err.value) == message
    with pytest.raises(CvlabError) as err:  # a problem no override caused is blamed on the overrides as a whole
        apply_overrides(unchecked, {"optim.lr": 0.2})
    assert str(err.value) == "<overrides>: model.name: unknown model 'cednet99'; did you mean cednet50? (known: " \
                             "cednet26, cednet50, rednet50)"
    odd = array.array("i", [1])  # has `tolist` but is no numpy value: kept as given
    assert to_plain(odd) is odd and to_plain({"a": (np.int64(1), [np.float32(0.5)])}) == {"a": [1, [0.5]]}
    with pytest.raises(CvlabError, match=r"override optim\.epochs: optim\.epochs: expected int, got 'x'"):
        apply_overrides(base, {"optim.epochs": "x"})
    with pytest.raises(CvlabError, match=r"model\.reduction_ratio: reduction_ratio=3"):
        apply_overrides(base, {"model.reduction_ratio": 3})


# ---------------------------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("model", ["cednet50", "rednet50", "resnet50"])
def test_published_recipe_files(model):
    spec = load_spec(REPO / "experiments" / f"{model}_imagenet.yaml")
    assert spec.model.name == model and spec.model.overrides.get("num_classes") == 1000
    assert Path(spec.sources[0]).name == "imagenet.yaml"
    assert spec.data.root == "/data/imagenet" and spec.data.image_size == 224
    global_batch = spec.scaling.num_workers * spec.data.batch_size
    assert (spec.scaling.num_workers, spec.data.batch_size, global_batch) == (64, 32, 2048)
    assert spec.optim.scale_lr and spec.optim.lr * global_batch / spec.optim.base_batch_size == pytest.approx(0.8)
    assert (spec.optim.name, spec.optim.momentum, spec.optim.nesterov) == ("sgd", 0.9, True)
    assert spec.optim.weight_decay == pytest.approx(1e-4) and spec.optim.label_smoothing == 0.1
    assert spec.optim.epochs == 130 and spec.optim.warmup_iters == 3130
    assert spec.precision.autocast == "bf16" and spec.precision.channels_last
    assert spec.scaling.use_gpu and spec.run.checkpoint_every == 1 and spec.run.max_failures == 3
    assert spec.experiment.name == f"{model}-imagenet"


# ---------------------------------------------------------------------------------------------- value ranges


@pytest.mark.parametrize("line, expected", [
    ("data: {batch_size: 0}", r"data\.batch_size: got 0 \(int\): must be greater than or equal to 1"),
    ("optim: {epochs: -3}", r"optim\.epochs: got -3 \(int\): must be greater than or equal to 1"),
    ("scaling: {num_workers: 0}", r"scaling\.num_workers: got 0 \(int\): must be a whole number >= 1, or a range "
                                  r"\[min, max\]$"),
    ("optim: {lr: -1}", r"optim\.lr: got -1 \(int\): must be greater than 0"),
    ("data: {image_size: 3}", r"data\.image_size \(3\) is smaller than the model's total stride"),
    ("optim: {weight_decay: .nan}", r"optim\.weight_decay: got nan"),
    ("optim: {warmup_epochs: .nan}", r"optim\.warmup_epochs: got nan"),
    ("optim: {warmup_epochs: .inf}", r"optim\.warmup_epochs: got inf .*finite"),
    ("optim: {weight_decay: true}", r"optim\.weight_decay: got True \(bool\): a boolean is not a number"),
    ("optim: {label_smoothing: -1}", r"optim\.label_smoothing: got -1"),
    ("optim: {label_smoothing: 1.0}", r"optim\.label_smoothing: got 1\.0 \(float\): must be less than 1"),
    ("model: {}", r"model\.name: missing; it is required"),
    ("optim: {epochs: 4, warmup_epochs: 4}", r"optim\.warmup_epochs \(4\) must be shorter than optim\.epochs \(4\)"),
    ("run: {checkpoint_every: 0}", r"run\.checkpoint_every: got 0"),
    ("data: {augment: {hflip: 1.5}}", r"data\.augment\.hflip is a probability and must be in \[0, 1\], got 1\.5"),
    ("data: {augment: {auto_augment: ''}}", r"data\.augment\.auto_augment must be null or a policy string, got ''$"),
    ("data: {augment: {auto_augment: rand-zz9}}", r"data\.augment\.auto_augment: timm cannot read the policy "
                                                  r"'rand-zz9' \(AssertionError: .*\); use e\.g\. 'rand-m9"),
    ("data: {augment: {color_jitter: [-0.1, 0, 0]}}", r"data\.augment\.color_jitter strengths must be >= 0, got "
                                                      r"\[-0\.1, 0\.0, 0\.0\]$"),
    ("data: {augment: {color_jitter: [0.1, 0.1, 0.1, 0.6]}}", r"data\.augment\.color_jitter: the hue strength must "
                                                              r"be in \[0, 0\.5\], got 0\.6$"),
    ("data: {augment: {scale: [0, 1]}}", r"data\.augment\.scale values must be in \(0, 1\] \(crop area"),
    ("data: {augment: {ratio: [0, 1]}}", r"data\.augment\.ratio values must be > 0 \(crop aspect ratio"),
])
def test_bad_values_are_refused_with_file_and_line(tmp_path, line, expected, capsys):
    """Each value a new user tried (issue 13) ends with exit 2 and `file:line: dotted.path: ...`."""
    path = write(tmp_path / "bad.yaml", "experiment: {name: bad}\n" + line + "\n")
    from orchestrator.cli import main

    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"cvlab: error: {re.escape(str(path))}:2: {expected}", err), err
    assert "Traceback" not in err


def test_the_edges_of_the_ranges_are_accepted(tmp_path):
    """The inclusive ends of what the rules above refuse past: no colour jitter at all with the largest hue, and
    a worker range whose min is its max."""
    spec = load_spec(write(tmp_path / "edges.yaml", "data: {augment: {color_jitter: [0, 0, 0, 0.5]}}\n"
                                                    "scaling: {num_workers: [2, 2]}\nrun: {max_failures: 1}\n"))
    assert spec.data.augment.color_jitter == [0, 0, 0, 0.5] and spec.scaling.num_workers == (2, 2)


def test_alias_bomb_and_oversized_files_are_refused_quickly(tmp_path):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [{','.join(['*' + prev] * 9)}]")
    bomb = write(tmp_path / "bomb.yaml", "\n".join(lines) + "\n")
    start = time.perf_counter()
    with pytest.raises(CvlabError, match=r"anchors and aliases .* expand to \d+ values, more than the 20000"):
        load_spec(bomb)
    assert time.perf_counter() - start < 5
    with pytest.raises(CvlabError, match="anchors and aliases"):  # the same in a --set value
        parse_set("search.space={a: &a [1,2,3,4,5,6,7,8,9,10], b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], "
                  "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], e: [*d,*d,*d]}")
    big = tmp_path / "big.yaml"
    big.write_text("experiment: {name: big}\n" + "# padding\n" * 120_000)
    with pytest.raises(CvlabError, match="too large for an experiment file"):
        load_spec(big)
    # Aliases within the bound are fine.
    ok = write(tmp_path / "ok.yaml", "experiment: &e {name: ok}\nsearch: {space: {experiment.seed: {grid: [1]}}}\n"
                                      "optim: &o {lr: 0.2}\n")
    assert load_spec(ok).optim.lr == 0.2


@pytest.mark.parametrize("verb", ["run", "tune", "submit"])
def test_bad_value_starts_nothing(tmp_path, monkeypatch, capsys, verb):
    """`cvlab run|tune|submit` refuse a bad value before any MLflow run, Ray start or job submission."""
    import ray

    from orchestrator.cli import main

    monkeypatch.chdir(tmp_path)
    path = write(tmp_path / "bad.yaml", f"""
        experiment: {{name: bad}}
        data: {{root: {tmp_path / 'data'}, generate: true}}
        optim: {{epochs: -3}}
        run: {{storage_path: {tmp_path / 'runs'}}}
        tracking: {{tracking_uri: "sqlite:///{tmp_path / 'mlflow.db'}"}}
        search: {{space: {{optim.lr: {{grid: [0.1]}}}}}}
    """)
    argv = [verb, str(path)] + (["--address", "http://127.0.0.1:9"] if verb == "submit" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{path}:4: optim.epochs: got -3" in err
    assert not ray.is_initialized()
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()
    assert not (tmp_path / "data").exists()


def _numeric_fields(model, prefix=""):
    """(dotted path, section class, field name, a value holding a boolean where a number belongs) for every
    field of the schema that holds numbers, alone or in a tuple, list or dict; nested sections included."""
    import types
    import typing

    from pydantic import BaseModel

    def with_bool(annotation):
        """A value of `annotation`'s shape with True where a number goes; None if it takes no number."""
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if origin is typing.Annotated:
            return with_bool(args[0])
        if annotation in (int, float):
            return True
        if origin in (tuple, list):
            inner = [with_bool(a) for a in args if a is not Ellipsis]
            if any(v is not None for v in inner):
                return tuple(True if v is not None else "x" for v in inner) if origin is tuple else [True]
        if origin is dict and with_bool(args[1]) is not None:
            return {"k": with_bool(args[1])}
        if origin in (typing.Union, types.UnionType) and bool not in args:
            return next((v for v in map(with_bool, args) if v is not None), None)
        return None

    for name, info in model.model_fields.items():
        annotation = info.annotation
        options = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
            else (annotation,)
        for section in (a for a in options if isinstance(a, type) and issubclass(a, BaseModel)):
            yield from _numeric_fields(section, f"{prefix}{name}.")
        value = with_bool(annotation)
        if value is not None:
            yield f"{prefix}{name}", model, name, value


def test_no_numeric_field_takes_a_boolean():
    """`optim.epochs: true` must not load as 1: every number of every section, alone or inside a tuple, list
    or dict, refuses booleans (pydantic's lax mode would take `true` as 1)."""
    from pydantic import ValidationError

    from orchestrator.config.schema import ExperimentSpec

    fields = {f[0]: f[1:] for f in _numeric_fields(ExperimentSpec)}
    assert {"optim.epochs", "data.batch_size", "scaling.num_workers", "optim.lr", "run.max_failures",
            "data.augment.scale", "data.mean", "optim.betas", "scaling.resources_per_worker"} <= set(fields)
    for path, (section, name, value) in fields.items():
        with pytest.raises(ValidationError, match="a boolean is not a number"):
            section.__pydantic_validator__.validate_assignment(section.model_construct(), name, value)


def test_unreadable_files_are_named_with_where_they_were_included_from(tmp_path, monkeypatch):
    """Each way a file can be unreadable gives its own message naming the file and, for a base, the file that
    included it; the size limit is inclusive (a file of exactly MAX_FILE_BYTES loads)."""
    from orchestrator.config.loader import MAX_FILE_BYTES

    child = tmp_path / "child.yaml"

    def refused(base_text: bytes | None, expected: str, base_name="base.yaml", at=""):
        base = tmp_path / base_name
        if base_text is not None:
            base.write_bytes(base_text)
        child.write_text(f"_base_: {base_name}\nmodel: {{name: cednet26}}\n")
        with pytest.raises(CvlabError) as err:
            load_spec(child)
        at = re.escape(f"{base}{at}")  # syntax errors name line and column
        assert re.fullmatch(rf"{at}: {expected} \(from {re.escape(str(child))}\)", str(err.value)), str(err.value)

    refused(None, "file not found", "missing.yaml")
    (tmp_path / "dir.yaml").mkdir()
    refused(None, "is a directory, expected a YAML file", "dir.yaml")
    refused(b"optim: {lr: 0.1}\n\xff\xfe\n", "not a UTF-8 text file")
    refused(b"optim: {lr: 0.1}\x07\n", r"invalid YAML: character '\\x07' at offset 16 is not allowed")
    refused(b"optim: {lr: [0.1}\n", r"invalid YAML: expected ',' or '\]', but got '}'", "broken.yaml", at=":1:17")
    os.mkfifo(tmp_path / "fifo.yaml")  # reading it could block forever
    refused(None, "not a regular file", "fifo.yaml")
    refused(b"a" * (MAX_FILE_BYTES + 1), rf"{MAX_FILE_BYTES + 1} bytes is too large for an experiment file "
                                         rf"\(at most {MAX_FILE_BYTES} bytes\)")
    exact = b"model: {name: cednet26}\n"
    (tmp_path / "exact.yaml").write_bytes(exact + b"#" * (MAX_FILE_BYTES - len(exact) - 1) + b"\n")
    assert load_spec(tmp_path / "exact.yaml").model.name == "cednet26"
    (tmp_path / "unreadable.yaml").write_text("model: {name: cednet26}\n")
    (tmp_path / "unreadable.yaml").chmod(0)
    if os.geteuid() == 0:  # root reads anything: the same refusal, simulated
        real_read_text = Path.read_text

        def read_text(self, *args, **kwargs):
            if self.name == "unreadable.yaml":
                raise PermissionError(13, "Permission denied", str(self))
            return real_read_text(self, *args, **kwargs)

        monkeypatch.setattr(Path, "read_text", read_text)
    refused(None, r"cannot read \(Permission denied\)", "unreadable.yaml")


VALID_OVERRIDES = ("channel_groups, drop_path_rate, frozen_stages, group_channels, in_channels, kernel_size, "
                   "norm_eval, num_classes, out_indices, reduction_ratio, stem_kernel_size, zero_init_residual")


@pytest.mark.parametrize("model, message", [
    ("{name: cednet27}", "model.name: unknown model 'cednet27'; did you mean cednet26? (known: rednet26, "
     "rednet38, rednet50, rednet101, rednet152, cednet26, cednet38, cednet50, cednet101, cednet152, resnet26, "
     "resnet38, resnet50, resnet101, resnet152)"),
    ("{name: cednet26, reduction_ratoi: 4}", "model.reduction_ratoi: unknown override(s) for cednet26: "
     f"'reduction_ratoi' (did you mean 'reduction_ratio'?); valid overrides: {VALID_OVERRIDES}"),
    ("{name: cednet26, foo_bar_baz: 1}", "model.foo_bar_baz: unknown override(s) for cednet26: 'foo_bar_baz'; "
     f"valid overrides: {VALID_OVERRIDES} (did you mean model.norm_eval?)"),
    ("{name: cednet26, reduction_ratio: 0}", "model.reduction_ratio: reduction_ratio must be >= 1, got 0"),
    ("{name: cednet26, group_channels: 16, kernel_size: 4}",
     "model.kernel_size: kernel_size must be odd (same-size padding), got 4; e.g. 3, 5, 7, 9"),
])
def test_bad_models_are_named_exactly(tmp_path, model, message):
    """The registry's verdict on `model.name` and each override, at the override's own line and path."""
    path = write(tmp_path / "m.yaml", f"experiment: {{name: x}}\nmodel: {model}\n")
    with pytest.raises(CvlabError) as err:
        load_spec(path)
    assert str(err.value) == f"{path}:2: {message}"


@pytest.mark.parametrize("item, message", [
    ("optim.lr", "bad --set 'optim.lr': expected KEY=VALUE, e.g. --set optim.lr=0.1"),
    ("=3", "bad --set '=3': the key before '=' is empty"),
    ("optim.lr=[1,", "bad --set 'optim.lr=[1,': the value is not valid YAML (expected the node content, but "
     "found '<stream end>')"),
    ("model.name=" + "a" * 10_001, "bad --set model.name=...: the value is 10001 characters long (at most 10000)"),
    (3, "bad --set 3: expected a string KEY=VALUE"),
    ("optim.lr=\x07", "bad --set 'optim.lr=\\x07': the value is not valid YAML (unacceptable character #x0007: "
     "special characters are not allowed)"),
    ("search.space={1: 2}", "--set search.space={1: 2}: the top level: key 1 is not a string; quote it"),
    ("search.space={a: {b: [{1: 2}]}}", "--set search.space={a: {b: [{1: 2}]}}: a.b: key 1 is not a string; quote it"),
    ("search.space=&a [*a]", "--set search.space: invalid YAML: the node anchored at line 1 contains an alias to "
     "itself"),
    ("search.space=" + "[" * 1000 + "]" * 1000, "bad --set search.space=...: the value is nested too deeply"),
    ("search.space=" + _bomb(95), "--set search.space: refused: its anchors and aliases (198 uses) expand to 20001 "
     "values, more than the 20000 an experiment file may hold"),
])
def test_bad_set_items_are_named_exactly(item, message):
    from orchestrator.config.loader import parse_set

    with pytest.raises(CvlabError) as err:
        parse_set(item)
    assert str(err.value) == message
    assert parse_set("model.name=" + "a" * 10_000) == ("model.name", "a" * 10_000)  # the limit is inclusive
    assert parse_set(" optim.lr =") == ("optim.lr", None) and parse_set("a=b=c") == ("a", "b=c")
    key, value = parse_set("search.space=" + _bomb(94))  # exactly 20000 values: the limit is inclusive
    assert (key, len(value["b"]), len(value["c"])) == ("search.space", 198, 94)
