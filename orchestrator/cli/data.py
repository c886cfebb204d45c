"""`cvlab data make-imagenet | make-coco | make-cityscapes DIR`: generate small synthetic data sets;
`cvlab data shard SRC DEST`: write an ImageNet-layout folder as WebDataset shards (local or s3://).

The work lives in the workloads (`workloads.classification.synthetic.make_imagenet`,
`workloads.detection.synthetic_coco.make_coco`, `workloads.segmentation.synthetic.make_cityscapes`,
`workloads.classification.shard_writer.write_shards`) and is imported only when a verb runs.
"""
from __future__ import annotations

import argparse
from typing import Any

from orchestrator.errors import CvlabError


def add_cli(subparsers: Any) -> None:
    data = subparsers.add_parser("data", help="generate small synthetic data sets (ImageNet / COCO / Cityscapes layout)")
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
        description="Write DIR/annotations/instances_{train,val}2017.json and DIR/{train,val}2017/*.jpg: shapes "
                    "of a few classes, with boxes and polygon masks (deterministic for --seed).",
    )
    coco.add_argument("dir", metavar="DIR")
    coco.add_argument("--images", type=_positive, default=32, help="training images (default 32)")
    coco.add_argument("--val-images", type=_positive, default=8, help="validation images (default 8)")
    coco.add_argument("--size", type=_positive, default=128, help="image side in pixels (default 128)")
    coco.add_argument("--seed", type=int, default=0)
    coco.set_defaults(func=_make_coco)

    cs = verbs.add_parser(
        "make-cityscapes",
        help="write a small learnable synthetic data set in the Cityscapes layout (segmentation)",
        description="Write DIR/leftImg8bit/{train,val}/<city>/*_leftImg8bit.png and DIR/gtFine/{train,val}/<city>/"
                    "*_gtFine_labelTrainIds.png: street-like scenes of a few classes, trainIds 0..18 and 255 for "
                    "ignore (deterministic for --seed).",
    )
    cs.add_argument("dir", metavar="DIR")
    cs.add_argument("--images", type=_positive, default=40, help="training images (default 40)")
    cs.add_argument("--val-images", type=_positive, default=10, help="validation images (default 10)")
    cs.add_argument("--height", type=_positive, default=128, help="image height in pixels (default 128)")
    cs.add_argument("--width", type=_positive, default=256, help="image width in pixels (default 256)")
    cs.add_argument("--seed", type=int, default=0)
    cs.set_defaults(func=_make_cityscapes)
    _add_shard(verbs)


SHARD_DESCRIPTION = (
    "Write DEST/{train,val}/shard-NNNNNN.tar (samples KEY.jpg + KEY.cls) and DEST/manifest.json from "
    "SRC/{train,val}/<class>/*. Unreadable images are left out and listed in the manifest. Run it again after an "
    "interruption to write the missing shards. S3 endpoint and credentials come from AWS_ENDPOINT_URL, "
    "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_REGION."
)


def _add_shard(verbs: Any) -> None:
    shard = verbs.add_parser(
        "shard",
        help="write an ImageNet-layout folder as WebDataset shards with a manifest (local folder or s3://)",
        description=SHARD_DESCRIPTION)
    shard.add_argument("src", metavar="SRC", help="an ImageNet-layout folder (train/<class>/*, val/<class>/*)")
    shard.add_argument("dest", metavar="DEST", help="a local folder or s3://bucket/prefix")
    shard.add_argument("--shard-size-mb", type=float, default=64.0, help="about this many MB per shard (default 64)")
    shard.add_argument("--workers", type=_positive, default=4, help="shards written at once (default 4)")
    shard.set_defaults(func=_shard)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


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
    from workloads.detection.synthetic_coco import make_coco

    print(f"writing a synthetic COCO-layout data set to {args.dir} ...", flush=True)
    try:
        summary = make_coco(args.dir, num_train=args.images, num_val=args.val_images, size=args.size, seed=args.seed)
    except (ValueError, FileExistsError) as err:
        raise CvlabError(f"data make-coco: {err}") from None
    _print_summary(summary)
    return 0


def _make_cityscapes(args: argparse.Namespace) -> int:
    from workloads.segmentation.synthetic import make_cityscapes

    print(f"writing a synthetic Cityscapes-layout data set to {args.dir} ...", flush=True)
    try:
        summary = make_cityscapes(args.dir, num_train=args.images, num_val=args.val_images,
                                  size=(args.height, args.width), seed=args.seed)
    except (ValueError, FileExistsError) as err:
        raise CvlabError(f"data make-cityscapes: {err}") from None
    _print_summary(summary, skip=("classes",))
    return 0


def _shard(args: argparse.Namespace) -> int:
    from workloads.classification.shard_writer import write_shards
    from workloads.object_storage import S3_SETTINGS, is_bucket_uri

    print(f"writing the shards of {args.src} to {args.dest} ...", flush=True)
    try:
        manifest = write_shards(args.src, args.dest, shard_size_mb=args.shard_size_mb, workers=args.workers,
                                progress=lambda msg: print(msg, flush=True))
    except ValueError as err:
        raise CvlabError(f"data shard: {err}") from None
    except OSError as err:  # pyarrow's words for a missing bucket, refused credentials, an unreachable server
        hint = f" ({S3_SETTINGS})" if is_bucket_uri(args.dest) else ""
        raise CvlabError(f"data shard: cannot write {args.dest}: {err}{hint}") from None
    for split, info in manifest["splits"].items():
        skipped = f", {len(info['skipped'])} unreadable image(s) left out" if info["skipped"] else ""
        print(f"  {split}: {info['samples']} images in {len(info['shards'])} shard(s){skipped}")
    print(f"  classes: {len(manifest['classes'])}; manifest: {args.dest.rstrip('/')}/manifest.json")
    return 0


def _print_summary(summary: dict[str, Any], skip: tuple[str, ...] = ()) -> None:
    for key, value in summary.items():
        if key in skip:
            continue
        text = str(value)
        print(f"  {key}: {text if len(text) <= 200 else text[:197] + '...'}")
