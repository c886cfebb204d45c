"""Architecture table and hyperparameter validation for the bottleneck family (no torch needed).

Everything here works on plain numbers, so a Tune search can check every combination of a search space
(`validate_model_config`) before a single weight is allocated.
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import asdict, dataclass
from typing import Any

# Which spatial operator replaces the 3x3 conv of the bottleneck.
FAMILIES = {"rednet": "involution", "cednet": "cvolution", "resnet": "convolution"}
STAGE_BLOCKS = {
    26: (1, 2, 4, 1),
    38: (2, 3, 5, 2),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
WIDTHS = (64, 128, 256, 512)  # bottleneck (operator) width of each stage
EXPANSION = 4
STEM_CHANNELS = 64
STAGE_STRIDES = (1, 2, 2, 2)
FEATURE_STRIDES = (4, 8, 16, 32)  # input-to-output stride of each stage's features

_COMMON_DEFAULTS: dict[str, Any] = {
    "num_classes": 1000,
    "in_channels": 3,
    "zero_init_residual": True,
    "drop_path_rate": 0.0,
    "out_indices": None,
    "frozen_stages": -1,
    "norm_eval": False,
}
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    # RedNet: 7x7 involution in the blocks, 3x3 involution in the stem (published mmcls code).
    "rednet": {"kernel_size": 7, "stem_kernel_size": 3, "group_channels": 16, "reduction_ratio": 4,
               **_COMMON_DEFAULTS},
    "cednet": {"kernel_size": 7, "stem_kernel_size": 7, "group_channels": 16, "reduction_ratio": 4,
               "channel_groups": 16, **_COMMON_DEFAULTS},
    # ResNet baseline: kernel_size is the bottleneck conv, stem_kernel_size the usual 7x7 stem conv.
    "resnet": {"kernel_size": 3, "stem_kernel_size": 7, **_COMMON_DEFAULTS},
}

_NAME_RE = re.compile(r"^(rednet|cednet|resnet)(\d+)$")


@dataclass(frozen=True)
class ArchConfig:
    """A fully resolved, validated architecture: family defaults merged with the overrides."""

    name: str
    family: str
    depth: int
    kernel_size: int
    stem_kernel_size: int
    num_classes: int
    in_channels: int
    zero_init_residual: bool
    drop_path_rate: float
    out_indices: tuple[int, ...] | None
    frozen_stages: int
    norm_eval: bool
    group_channels: int | None = None
    reduction_ratio: int | None = None
    channel_groups: int | None = None

    def constructor_kwargs(self) -> dict[str, Any]:
        kw = asdict(self)
        del kw["name"]
        return kw


def list_models() -> list[str]:
    """All registry names, family by family, shallow to deep."""
    return [f"{fam}{d}" for fam in FAMILIES for d in STAGE_BLOCKS]


def parse_name(name: Any) -> tuple[str, int]:
    m = _NAME_RE.match(str(name).strip().lower()) if isinstance(name, str) else None
    if m is None or int(m.group(2)) not in STAGE_BLOCKS:
        near = difflib.get_close_matches(str(name).lower(), list_models(), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ValueError(f"unknown model {name!r}{hint}; valid names: {', '.join(list_models())}")
    return m.group(1), int(m.group(2))


def operator_layers(family: str, depth: int) -> list[tuple[str, int, str]]:
    """(module path, channels, role) of every spatial operator, in forward order."""
    layers: list[tuple[str, int, str]] = []
    if family != "resnet":
        layers.append(("stem.1", STEM_CHANNELS // 2, "stem"))
    for s, (n, width) in enumerate(zip(STAGE_BLOCKS[depth], WIDTHS)):
        layers += [(f"layer{s + 1}.{b}.conv2", width, "block") for b in range(n)]
    return layers


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _as_int(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
        isinstance(value, float) and not value.is_integer()
    ):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{key} must be >= {minimum}, got {value}")
    return value


def _as_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")  # noqa: TRY004
    return value


def _check_divides(key: str, value: int, layers: list[tuple[str, int, str]], what: str) -> None:
    """`value` must divide the channels of every operator layer; list the values that work for all."""
    for path, channels, _ in layers:
        if channels % value:
            ok = _divisors(math.gcd(*[c for _, c, _ in layers]))
            raise ValueError(
                f"{key}={value} does not fit layer {path!r} ({channels} channels; {what} must divide the "
                f"channel count); values valid for all layers: {', '.join(map(str, ok))}"
            )


def resolve_config(name: str, overrides: dict[str, Any] | None = None) -> ArchConfig:
    """Merge family defaults with `overrides` and check every value against every layer (ValueError)."""
    family, depth = parse_name(name)
    params = dict(FAMILY_DEFAULTS[family])
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(params))
    if unknown:
        valid = sorted(params)
        hints = []
        for key in unknown:
            near = difflib.get_close_matches(key, valid, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
        raise ValueError(
            f"unknown override(s) for {family}{depth}: {', '.join(hints)}; "
            f"valid overrides: {', '.join(valid)}"
        )
    params.update(overrides)
    layers = operator_layers(family, depth)

    for key in ("kernel_size", "stem_kernel_size"):
        k = _as_int(key, params[key], 1)
        if k % 2 == 0:
            raise ValueError(f"{key} must be odd (same-size padding), got {k}; e.g. 3, 5, 7, 9")
        params[key] = k
    params["num_classes"] = _as_int("num_classes", params["num_classes"], 0)
    params["in_channels"] = _as_int("in_channels", params["in_channels"], 1)
    params["frozen_stages"] = _as_int("frozen_stages", params["frozen_stages"], -1)
    if params["frozen_stages"] > 4:
        raise ValueError(f"frozen_stages must be in -1..4 (-1: none, 0: stem, i: stem + stages 1..i), "
                         f"got {params['frozen_stages']}")
    for key in ("zero_init_residual", "norm_eval"):
        params[key] = _as_bool(key, params[key])
    dpr = params["drop_path_rate"]
    if isinstance(dpr, bool) or not isinstance(dpr, (int, float)) or not 0.0 <= dpr < 1.0:
        raise ValueError(f"drop_path_rate must be a number in [0, 1), got {dpr!r}")
    params["drop_path_rate"] = float(dpr)

    oi = params["out_indices"]
    if oi is not None:
        if isinstance(oi, (int, str)) or not hasattr(oi, "__iter__"):
            raise ValueError(f"out_indices must be null or a list of stage indices in 0..3, got {oi!r}")
        oi = tuple(_as_int("out_indices", i, 0) for i in oi)
        if not oi or any(i > 3 for i in oi) or len(set(oi)) != len(oi) or list(oi) != sorted(oi):
            raise ValueError(f"out_indices must be a non-empty increasing list of distinct stage indices "
                             f"in 0..3, got {list(oi)}")
        params["out_indices"] = oi

    if family != "resnet":
        gc = params["group_channels"] = _as_int("group_channels", params["group_channels"], 1)
        _check_divides("group_channels", gc, layers, "group_channels")
        rr = params["reduction_ratio"] = _as_int("reduction_ratio", params["reduction_ratio"], 1)
        narrowest = min(layers, key=lambda t: t[1])
        if rr > narrowest[1]:  # the kernel generator's hidden width channels // reduction_ratio must be >= 1
            raise ValueError(
                f"reduction_ratio={rr} does not fit layer {narrowest[0]!r} ({narrowest[1]} channels; "
                f"channels // reduction_ratio must be >= 1); values valid for all layers: 1..{narrowest[1]}"
            )
    if family == "cednet":
        cg = params["channel_groups"] = _as_int("channel_groups", params["channel_groups"], 1)
        _check_divides("channel_groups", cg, layers, "channel_groups (groups of the 3x3 channel conv)")
    return ArchConfig(name=f"{family}{depth}", family=family, depth=depth, **params)
