"""Model size: parameter counts and multiply-accumulates (MACs) per forward pass.

`count_flops` runs the model once on meta tensors (no memory, no arithmetic) with forward hooks, so the
counts follow the real output shapes at any input size. Convention (torchvision / fvcore style): convs and
linear layers count Cout*(Cin/groups)*Kh*Kw per output element (biases, BN, activations and pooling are not
counted); an involution counts K*K MACs per output element (its kernel-generating convs are counted as the
convs they are); a C-volution adds its 3x3 channel conv (a conv) and one multiply per input element for the
gate.
"""
from __future__ import annotations

import torch
from torch import nn

from workloads.ops import Cvolution2d, Involution2d


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all of them, or only those with requires_grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _conv_macs(m: nn.Conv2d, out: torch.Tensor) -> int:
    kh, kw = m.kernel_size
    return out.numel() * (m.in_channels // m.groups) * kh * kw


def count_flops(model: nn.Module, input_size=(1, 3, 224, 224)) -> int:
    """Multiply-accumulates of one forward pass at `input_size` (batch included). 4.1e9 for ResNet-50."""
    if len(input_size) != 4 or any(int(s) < 1 for s in input_size):
        raise ValueError(f"input_size must be (batch, channels, height, width), got {tuple(input_size)}")
    total = 0
    fired: set[int] = set()

    def conv_hook(m, inp, out):
        nonlocal total
        total += _conv_macs(m, out)
        fired.add(id(m))

    def linear_hook(m, inp, out):
        nonlocal total
        total += out.numel() * m.in_features
        fired.add(id(m))

    def op_hook(m, inp, out):
        nonlocal total
        k = m.kernel_size if isinstance(m.kernel_size, int) else m.kernel_size[0]
        total += out.numel() * k * k  # each output element: K*K taps of its own generated kernel
        if isinstance(m, Cvolution2d):
            total += inp[0].numel()  # gate multiply on the input

    handles = []
    countable: set[int] = set()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
            countable.add(id(m))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
            countable.add(id(m))
        elif isinstance(m, (Involution2d, Cvolution2d)):
            handles.append(m.register_forward_hook(op_hook))

    # Run on meta tensors standing in for the weights: nothing is allocated or computed, shapes are real.
    meta = {n: torch.empty_like(t, device="meta") for n, t in model.state_dict(keep_vars=True).items()}
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        x = torch.empty(tuple(int(s) for s in input_size), device="meta")
        with torch.no_grad():
            torch.func.functional_call(model, meta, (x,), strict=False)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    missed = [n for n, m in model.named_modules() if id(m) in countable and id(m) not in fired]
    if missed:
        # A layer that did not go through its module's forward would be silently left out of the count.
        raise RuntimeError(f"count_flops: these layers did not run through their forward hooks: {missed[:5]}")
    return total
