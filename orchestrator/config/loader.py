"""Load experiment YAML files into `ExperimentSpec`, with `_base_` inheritance and `--set` overrides.

    _base_: [../_base_/imagenet.yaml]     # or a single string; paths relative to this file
    model: {name: cednet50}
    optim:
      _delete_: true                        # replace the inherited section instead of merging into it

Bases are merged in order (dicts deep-merged, later wins, lists replaced), then the file itself, then
`--set a.b=c` overrides (values read as YAML scalars / flow values). Every problem -- missing file,
invalid YAML, unknown key, wrong type, bad override, unknown model or model key -- becomes one
`CvlabError` naming the file (and line), the dotted path and, for unknown keys, the nearest valid one.

Files larger than MAX_FILE_BYTES and documents whose anchors/aliases expand beyond MAX_EXPANDED_NODES
values are refused with one message.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pydantic import BaseModel

from orchestrator.config.messages import format_validation_errors, show, type_name, unknown_model, where
from orchestrator.config.paths import (
    BASE_KEY,
    DELETE_KEY,
    DOTTED_KEY_FIELDS,
    MODEL_OVERRIDE_KEYS,
    Path_,
    is_mapping_type,
    nearest_path,
    suggest,
    unwrap_section,
)
from orchestrator.config.schema import ExperimentSpec, ModelSection
from orchestrator.errors import CvlabError

MAX_PARAM_CHARS = 500  # MLflow's limit on a param value is larger; keep params readable
# A YAML file is refused beyond these: experiment files are a few KB, and anchors/aliases could otherwise
# expand a 10-line file into billions of values ("billion laughs").
MAX_FILE_BYTES = 1 << 20
MAX_EXPANDED_NODES = 20_000


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 floats such as `1e-4` as numbers (YAML 1.1 needs `1.0e-4`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


# ----------------------------------------------------------------------------------------------
# Public API


def load_spec(path: str | os.PathLike, overrides: Iterable[str] = (), *, validate_model: bool = True
              ) -> ExperimentSpec:
    """Load, merge (`_base_`), override (`a.b=c` strings) and validate an experiment file."""
    if isinstance(overrides, str):  # a single "a.b=c" rather than a list of them
        overrides = [overrides]
    raw, prov, sources = _load_tree(Path(path).expanduser(), ())
    for item in overrides or ():
        key, value = parse_set(item)
        parts = check_path(key, f"--set {item}")
        _set_path(raw, parts, value)
        _mark(prov, parts, f"--set {item}")
        sources.append(f"--set {item}")
    return _validate(raw, prov, str(path), sources, validate_model)


def load_spec_with_sources(path: str | os.PathLike, overrides: Iterable[str] = ()
                           ) -> tuple[ExperimentSpec, list[str]]:
    """`load_spec` plus the files and overrides it was built from, in merge order."""
    spec = load_spec(path, overrides)
    return spec, spec.sources


def spec_from_dict(d: Mapping[str, Any], source: str = "<dict>", *, validate_model: bool = True
                   ) -> ExperimentSpec:
    """Validate a plain dict (e.g. parsed YAML). A `_base_` in it is resolved relative to the cwd."""
    if not isinstance(d, Mapping):
        raise CvlabError(f"{source}: an experiment spec must be a mapping of sections, got {show(d)}")
    raw, prov = to_plain(dict(d)), {}
    sources = [source]
    if BASE_KEY in raw:
        raw, prov, bases = _merge_bases(raw, prov, source, Path.cwd(), ())
        sources = bases + sources
    raw = _strip_delete(raw, source)
    return _validate(raw, prov, source, sources, validate_model)


def spec_to_dict(spec: ExperimentSpec) -> dict[str, Any]:
    """A plain, YAML/JSON-friendly dict that `spec_from_dict` turns back into an equal spec."""
    return spec.model_dump(mode="json")


def flatten_spec(spec: ExperimentSpec) -> dict[str, str]:
    """Dotted keys -> string values (for MLflow params). Unset optional sections are left out."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
            return
        text = _scalar_text(value)
        out[prefix] = text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 3] + "..."

    for section, value in spec_to_dict(spec).items():
        if value is not None:
            walk(section, value)
    return out


def apply_overrides(spec: ExperimentSpec, mapping: Mapping[str, Any]) -> ExperimentSpec:
    """A new validated spec with `{"model.reduction_ratio": 8, ...}` applied (values used as given)."""
    if not isinstance(mapping, Mapping):
        raise CvlabError(f"overrides must be a mapping of dotted paths to values, got {show(mapping)}")
    raw = spec_to_dict(spec)
    prov: dict[Path_, str] = {}
    for key, value in mapping.items():
        label = f"override {key}"
        parts = check_path(key, label)
        _set_path(raw, parts, to_plain(value))
        _mark(prov, parts, label)
    sources = spec.sources + [f"override {k}" for k in mapping]
    return _validate(raw, prov, "<overrides>", sources, True)


