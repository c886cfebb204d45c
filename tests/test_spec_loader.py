"""The experiment spec loader: `_base_` inheritance, `--set` overrides, error messages, helpers."""
from __future__ import annotations

import os
import re
import sys
import textwrap
import time
import types
from pathlib import Path

import numpy as np
import pytest

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
    spec = load_spec(write(tmp_path / "d.yaml", "_base_: one.yaml\noptim: {_delete_: true, lr: 3.0}\n"))
    assert spec.optim.lr == 3.0 and spec.optim.epochs == ExperimentSpec().optim.epochs


def test_base_cycle_is_detected(tmp_path, no_model_registry):
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: [a.yaml]\n")
    with pytest.raises(CvlabError, match=r"_base_ cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_spec(tmp_path / "a.yaml")


def test_missing_files(tmp_path, no_model_registry):
    with pytest.raises(CvlabError, match=r"nope\.yaml: file not found"):
        load_spec(tmp_path / "nope.yaml")
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


def test_model_errors_from_the_real_registry(tmp_path):
    with pytest.raises(CvlabError, match=r"r\.yaml:1: model\.name: .*rednet5"):
        load_spec(write(tmp_path / "r.yaml", "model: {name: rednet5}\n"))
    with pytest.raises(CvlabError, match=r"k\.yaml:1: model\.kernel_sise"):
        load_spec(write(tmp_path / "k.yaml", "model: {name: rednet50, kernel_sise: 7}\n"))


# ---------------------------------------------------------------------------------------------- helpers


def test_round_trip_flatten_and_paths(no_model_registry):
    spec = spec_from_dict({"model": {"name": "cednet26", "out_indices": [1, 2]},
                           "experiment": {"tags": {"a": "x" * 800}}, "optim": {"lr": 0.5}})
    assert spec_from_dict(spec_to_dict(spec)) == spec
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
    with pytest.raises(CvlabError, match=r"unknown path optim\.weight_decy; did you mean optim\.weight_decay\?"):
        apply_overrides(base, {"optim.weight_decy": 0.1})
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
    ("scaling: {num_workers: 0}", r"scaling\.num_workers: got 0"),
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
])
def test_bad_values_are_refused_with_file_and_line(tmp_path, line, expected, capsys):
    """Each value a new user tried (issue 13) ends with exit 2 and `file:line: dotted.path: ...`."""
    path = write(tmp_path / "bad.yaml", "experiment: {name: bad}\n" + line + "\n")
    from orchestrator.cli import main

    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"cvlab: error: {re.escape(str(path))}:2: {expected}", err), err
    assert "Traceback" not in err


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


def test_unreadable_files_are_named_with_where_they_were_included_from(tmp_path):
    """Each way a file can be unreadable gives its own message naming the file and, for a base, the file that
    included it; the size limit is inclusive (a file of exactly MAX_FILE_BYTES loads)."""
    from orchestrator.config.loader import MAX_FILE_BYTES

    child = tmp_path / "child.yaml"

    def refused(base_text: bytes | None, expected: str, base_name="base.yaml"):
        base = tmp_path / base_name
        if base_text is not None:
            base.write_bytes(base_text)
        child.write_text(f"_base_: {base_name}\nmodel: {{name: cednet26}}\n")
        with pytest.raises(CvlabError) as err:
            load_spec(child)
        at = rf"{re.escape(str(base))}(:\d+:\d+)?"  # syntax errors name line and column
        assert re.fullmatch(rf"{at}: {expected} \(from {re.escape(str(child))}\)", str(err.value)), str(err.value)

    refused(None, "file not found", "missing.yaml")
    (tmp_path / "dir.yaml").mkdir()
    refused(None, "is a directory, expected a YAML file", "dir.yaml")
    refused(b"optim: {lr: 0.1}\n\xff\xfe\n", "not a UTF-8 text file")
    refused(b"optim: {lr: 0.1}\x07\n", r"invalid YAML: character '\\x07' at offset 16 is not allowed")
    refused(b"optim: {lr: [0.1}\n", r"invalid YAML: expected ',' or '\]', but got '}'", "broken.yaml")
    refused(b"a" * (MAX_FILE_BYTES + 1), rf"{MAX_FILE_BYTES + 1} bytes is too large for an experiment file "
                                         rf"\(at most {MAX_FILE_BYTES} bytes\)")
    exact = b"model: {name: cednet26}\n"
    (tmp_path / "exact.yaml").write_bytes(exact + b"#" * (MAX_FILE_BYTES - len(exact) - 1) + b"\n")
    assert load_spec(tmp_path / "exact.yaml").model.name == "cednet26"
    (tmp_path / "unreadable.yaml").write_text("model: {name: cednet26}\n")
    (tmp_path / "unreadable.yaml").chmod(0)
    if os.geteuid() != 0:  # root reads anything
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
])
def test_bad_set_items_are_named_exactly(item, message):
    from orchestrator.config.loader import parse_set

    with pytest.raises(CvlabError) as err:
        parse_set(item)
    assert str(err.value) == message
    assert parse_set("model.name=" + "a" * 10_000) == ("model.name", "a" * 10_000)  # the limit is inclusive
    assert parse_set(" optim.lr =") == ("optim.lr", None) and parse_set("a=b=c") == ("a", "b=c")
