"""The mutation score of each module after `mutmut run` (`make mutation`), as a Markdown table, then the
surviving mutants by name (`mutmut show NAME` prints one's diff).

Score = killed (a test failed, or the mutant hung until its timeout) / mutants that some test ran. Mutants no
selected test reaches are counted apart ("no test"): they point at a function the fast tests never call; "not run"
are those of a run that was stopped.
"""
from __future__ import annotations

import json
import sys
import tomllib
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code

KILLED = ("killed", "timeout", "segfault")


def module_counts(module: str) -> tuple[Counter, list[str]]:
    meta = Path("mutants") / f"{module}.meta"
    if not meta.exists():
        return Counter(), []
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    statuses = {name: status_by_exit_code[code] for name, code in codes.items()}
    return Counter(statuses.values()), sorted(n for n, s in statuses.items() if s == "survived")


def main() -> int:
    modules = tomllib.loads(Path("pyproject.toml").read_text())["tool"]["mutmut"]["only_mutate"]
    print("| module | mutants | killed | survived | no test | not run | score |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    survivors = []
    for module in modules:
        counts, survived = module_counts(module)
        if not counts:
            print(f"| `{module}` | not run | | | | | |")
            continue
        killed = sum(counts[s] for s in KILLED)
        ran = killed + counts["survived"]
        score = f"{100 * killed / ran:.0f}%" if ran else "-"
        print(f"| `{module}` | {sum(counts.values())} | {killed} | {counts['survived']} | {counts['no tests']} "
              f"| {counts['not checked']} | {score} |")
        survivors += survived
    if survivors:
        print("\nSurvivors:\n" + "\n".join(f"- {name}" for name in survivors))
    return 0


if __name__ == "__main__":
    sys.exit(main())