def parse_set(item: str) -> tuple[str, Any]:
    """`"optim.lr=0.1"` -> `("optim.lr", 0.1)`; the value is read as a YAML scalar or flow value."""
    if not isinstance(item, str):
        raise CvlabError(f"bad --set {item!r}: expected a string KEY=VALUE")
    if "=" not in item:
        raise CvlabError(f"bad --set {item!r}: expected KEY=VALUE, e.g. --set optim.lr=0.1")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key:
        raise CvlabError(f"bad --set {item!r}: the key before '=' is empty")
    if len(text) > 10_000:
        raise CvlabError(f"bad --set {key}=...: the value is {len(text)} characters long (at most 10000)")
    try:
        value = _load_value(text, f"--set {key}")  # None for an empty value
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise CvlabError(f"bad --set {item!r}: the value is not valid YAML ({problem})") from None
    except RecursionError:
        raise CvlabError(f"bad --set {key}=...: the value is nested too deeply") from None
    if isinstance(value, (dict, list)):
        _check_keys_are_strings(value, f"--set {item}")
    return key, value


def _load_value(text: str, source: str) -> Any:
    loader = _Loader(text)  # a SafeLoader
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, source)
        return loader.construct_document(node)
    finally:
        loader.dispose()


# ----------------------------------------------------------------------------------------------
# Reading files


