"""Property-based robustness of the config path: bad configs end in one CvlabError, never a traceback.

Cases per run (hypothesis `max_examples`; the fixed ones derandomized, the fresh ones new each run):
  malformed YAML text             100  (load_spec)
  mutated valid YAML files         80  (load_spec and `cvlab validate`)
  random nested spec dicts        120  (load_spec, spec_from_dict and `cvlab validate`)
  random model sections            60  (load_spec against the real model registry when importable)
  random --set strings            120  (`cvlab validate X.yaml --set=...`)
  random apply_overrides maps      80  (apply_overrides)
  fresh random spec dicts          30  (`cvlab validate`; new cases every run, seed printed)
  fresh random --set strings       30  (`cvlab validate`; new cases every run, seed printed)
  ----------------------------------
  total                           620 generated cases (each exercises 1-3 entry points)
Each test asserts that every case either validates or raises CvlabError / exits with code 2 and a
one-line-per-problem "cvlab: error:" message; any other exception fails the test.
"""
from __future__ import annotations

import contextlib
import io
import os
import random
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from orchestrator.cli import main
from orchestrator.errors import CvlabError
from orchestrator.config.schema import ExperimentSpec
from orchestrator.config.loader import apply_overrides, load_spec, spec_from_dict
from orchestrator.config.paths import MODEL_OVERRIDE_KEYS, valid_paths

SETTINGS = {"deadline": None, "derandomize": True, "database": None,
            "suppress_health_check": [HealthCheck.too_slow, HealthCheck.filter_too_much]}
VALID_YAML = """\
experiment:
  name: fuzz
  tags: {a: b}
model:
  name: cednet26
  reduction_ratio: 4
data:
  root: data/x
  batch_size: 8
optim:
  lr: 0.1
  betas: [0.9, 0.99]
run: {max_failures: 1}
"""
PATHS = valid_paths()
SECTIONS = list(ExperimentSpec.model_fields)
FIELDS = sorted({p.rsplit(".", 1)[-1] for p in PATHS})
COUNTS: dict[str, int] = {}


def _count(name: str) -> None:
    COUNTS[name] = COUNTS.get(name, 0) + 1


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory() as tmp:
        valid = Path(tmp) / "valid.yaml"
        valid.write_text(VALID_YAML)
        yield Path(tmp)


def _load_ok_or_cvlab_error(path: Path, overrides=()) -> None:
    try:
        spec = load_spec(path, overrides)
    except CvlabError as err:
        assert str(err).strip(), "empty error message"
        assert "Traceback" not in str(err)
    else:
        assert isinstance(spec, ExperimentSpec)


def _cli_ok_or_exit_2(argv: list[str]) -> None:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    assert rc in (0, 2), (rc, err.getvalue())
    if rc == 2:
        text = err.getvalue()
        assert "Traceback" not in text
        assert text.startswith(("cvlab: error:", "usage:")), text
    else:
        assert out.getvalue().startswith("# sources:")


# ---------------------------------------------------------------------------------------------- strategies

yaml_chars = st.sampled_from(list("abcdefgxyz_019.:-[]{},'\"#&*!|>%@`\n\n\n  \t") + ["\x00", "\x85", "é", "\ufeff"])
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["sgd", "bf16", "cednet50", "1e-4", "null", "~"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=8)
keys = st.one_of(st.sampled_from(SECTIONS + FIELDS + ["_delete_", "lrr", "optimizer"]), st.text(max_size=8))
section_bodies = st.dictionaries(keys, values, max_size=4)
spec_dicts = st.dictionaries(st.one_of(st.sampled_from(SECTIONS), keys),
                             st.one_of(section_bodies, values), max_size=5)
model_sections = st.fixed_dictionaries(
    {"name": st.one_of(st.sampled_from(["cednet26", "rednet50", "resnet38", "cednet5", "rednet"]), scalars)},
    optional={k: st.one_of(st.integers(-3, 64), scalars, st.lists(st.integers(-1, 5), max_size=4))
              for k in (*MODEL_OVERRIDE_KEYS, "kernel_sise", "groups")},
)
set_values = st.one_of(st.text(max_size=10), st.sampled_from(["0.1", "[0,1]", "null", "{a: 1}", "[1,", "{x",
                                                              "true", "-5", "'q'", "!!python/object:os.system"]))
set_strings = st.one_of(
    st.text(max_size=30),
    st.builds(lambda p, sep, v: f"{p}{sep}{v}",
              st.one_of(st.sampled_from(PATHS + ["optim.lr.x", "search.space.a.b", "model.foo", "", ".",
                                                 "a..b", "_base_", "optim.", " "]), st.text(max_size=10)),
              st.sampled_from(["=", "", "==", " = "]), set_values),
)


# ---------------------------------------------------------------------------------------------- properties


@settings(max_examples=100, **SETTINGS)
@given(text=st.text(yaml_chars, max_size=120))
def test_malformed_yaml_text(workdir, text):
    """100 cases of random YAML-ish text."""
    _count("yaml text")
    path = workdir / "text.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _load_ok_or_cvlab_error(path)


