"""Where a trained model comes from: `--checkpoint SRC` / `--model SRC` of `cvlab eval`, `predict` and `export`.

SRC may be
- a local checkpoint file: ours (`workloads.models.save_checkpoint` format), a published mmcls RedNet file
  (`--format mmcls`), or an mmengine (mmdet / mmseg) `.pth`;
- a Ray Train checkpoint folder (holding `model.pt`), or a cvlab Ray Train run folder (its newest checkpoint);
- `runs:/<run_id>/<artifact path>` (e.g. `runs:/<id>/checkpoints/best`) or `models:/<name>/<version>`, fetched
  through MLflow with an explicit tracking URI.

`resolve_source` turns it into a local file and says what it is; nothing here unpickles code: our files and
published ones are read with weights_only=True (published mmcv 1.x files with an allow-list of the numpy types
their `meta` keeps, never weights_only=False).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow import MlflowClient

from orchestrator.errors import CvlabError
from orchestrator.runs.records import read_record
from orchestrator.tracking.server import resolve_tracking_uri
from workloads.models.checkpoint import FORMAT

log = logging.getLogger(__name__)
FORMATS = ("auto", "cvlab", "mmcls", "mmengine")
# What a cvlab MLflow model (orchestrator.tracking.models) keeps: our checkpoint file among its artifacts.
MODEL_CHECKPOINT_NAME = "model.pt"


@dataclass
class Source:
    """A resolved model source: a local file and what it holds."""

    path: str  # a local file
    format: str  # cvlab | mmcls | mmengine
    given: str  # what the user wrote
    run_id: str | None = None  # the MLflow run it came from, when known
    notes: list[str] = field(default_factory=list)


def resolve_source(src: str, *, fmt: str = "auto", tracking_uri: str | None = None,
                   download_dir: str | None = None) -> Source:
    """The local checkpoint file behind `src` (see the module docstring). CvlabError when there is none."""
    if fmt not in FORMATS:
        raise CvlabError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if not isinstance(src, str) or not src.strip():
        raise CvlabError("no model source given: pass a checkpoint path, runs:/<run_id>/<path> or models:/<name>/<v>")
    notes: list[str] = []
    if src.startswith(("runs:/", "models:/")):
        local, run_id = _download(src, tracking_uri, download_dir)
        notes.append(f"downloaded {src} to {local}")
    else:
        local = Path(src).expanduser()
        if not local.exists():
            raise CvlabError(f"model source {src}: no such file or folder")
        run_id = _run_of_folder(local)
    path = _checkpoint_file(Path(local), src, notes)
    return Source(path=str(path), format=_format_of(path, fmt), given=src, run_id=run_id, notes=notes)


def _download(uri: str, tracking_uri: str | None, download_dir: str | None) -> tuple[Path, str | None]:
    """Fetch a `runs:/` or `models:/<name>/<version>` URI through an MlflowClient of `tracking_uri` (also the
    registry); MLflow's process-wide tracking URI and the environment are left alone."""
    uri_tracking = tracking_uri or resolve_tracking_uri(None)
    try:
        client = MlflowClient(tracking_uri=uri_tracking, registry_uri=uri_tracking)
        if uri.startswith("models:/"):
            run_id, artifact_uri = _model_version_location(client, uri)
        else:
            run_id, artifact_uri = uri[len("runs:/"):].split("/", 1)[0], uri
        local = mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=download_dir,
                                                    tracking_uri=uri_tracking, registry_uri=uri_tracking)
    except CvlabError:
        raise
    except Exception as err:  # MlflowException, requests errors, missing artifacts
        first = str(err).strip().splitlines()
        raise CvlabError(f"cannot fetch {uri} from MLflow at {uri_tracking}: {first[0] if first else err}") from err
    return Path(local), run_id


