"""Training checkpoints of the classification workload: the model file (`workloads.models` format) and the
training state (optimizer, scheduler, scaler, EMA, epoch, RNG states), written so that no half-written file
ever sits under its real name, and read back with weights_only=True."""
from __future__ import annotations

import os

import torch

from workloads.classification.reproducibility import rng_state, set_rng_state
from workloads.distributed import unwrap
from workloads.models import load_checkpoint, save_checkpoint

MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"
PARTIAL_SUFFIX = ".partial"


def save_training_checkpoint(directory: str, model, optimizer, scheduler, scaler, epoch: int, extra: dict,
                             model_info: dict | None = None) -> None:
    """Write the model (loadable with `workloads.models.load_checkpoint`, with `model_info` and the epoch in
    its extra: class names, metrics) and the training state (`extra` too: EMA weights, counters), then
    publish them: both files are written under temporary names, read back (ValueError if they do not
    reload), and only then renamed into place. A process killed on the way leaves no file under a real name.
    """
    partial = {name: os.path.join(directory, name + PARTIAL_SUFFIX) for name in (MODEL_FILE, STATE_FILE)}
    save_checkpoint(partial[MODEL_FILE], unwrap(model), extra={"epoch": epoch, **(model_info or {})})
    torch.save(
        {
            "epoch": epoch,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": rng_state(),
            **extra,
        },
        partial[STATE_FILE],
    )
    _read(partial[MODEL_FILE], partial[STATE_FILE], directory)  # publish only what reloads
    for name, path in partial.items():
        os.replace(path, os.path.join(directory, name))


def read_training_checkpoint(directory: str) -> tuple[dict, dict]:
    """Both files of a training checkpoint, loaded with weights_only: (model state dict, training state).

    ValueError naming the folder when it is unusable (truncated file, bad pickle, missing file or key).
    """
    return _read(os.path.join(directory, MODEL_FILE), os.path.join(directory, STATE_FILE), directory)


def verify_training_checkpoint(directory: str) -> int:
    """Reload both files of a training checkpoint; returns its epoch, ValueError if unusable."""
    return int(read_training_checkpoint(directory)[1]["epoch"])


def _read(model_file: str, state_file: str, directory: str) -> tuple[dict, dict]:
    try:
        saved_model, _ = load_checkpoint(model_file, map_location="cpu")
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        int(state["epoch"])
    except Exception as err:  # every failure here means "this checkpoint cannot be used"
        raise ValueError(f"checkpoint {directory} is unreadable ({type(err).__name__}: {err})") from err
    return saved_model.state_dict(), state


def apply_training_state(loaded: tuple[dict, dict], model, optimizer, scheduler, scaler) -> dict:
    """Load a `read_training_checkpoint` result into the live objects; returns the training state."""
    model_state, state = loaded
    unwrap(model).load_state_dict(model_state)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return state