@settings(max_examples=80, **SETTINGS)
@given(data=st.data())
def test_mutated_valid_yaml(workdir, data):
    """80 cases: a valid file with random characters inserted, deleted or replaced."""
    _count("mutated yaml")
    text = VALID_YAML
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(text)))
        op = data.draw(st.sampled_from(["insert", "delete", "replace"]))
        ch = data.draw(yaml_chars)
        text = (text[:i] + ch + text[i:] if op == "insert" else
                text[:i] + text[i + 1:] if op == "delete" else text[:i] + ch + text[i + 1:])
    path = workdir / "mutated.yaml"
    path.write_text(text, encoding="utf-8")
    _load_ok_or_cvlab_error(path)
    _cli_ok_or_exit_2(["validate", str(path)])


@settings(max_examples=120, **SETTINGS)
@given(d=spec_dicts)
def test_random_nested_specs(workdir, d):
    """120 cases of random nested dicts with wrong keys and wrong types (file, dict and CLI)."""
    _count("nested dicts")
    d.pop("_base_", None)  # a random _base_ would read random files
    try:
        spec_from_dict(d, source="<fuzz>")
    except CvlabError as err:
        assert str(err).strip()
    path = workdir / "nested.yaml"
    try:
        path.write_text(yaml.safe_dump(d, allow_unicode=True))
    except (yaml.YAMLError, UnicodeEncodeError):  # e.g. lone surrogates: not a YAML file we can write
        return
    _load_ok_or_cvlab_error(path)
    _cli_ok_or_exit_2(["validate", str(path)])


@settings(max_examples=60, **SETTINGS)
@given(model=model_sections)
def test_random_model_sections(workdir, model):
    """60 cases of model names and constructor overrides checked by the model registry (if present)."""
    _count("model sections")
    path = workdir / "model.yaml"
    path.write_text(yaml.safe_dump({"model": model}))
    _load_ok_or_cvlab_error(path)


@settings(max_examples=120, **SETTINGS)
@given(items=st.lists(set_strings, min_size=1, max_size=3))
def test_random_set_strings(workdir, items):
    """120 cases of random `--set` strings through the CLI (`--set=...` so argparse never eats them)."""
    _count("--set")
    _cli_ok_or_exit_2(["validate", str(workdir / "valid.yaml"), *[f"--set={s}" for s in items]])


@settings(max_examples=80, **SETTINGS)
@given(mapping=st.dictionaries(st.one_of(st.sampled_from(PATHS), keys, st.integers()), values, max_size=3))
def test_random_apply_overrides(workdir, mapping):
    """80 cases of random override mappings (the per-trial path of `cvlab tune`)."""
    _count("apply_overrides")
    base = load_spec(workdir / "valid.yaml")
    try:
        new = apply_overrides(base, mapping)
    except CvlabError as err:
        assert str(err).strip()
    else:
        assert isinstance(new, ExperimentSpec) and base.optim.lr == 0.1


# Fresh cases: the fixed cases above are the same every run (derandomized); these are new each run, from a
# seed printed here (set CVLAB_FUZZ_SEED to replay a failure).
FRESH_SEED = int(os.environ.get("CVLAB_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
FRESH = {"database": None, "deadline": None, "derandomize": False,
         "suppress_health_check": [HealthCheck.too_slow, HealthCheck.filter_too_much]}


@seed(FRESH_SEED)
@settings(max_examples=30, **FRESH)
@given(d=spec_dicts)
def test_fresh_random_specs(workdir, d):
    """30 new random nested specs every run (seed printed by test_case_count)."""
    _count("fresh nested dicts")
    d.pop("_base_", None)
    path = workdir / "fresh.yaml"
    try:
        path.write_text(yaml.safe_dump(d, allow_unicode=True))
    except (yaml.YAMLError, UnicodeEncodeError):
        return
    _cli_ok_or_exit_2(["validate", str(path)])


@seed(FRESH_SEED + 1)
@settings(max_examples=30, **FRESH)
@given(items=st.lists(set_strings, min_size=1, max_size=3))
def test_fresh_random_set_strings(workdir, items):
    """30 new random `--set` strings every run."""
    _count("fresh --set")
    _cli_ok_or_exit_2(["validate", str(workdir / "valid.yaml"), *[f"--set={s}" for s in items]])


# The number of cases each property above must have generated.
EXPECTED = {"yaml text": 100, "mutated yaml": 80, "nested dicts": 120, "model sections": 60, "--set": 120,
            "apply_overrides": 80, "fresh nested dicts": 30, "fresh --set": 30}


def test_case_count():
    """Runs last in this module: every property above generated all its cases (printed with -s)."""
    print(f"fuzz cases: {COUNTS}, total {sum(COUNTS.values())}; fresh cases from seed {FRESH_SEED} "
          f"(replay: CVLAB_FUZZ_SEED={FRESH_SEED})")
    assert COUNTS == EXPECTED
