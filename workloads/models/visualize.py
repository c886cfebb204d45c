"""Heat maps of the kernels an involution / C-volution layer generates for one image (the paper's figure).

Per group (one row each): left, the K x K kernel summed at every output position, upsampled over the image;
right, the K x K kernels themselves drawn at a grid of positions on the image.

Pillow and matplotlib are imported where they are used: `workloads.models` must import on a lent GPU machine,
whose stack is torch and numpy only (benchmarks/gpu_check.py).
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from workloads.ops import Cvolution2d, Involution2d

_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


def _operators(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (Involution2d, Cvolution2d))}


def default_layer(names: list[str]) -> str:
    """The last operator of stage 2: 1/8 resolution, deep enough to be about the image content."""
    stage2 = [n for n in names if n.startswith("layer2.")]
    return stage2[-1] if stage2 else names[-1]


def _to_input(image, in_channels: int, normalize: bool) -> tuple[torch.Tensor, np.ndarray]:
    """(model input (1, C, H, W), display image (H, W, 3) in [0, 1]) from a path, PIL image, array, tensor."""
    if isinstance(image, (str, os.PathLike)):
        from PIL import Image

        with Image.open(image) as im:
            image = np.asarray(im.convert("RGB" if in_channels == 3 else "L"))
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
        image = np.asarray(image.convert("RGB" if in_channels == 3 else "L"))
    if isinstance(image, np.ndarray):
        arr = image.astype(np.float32)
        if image.dtype == np.uint8:
            arr /= 255.0
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.ndim != 3:
            raise ValueError(f"image array must be HxW or HxWxC, got shape {image.shape}")
        x = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))[None]
        if normalize and x.shape[1] == 3:
            x = (x - torch.tensor(_MEAN).view(1, 3, 1, 1)) / torch.tensor(_STD).view(1, 3, 1, 1)
        display = arr
    elif isinstance(image, torch.Tensor):
        # A tensor is taken as the model input as is (already normalised).
        x = image.detach().float().cpu()
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[0] != 1:
            raise ValueError(f"image tensor must be (C, H, W) or (1, C, H, W), got {tuple(image.shape)}")
        d = x[0].permute(1, 2, 0).numpy()
        display = (d - d.min()) / max(float(d.max() - d.min()), 1e-8)
    else:
        msg = f"image must be a path, PIL image, numpy array or tensor, got {type(image).__name__}"
        raise ValueError(msg)  # noqa: TRY004
    if x.shape[1] != in_channels:
        raise ValueError(f"image has {x.shape[1]} channels, the model expects {in_channels}")
    if display.shape[2] == 1:
        display = np.repeat(display, 3, axis=2)
    return x, np.clip(display[:, :, :3], 0.0, 1.0)


def visualize_kernels(model: nn.Module, image, layer: str | None = None,
                      out_png: str | os.PathLike = "kernels.png",
                      grid: int = 6, max_groups: int = 4, normalize: bool = True) -> str:
    """Draw the kernels operator `layer` (e.g. "layer2.0.conv2") generates for `image`; returns the PNG path.

    `image`: a path, PIL image or HxWxC array (scaled to [0, 1] and ImageNet-normalised when `normalize`), or
    a (1, C, H, W) tensor used as the model input as is. Shows up to `max_groups` groups (evenly spread) and a
    `grid` x `grid` lattice of positions.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ops = _operators(model)
    if not ops:
        name = getattr(model, "arch_name", type(model).__name__)
        raise ValueError(f"{name} has no involution or C-volution "
                         "layers to visualise (the ResNet baseline generates no kernels)")
    layer = default_layer(list(ops)) if layer is None else layer
    if layer not in ops:
        raise ValueError(f"unknown operator layer {layer!r}; valid layers: {', '.join(ops)}")
    if grid < 1 or max_groups < 1:
        raise ValueError(f"grid and max_groups must be >= 1, got grid={grid}, max_groups={max_groups}")
    op = ops[layer]
    param = next(model.parameters())
    in_channels = getattr(getattr(model, "cfg", None), "in_channels", 3)
    x, display = _to_input(image, in_channels, normalize)
    x = x.to(device=param.device, dtype=param.dtype)

    captured = {}
    handle = op.register_forward_pre_hook(lambda m, inp: captured.setdefault("x", inp[0]))
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            model(x)
            kernel = op.generate_kernel(captured["x"])  # (1, G, K, K, Ho, Wo)
    finally:
        handle.remove()
        for m, mode in modes.items():
            m.training = mode
    kernel = kernel[0].float().cpu().numpy()
    groups, k, _, ho, wo = kernel.shape
    shown = sorted({round(i) for i in np.linspace(0, groups - 1, min(groups, max_groups))})
    h, w = display.shape[:2]

    fig = Figure(figsize=(10, 4.6 * len(shown) + 0.6), dpi=100)
    FigureCanvasAgg(fig)
    for row, g in enumerate(shown):
        ax_sum = fig.add_subplot(len(shown), 2, 2 * row + 1)
        ax_grid = fig.add_subplot(len(shown), 2, 2 * row + 2)
        summed = kernel[g].sum(axis=(0, 1))  # (Ho, Wo)
        ax_sum.imshow(display, extent=(0, w, h, 0))
        im = ax_sum.imshow(summed, cmap="jet", alpha=0.5, extent=(0, w, h, 0), interpolation="bilinear")
        fig.colorbar(im, ax=ax_sum, fraction=0.046, pad=0.04)
        ax_sum.set_title(f"group {g}: sum of each {k}x{k} kernel")
        ax_grid.imshow(display, extent=(0, w, h, 0))
        cell = 0.8 * min(h, w) / grid
        for i in np.linspace(0, ho - 1, min(grid, ho)).round().astype(int):
            for j in np.linspace(0, wo - 1, min(grid, wo)).round().astype(int):
                cy, cx = (i + 0.5) * h / ho, (j + 0.5) * w / wo
                kern = kernel[g, :, :, i, j]
                box = (cx - cell / 2, cx + cell / 2, cy + cell / 2, cy - cell / 2)
                ax_grid.imshow(kern, cmap="jet", extent=box, interpolation="nearest")
        ax_grid.set_xlim(0, w)
        ax_grid.set_ylim(h, 0)
        ax_grid.set_title(f"group {g}: {k}x{k} kernels at {min(grid, ho)}x{min(grid, wo)} positions")
        for ax in (ax_sum, ax_grid):
            ax.set_xticks([])
            ax.set_yticks([])
    name = getattr(model, "arch_name", type(model).__name__)
    fig.suptitle(f"{name} {layer}: generated kernels ({groups} groups, output {ho}x{wo})")
    fig.tight_layout()
    out_png = os.fspath(out_png)
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png)
    return out_png