def _read_yaml(path: Path, included_from: str | None) -> tuple[dict, dict[Path_, str]]:
    """A YAML file's top-level mapping and `{key path: "file:line"}` for every mapping key in it."""
    origin = f" (from {included_from})" if included_from else ""
    if not path.exists():
        raise CvlabError(f"{path}: file not found{origin}")
    if path.is_dir():
        raise CvlabError(f"{path}: is a directory, expected a YAML file{origin}")
    if not path.is_file():  # a device or pipe could block forever
        raise CvlabError(f"{path}: not a regular file{origin}")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise CvlabError(f"{path}: {path.stat().st_size} bytes is too large for an experiment file "
                         f"(at most {MAX_FILE_BYTES} bytes){origin}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CvlabError(f"{path}: not a UTF-8 text file{origin}") from None
    except OSError as err:
        raise CvlabError(f"{path}: cannot read ({err.strerror or err}){origin}") from None
    loader = None
    try:
        loader = _Loader(text)  # already checks for unprintable characters
        node = loader.get_single_node()
        if node is not None:
            _check_expansion(node, str(path))
            _check_nodes(node, path)
        data = loader.construct_document(node) if node is not None else None
        prov: dict[Path_, str] = {}
        if node is not None:
            _node_lines(node, (), path, prov)
    except yaml.reader.ReaderError as err:
        char = chr(err.character)  # a code point: the reader was given text, not bytes
        raise CvlabError(f"{path}: invalid YAML: character {char!r} at offset {err.position} "
                         f"is not allowed{origin}") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        at = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = err.problem or err.context or "syntax error"
        raise CvlabError(f"{at}: invalid YAML: {problem}{origin}") from None
    except yaml.YAMLError as err:
        raise CvlabError(f"{path}: invalid YAML: {str(err).splitlines()[0]}{origin}") from None
    except RecursionError:
        raise CvlabError(f"{path}: invalid YAML: nested too deeply{origin}") from None
    finally:
        if loader is not None:
            loader.dispose()
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise CvlabError(f"{path}: the top level must be a mapping of sections (experiment:, model:, ...), "
                         f"got {show(data)}")
    return data, prov


def _check_expansion(node: yaml.Node, source: str) -> None:
    """Refuse documents whose aliases expand beyond MAX_EXPANDED_NODES values (counted without expanding)."""
    sizes: dict[int, int | None] = {}  # None while a node is being counted
    aliases = 0

    def size(n: yaml.Node) -> int:
        nonlocal aliases
        if id(n) in sizes:
            if sizes[id(n)] is None:  # reached again from inside itself: every later step would recurse forever
                raise CvlabError(f"{source}: invalid YAML: the node anchored at line {n.start_mark.line + 1} "
                                 f"contains an alias to itself")
            aliases += 1
            return sizes[id(n)]
        sizes[id(n)] = None
        if isinstance(n, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in n.value)
        elif isinstance(n, yaml.SequenceNode):
            total = 1 + sum(size(v) for v in n.value)
        else:
            total = 1
        sizes[id(n)] = total
        return total

    total = size(node)  # a RecursionError is the callers' "nested too deeply" (PyYAML's composer hits it first)
    if total > MAX_EXPANDED_NODES:
        raise CvlabError(f"{source}: refused: its anchors and aliases ({aliases} uses) expand to {total} values, "
                         f"more than the {MAX_EXPANDED_NODES} an experiment file may hold")


def _check_nodes(node: yaml.Node, path: Path, seen: set | None = None) -> None:
    """Reject duplicate keys and non-string keys (`on:` is a boolean in YAML 1.1) before constructing."""
    seen = set() if seen is None else seen
    if id(node) in seen:  # aliases may share nodes
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        keys: dict[tuple[str, str], int] = {}
        for knode, vnode in node.value:
            if knode.tag == "tag:yaml.org,2002:merge":
                _check_nodes(vnode, path, seen)
                continue
            line = knode.start_mark.line + 1
            if not isinstance(knode, yaml.ScalarNode) or knode.tag != "tag:yaml.org,2002:str":
                shown = knode.value if isinstance(knode, yaml.ScalarNode) else "a " + knode.id
                raise CvlabError(f"{path}:{line}: key {shown!r} is not a string (YAML reads it as "
                                 f"{knode.tag.rsplit(':', 1)[-1]}); quote it")
            ident = (knode.tag, knode.value)
            if ident in keys:
                raise CvlabError(f"{path}:{line}: duplicate key {knode.value!r} (first at line {keys[ident]})")
            keys[ident] = line
            _check_nodes(vnode, path, seen)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_nodes(item, path, seen)


def _node_lines(node: yaml.Node, prefix: Path_, path: Path, prov: dict[Path_, str], depth: int = 0) -> None:
    """`prov[key path] = "file:line"` for the keys of nested mappings, 13 levels deep (scalar keys only: `_check_nodes`
    refused the others)."""
    if not isinstance(node, yaml.MappingNode) or depth > 12:
        return
    for knode, vnode in node.value:
        key = prefix + (knode.value,)
        prov[key] = f"{path}:{knode.start_mark.line + 1}"
        _node_lines(vnode, key, path, prov, depth + 1)


def _load_tree(path: Path, stack: tuple[Path, ...], included_from: str | None = None
               ) -> tuple[dict, dict[Path_, str], list[str]]:
    """The merged raw dict of `path` and its bases, its provenance, and the files in merge order."""
    resolved = path.resolve()
    if resolved in stack:
        chain = " -> ".join(str(p) for p in (*stack, resolved))
        raise CvlabError(f"{path}: _base_ cycle: {chain}")
    data, prov = _read_yaml(path, included_from)
    data, prov, bases = _merge_bases(data, prov, str(path), path.parent, (*stack, resolved))
    return _strip_delete(data, str(path)), prov, bases + [str(path)]


def _merge_bases(data: dict, prov: dict[Path_, str], source: str, base_dir: Path,
                 stack: tuple[Path, ...]) -> tuple[dict, dict[Path_, str], list[str]]:
    if BASE_KEY not in data:
        return data, prov, []
    entry = data.pop(BASE_KEY)
    entries = [entry] if isinstance(entry, str) else entry
    if not isinstance(entries, list) or not all(isinstance(e, str) and e.strip() for e in entries):
        raise CvlabError(f"{source}: {BASE_KEY} must be a file path or a list of file paths, got {show(entry)}")
    merged: dict = {}
    merged_prov: dict[Path_, str] = {}
    files: list[str] = []
    for rel in entries:
        base_path = Path(os.path.normpath(base_dir / os.path.expanduser(rel)))
        base, base_prov, base_files = _load_tree(base_path, stack, included_from=source)
        merged = _deep_merge(merged, base)
        merged_prov.update(base_prov)
        files += [f for f in base_files if f not in files]
    merged = _deep_merge(merged, data)
    merged_prov.update({k: v for k, v in prov.items() if k != (BASE_KEY,)})
    return merged, merged_prov, files


def _deep_merge(base: Any, child: Any) -> Any:
    """Dicts merge key by key (child wins); anything else, lists included, is replaced by the child."""
    if not isinstance(base, dict) or not isinstance(child, dict):
        return child
    if child.get(DELETE_KEY) is True:
        return dict(child)  # `_delete_` is stripped after merging
    out = dict(base)
    for key, value in child.items():
        out[key] = _deep_merge(out[key], value) if key in out else value
    return out


def _strip_delete(data: Any, source: str, prefix: Path_ = ()) -> Any:
    if not isinstance(data, dict):
        return data
    if DELETE_KEY in data and not isinstance(data[DELETE_KEY], bool):
        raise CvlabError(f"{source}: {'.'.join(prefix + (DELETE_KEY,))} must be true or false, "
                         f"got {show(data[DELETE_KEY])}")
    return {k: _strip_delete(v, source, prefix + (k,)) for k, v in data.items() if k != DELETE_KEY}


# ----------------------------------------------------------------------------------------------
# Overrides


def check_path(key: Any, label: str) -> Path_:
    """Split a dotted path and check it against the schema; CvlabError with a suggestion if unknown."""
    if not isinstance(key, str):
        raise CvlabError(f"{label}: a path must be a dotted string, got {show(key)}")
    parts = tuple(p.strip() for p in key.split("."))
    if not key.strip() or any(not p for p in parts):
        raise CvlabError(f"{label}: bad path {key!r} (empty key between dots)")
    cls: type[BaseModel] | None = ExperimentSpec
    for i, part in enumerate(parts):
        here = parts[: i + 1]
        if part in (BASE_KEY, DELETE_KEY):
            raise CvlabError(f"{label}: {part} cannot be set with an override")
        field = cls.model_fields.get(part)
        if field is None:
            if cls is ModelSection:  # extra keys are model constructor overrides
                return parts
            near = suggest(".".join(here), ".".join(parts))
            hint = f"; did you mean {near}?" if near else ""
            raise CvlabError(f"{label}: unknown path {'.'.join(here)}{hint}")
        inner = unwrap_section(field.annotation)
        if inner is not None:
            cls = inner
            continue
        rest = parts[i + 1:]
        if not rest:
            return parts
        if here in DOTTED_KEY_FIELDS:
            return here + (".".join(rest),)
        if is_mapping_type(field.annotation):
            return parts
        raise CvlabError(f"{label}: {'.'.join(here)} is {type_name(field.annotation)} and has no key "
                         f"{rest[0]!r}")
    return parts


def _set_path(raw: dict, parts: Path_, value: Any) -> None:
    node = raw
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}  # also fills an unset optional section (search:, detection:)
        node = node[part]
    node[parts[-1]] = value