def _model_version_location(client, uri: str) -> tuple[str | None, str]:
    """(run id, artifact URI) of registered model version `models:/<name>/<version>`.

    Resolved here rather than by MLflow's `models:/` artifact repository, which looks registered models up
    through the process-wide registry URI instead of the one it is given.
    """
    name, _, version = uri[len("models:/"):].partition("/")
    if not name or not version.isdigit():
        raise CvlabError(f"model source {uri}: expected models:/<name>/<version> (a version number)")
    run_id = client.get_model_version(name, version).run_id
    location = client.get_model_version_download_uri(name, version)
    if location.startswith("models:/"):  # a logged model's URI (MLflow 3): its artifact location
        location = client.get_logged_model(location[len("models:/"):].split("/")[0]).artifact_location
    return run_id, location


def _run_of_folder(path: Path) -> str | None:
    """The MLflow run of a cvlab Ray Train run folder (or of a checkpoint folder inside one)."""
    for folder in (path, path.parent, path.parent.parent):
        record = read_record(None, str(folder)) if folder.is_dir() else None
        if record:
            return record.get("mlflow_run_id")
    return None


def _checkpoint_file(path: Path, given: str, notes: list[str]) -> Path:
    """A file: as is. A folder: its model file, the newest checkpoint of a run folder, or an MLflow model's."""
    if path.is_file():
        return path
    candidates = [path / MODEL_CHECKPOINT_NAME, path / "artifacts" / MODEL_CHECKPOINT_NAME]
    for cand in candidates:
        if cand.is_file():
            return cand
    checkpoints = sorted(p for p in path.glob("checkpoint_*") if (p / MODEL_CHECKPOINT_NAME).is_file())
    if checkpoints:
        notes.append(f"{given} is a run folder: using its newest checkpoint {checkpoints[-1].name}")
        return checkpoints[-1] / MODEL_CHECKPOINT_NAME
    mm = sorted(path.glob("*.pth"))
    if len(mm) == 1:
        return mm[0]
    numbered = [p for p in mm if _mm_step(p) is not None]
    if numbered:  # e.g. a resumed run's checkpoints/last: epoch_2.pth (before the resume) and epoch_4.pth
        newest = max(numbered, key=_mm_step)
        notes.append(f"{given} holds {len(mm)} checkpoints: using the newest, {newest.name}")
        return newest
    raise CvlabError(f"model source {given}: {path} holds no checkpoint ({MODEL_CHECKPOINT_NAME}, checkpoint_*/ "
                     f"folders or one .pth file)")


def _mm_step(path: Path) -> int | None:
    """The epoch or iteration of an mmengine checkpoint name (`epoch_12.pth`, `iter_80000.pth`), else None."""
    kind, _, number = path.stem.partition("_")
    return int(number) if kind in ("epoch", "iter") and number.isdigit() else None


def _format_of(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if path.suffix == ".pth":
        return "mmengine"
    return "cvlab"


def read_classifier(source: Source) -> tuple[str, dict[str, Any], dict, dict[str, Any]]:
    """(model name, constructor overrides, state dict, extra) of a classifier checkpoint.

    cvlab files carry their architecture and class names; published mmcls files carry neither: their weights
    are mapped onto the spec's model (`load_published_rednet`) by the caller.
    """
    if source.format != "cvlab":
        raise CvlabError(f"{source.given} is a {source.format} checkpoint; classifiers read cvlab files here "
                         "(published mmcls files: --format mmcls with the experiment's model)")
    try:
        payload = torch.load(source.path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated file, pickled code (refused), not a torch file
        raise CvlabError(f"{source.given}: cannot read {source.path} ({type(err).__name__}: "
                         f"{_first_line(err)})") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CvlabError(f"{source.given}: {source.path} is not a cvlab model checkpoint (use --format mmcls for "
                         "a published RedNet file)")
    return payload["arch_name"], dict(payload["arch_overrides"]), payload["state_dict"], payload.get("extra") or {}


def _first_line(err: BaseException) -> str:
    lines = [ln for ln in str(err).splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__


def short_run_label(source: Source) -> str:
    """What the evaluation's MLflow run records as its source (`cvlab.source_run`)."""
    return source.run_id or re.sub(r"\s+", " ", source.given)[:250]
