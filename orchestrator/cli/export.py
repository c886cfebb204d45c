"""`cvlab export --model SRC --format onnx|torchscript|pt2 OUT`: a classifier for use outside cvlab."""
from __future__ import annotations

from typing import Any


def add_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "export", help="export a trained classifier as ONNX, TorchScript or a torch.export program",
        description="Export a cvlab classifier (a checkpoint file or folder, runs:/<run_id>/<path> or "
                    "models:/<name>/<version>) and check the export against PyTorch on a random batch. ONNX and "
                    "TorchScript use standard ops only (no cvlab needed to run them); pt2 keeps the custom op.")
    p.add_argument("out", metavar="OUT", help="the file to write")
    p.add_argument("--model", required=True, metavar="SRC", help="the classifier")
    p.add_argument("--format", required=True, choices=("onnx", "torchscript", "pt2"))
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for runs:/ and models:/ sources")
    p.set_defaults(func=_export)


def _export(args) -> int:
    from orchestrator.inference.classifier import load_classifier
    from orchestrator.inference.export import export_classifier
    from orchestrator.inference.sources import resolve_source

    classifier = load_classifier(resolve_source(args.model, tracking_uri=args.tracking_uri))
    result = export_classifier(classifier, args.format, args.out)
    print(f"wrote {result['path']} ({result['format']}, input {result['input_shape']}, "
          f"{len(classifier.classes)} classes)")
    print(f"largest absolute difference from PyTorch on a random batch: {result['max_abs_diff']:.3g}")
    return 0
