"""`cvlab` / `python -m orchestrator`: the command line.

Each verb lives in its own module of this package, named like the verb; it registers its sub-parser through
`add_cli(subparsers)` and sets `func` to a callable `(args) -> int`. Verb modules import heavy dependencies
(torch, ray, mlflow) inside functions, so `cvlab --help` stays fast. `-v` / `-q` set how much is said
(`workloads.logs`); every `CvlabError` ends as one message and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import logging

from orchestrator.errors import CvlabError

# Verb modules, in the order `--help` lists them.
VERB_MODULES = (
    "orchestrator.cli.run",  # run
    "orchestrator.cli.validate",  # validate
    "orchestrator.cli.tune",  # tune
    "orchestrator.cli.eval",  # eval
    "orchestrator.cli.predict",  # predict
    "orchestrator.cli.export",  # export
    "orchestrator.cli.compare",  # compare
    "orchestrator.cli.submit",  # submit, jobs
    "orchestrator.cli.data",  # data make-imagenet | make-coco
    "orchestrator.cli.cluster",  # cluster local up|down|status
)

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cvlab",
        description="Run involution / C-volution experiments on Ray, tracked in MLflow.",
    )
    loud = parser.add_mutually_exclusive_group()
    loud.add_argument("-v", "--verbose", action="store_true",
                      help="say more: debug messages and Ray's own progress output")
    loud.add_argument("-q", "--quiet", action="store_true", help="say less: warnings and errors only")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name in VERB_MODULES:
        importlib.import_module(name).add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from workloads.logs import configure

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse already printed its message
        return 2 if exit_.code not in (0, None) else 0
    configure(1 if args.verbose else -1 if args.quiet else 0)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CvlabError as err:
        log.error("%s", err)
        return err.exit_code
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