def _mark(prov: dict[Path_, str], parts: Path_, label: str) -> None:
    for key in [k for k in prov if k[: len(parts)] == parts]:
        del prov[key]
    prov[parts] = label


# ----------------------------------------------------------------------------------------------
# Validation and messages


def _validate(raw: dict, prov: dict[Path_, str], source: str, sources: list[str],
              validate_model: bool) -> ExperimentSpec:
    _check_keys_are_strings(raw, source)
    try:
        spec = ExperimentSpec.model_validate(raw)
    except ValidationError as err:
        raise CvlabError(format_validation_errors(err, prov, source)) from None
    if validate_model and spec.model is not None:
        _validate_model(spec, prov, source)
    spec._sources = list(sources)
    return spec


def _validate_model(spec: ExperimentSpec, prov: dict[Path_, str], source: str) -> None:
    """Ask the model registry whether `model.name` and its overrides are valid (when it is importable: a
    machine that only submits jobs may lack torch; the builder checks the model where it runs)."""
    try:
        from workloads.models import list_models, validate_model_config
    except ImportError:
        return

    name, overrides = spec.model.name, spec.model.overrides
    try:
        validate_model_config(name, **overrides)
    except (ValueError, TypeError, KeyError) as err:
        text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        key = next((k for k in sorted(overrides, key=len, reverse=True) if k in text), None)
        if key is None:
            names = list(list_models())
            if name not in names:
                raise CvlabError(unknown_model(name, names, prov, source)) from None
            # An unknown constructor argument that the message does not name: guess the closest.
            key = next((k for k in overrides if k not in MODEL_OVERRIDE_KEYS), None)
        dotted = f"model.{key}" if key else "model.name"
        hint = ""
        if key and key not in MODEL_OVERRIDE_KEYS and "did you mean" not in text:
            near = nearest_path(dotted, [f"model.{k}" for k in MODEL_OVERRIDE_KEYS])
            hint = f" (did you mean {near}?)" if near else ""
        raise CvlabError(f"{where(prov, tuple(dotted.split('.')), source)}: {dotted}: {text}{hint}") from None


def _check_keys_are_strings(data: Any, source: str, prefix: Path_ = ()) -> None:
    if isinstance(data, dict):
        for k, v in data.items():
            if not isinstance(k, str):
                at = ".".join(prefix) or "the top level"
                raise CvlabError(f"{source}: {at}: key {k!r} is not a string; quote it")
            _check_keys_are_strings(v, source, prefix + (k,))
    elif isinstance(data, list):
        for v in data:
            _check_keys_are_strings(v, source, prefix)


def to_plain(value: Any) -> Any:
    """Numpy scalars/arrays (e.g. sampled by Ray Tune) to Python values; containers recursively (tuples
    become lists)."""
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return value.tolist()
    return value


def _scalar_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)  # values of spec_to_dict: JSON types only


def spec_yaml(spec: ExperimentSpec) -> str:
    """The resolved spec as YAML (the `resolved.yaml` artifact, `cvlab validate`'s output)."""
    return yaml.safe_dump(spec_to_dict(spec), sort_keys=False, default_flow_style=False)
