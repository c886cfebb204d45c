"""`cvlab` / `python -m orchestrator`: the command line.

Each verb lives in its own module, which registers its sub-parser through `add_cli(subparsers)` and
sets `func` to a callable `(args) -> int`. Modules import heavy dependencies (torch, ray, mlflow) inside
functions, so `cvlab --help` stays fast. Every `CvlabError` ends as one message and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from orchestrator.errors import CvlabError

# Modules that contribute verbs, in the order `--help` lists them.
VERB_MODULES = (
    "orchestrator.train",  # run
    "orchestrator.spec_loader",  # validate
    "orchestrator.tune",  # tune
    "orchestrator.compare",  # compare
    "orchestrator.jobs",  # submit, jobs
    "orchestrator.data_cmd",  # data make-imagenet | make-coco
    "orchestrator.local_cluster",  # cluster local up|down
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cvlab",
        description="Run involution / C-volution experiments on Ray, tracked in MLflow.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name in VERB_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:  # a verb whose module is not written yet
            if err.name != name:
                raise
            continue
        module.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse already printed its message
        return 2 if exit_.code not in (0, None) else 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CvlabError as err:
        print(f"cvlab: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("cvlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
