"""`cvlab data make-imagenet DIR` / `cvlab data make-coco DIR`: generate small synthetic data sets.

The generators live in the workloads (`workloads.classification.synthetic.make_imagenet`,
`workloads.detection.synthetic_coco.make_coco`) and are imported only when a verb runs.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
from typing import Any

from orchestrator.errors import CvlabError


def add_cli(subparsers: Any) -> None:
    data = subparsers.add_parser("data", help="generate small synthetic data sets (ImageNet / COCO layout)")
    verbs = data.add_subparsers(dest="data_verb", metavar="DATA_VERB")
    data.set_defaults(func=lambda _args: _usage(data))

    img = verbs.add_parser(
        "make-imagenet",
        help="write a learnable synthetic data set in the ImageNet folder layout",
        description="Write DIR/train/<class>/*.JPEG and DIR/val/<class>/*.JPEG (deterministic for --seed).",
    )
    img.add_argument("dir", metavar="DIR")
    img.add_argument("--classes", type=int, default=10, help="number of classes (default 10)")
    img.add_argument("--per-class", type=int, default=60, help="training images per class (default 60)")
    img.add_argument("--val-per-class", type=int, default=None,
                     help="validation images per class (default max(2, per-class / 5))")
    img.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    img.add_argument("--seed", type=int, default=0)
    img.add_argument("--overwrite", action="store_true",
                     help="replace a synthetic data set made with other parameters")
    img.set_defaults(func=_make_imagenet)

    coco = verbs.add_parser(
        "make-coco",
        help="write a small synthetic data set in the COCO layout (detection)",
        description="Calls workloads.detection.synthetic_coco.make_coco(DIR, ...).",
    )
    coco.add_argument("dir", metavar="DIR")
    coco.add_argument("--images", type=int, default=None, help="training images (generator default if unset)")
    coco.add_argument("--val-images", type=int, default=None, help="validation images")
    coco.add_argument("--size", type=int, default=None, help="image side in pixels")
    coco.add_argument("--seed", type=int, default=None)
    coco.set_defaults(func=_make_coco)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _make_imagenet(args: argparse.Namespace) -> int:
    from workloads.classification.synthetic import make_imagenet

    print(f"writing a synthetic ImageNet-layout data set to {args.dir} ...", flush=True)
    try:
        summary = make_imagenet(
            args.dir,
            classes=args.classes,
            per_class=args.per_class,
            size=args.size,
            seed=args.seed,
            val_per_class=args.val_per_class,
            overwrite=args.overwrite,
            progress=lambda msg: print(msg, flush=True),
        )
    except ValueError as err:
        raise CvlabError(f"data make-imagenet: {err}") from None
    _print_summary(summary, skip=("class_names", "class_table", "format"))
    for row in summary.get("class_table", []):
        print(f"  {row['wnid']}: {row['pattern']} pattern, hue {row['hue']:.3f}")
    return 0


def _make_coco(args: argparse.Namespace) -> int:
    try:
        module = importlib.import_module("workloads.detection.synthetic_coco")
    except ModuleNotFoundError as err:
        raise CvlabError(
            f"data make-coco: the COCO generator is not available ({err}); it lives in "
            "workloads/detection/synthetic_coco.py"
        ) from None
    make_coco = getattr(module, "make_coco", None)
    if make_coco is None:
        raise CvlabError("data make-coco: workloads.detection.synthetic_coco has no make_coco() function")
    kwargs = {
        key: value
        for key, value in (("images", args.images), ("val_images", args.val_images),
                           ("size", args.size), ("seed", args.seed))
        if value is not None
    }
    params = inspect.signature(make_coco).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = [key for key in kwargs if key not in params and not takes_any]
    if unknown:
        opts = ", ".join("--" + key.replace("_", "-") for key in unknown)
        raise CvlabError(f"data make-coco: this COCO generator does not take {opts}")
    print(f"writing a synthetic COCO-layout data set to {args.dir} ...", flush=True)
    try:
        summary = make_coco(args.dir, **kwargs)
    except (ValueError, FileExistsError) as err:
        raise CvlabError(f"data make-coco: {err}") from None
    if isinstance(summary, dict):
        _print_summary(summary)
    return 0


def _print_summary(summary: dict[str, Any], skip: tuple[str, ...] = ()) -> None:
    for key, value in summary.items():
        if key in skip:
            continue
        text = str(value)
        print(f"  {key}: {text if len(text) <= 200 else text[:197] + '...'}")
