"""`cvlab predict --model SRC IMAGE... [--topk 5] [--kernels DIR]`: top classes of images under a classifier."""
from __future__ import annotations

from typing import Any


def add_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "predict", help="classify images with a trained model (top classes and probabilities)",
        description="Print the top classes of each image with their probabilities, under a cvlab classifier "
                    "(a checkpoint file or folder, runs:/<run_id>/<path> or models:/<name>/<version>).")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--model", required=True, metavar="SRC", help="the classifier")
    p.add_argument("--topk", type=int, default=5, help="classes shown per image (default 5)")
    p.add_argument("--kernels", metavar="DIR", default=None,
                   help="also write each image's involution kernel maps to DIR")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for runs:/ and models:/ sources")
    p.set_defaults(func=_predict)


def _predict(args) -> int:
    from orchestrator.inference.classifier import load_classifier
    from orchestrator.inference.predict import predict_images, write_kernel_maps
    from orchestrator.inference.sources import resolve_source

    classifier = load_classifier(resolve_source(args.model, tracking_uri=args.tracking_uri))
    for row in predict_images(classifier, args.images, args.topk):
        print(row["image"])
        for name, prob in row["top"]:
            print(f"  {prob:7.4f}  {name}")
    if args.kernels:
        for path in write_kernel_maps(classifier, args.images, args.kernels):
            print(f"kernel maps: {path}")
    return 0
