"""`cvlab validate SPEC [--set KEY=VALUE ...] [--flat]`: check an experiment file and print it resolved."""
from __future__ import annotations

from typing import Any


def add_spec_arguments(parser: Any) -> None:
    """The `--set KEY=VALUE` option (repeatable) of every verb that reads an experiment file."""
    parser.add_argument("--set", dest="set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec value, e.g. --set optim.lr=0.1 (repeatable; YAML values)")


def add_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "validate",
        help="load and check an experiment file, print the resolved spec",
        description="Resolve _base_ files and --set overrides, validate everything (model included) "
                    "and print the resulting spec as YAML. Exit code 2 on any problem.",
    )
    p.add_argument("spec", metavar="SPEC.yaml")
    add_spec_arguments(p)
    p.add_argument("--flat", action="store_true", help="print dotted key = value lines (the MLflow params)")
    p.set_defaults(func=_validate)


def _validate(args: Any) -> int:
    from orchestrator.config.loader import flatten_spec, load_spec, spec_yaml

    spec = load_spec(args.spec, args.set)
    if args.flat:
        for key, value in flatten_spec(spec).items():
            print(f"{key} = {value}")
    else:
        print("# sources: " + ", ".join(spec.sources))
        print(spec_yaml(spec), end="")
    return 0
