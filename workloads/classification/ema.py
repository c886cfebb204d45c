"""Exponential moving average of the model weights (timm's `ModelEmaV3`), with state that fits our checkpoints.

    ema = create_ema(model, optim.ema_decay)              # None when ema_decay is null
    ...after each optimizer step:  update_ema(ema, model, global_step)
    validate ema.module like the model; checkpoint: {"ema": ema_state_dict(ema)}; resume: load_ema_state_dict

Create it after the model is on its device and before (or from inside) the DDP wrapper: it deep-copies the
bare network. Every floating-point entry of the state dict (weights and BN statistics) is averaged;
integer buffers (`num_batches_tracked`) are copied. `step` is the optimizer-step count (1 for the first step):
timm's V3 copies the weights outright for steps 0 and 1 and averages with `decay` afterwards, so a resumed run
continues exactly where the checkpointed one stopped.
"""
from __future__ import annotations

from timm.utils import ModelEmaV3

from workloads.distributed import unwrap


def create_ema(model, decay: float | None):
    """A `timm.utils.ModelEmaV3` of `model` with `decay` (e.g. 0.9998), or None when `decay` is None."""
    if decay is None:
        return None
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < decay < 1.0:
        raise ValueError(f"optim.ema_decay must be null or a number in (0, 1), got {decay!r}")
    return ModelEmaV3(unwrap(model), decay=float(decay))


def update_ema(ema, model, step: int) -> None:
    """Fold the current weights of `model` into `ema` after optimizer step `step` (no-op when ema is None)."""
    if ema is not None:
        ema.update(unwrap(model), step=step)


def ema_state_dict(ema) -> dict:
    """The averaged weights as plain CPU tensors with the model's own keys (loadable with weights_only=True,
    and into a fresh model with `load_state_dict`)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in ema.module.state_dict().items()}


def load_ema_state_dict(ema, state: dict) -> None:
    """Restore what `ema_state_dict` returned (strict: every key, every shape)."""
    ema.module.load_state_dict(state, strict=True)
