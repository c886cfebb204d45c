"""How an evaluation's workers hand their result to the driver (`cvlab eval`, every workload).

Ray Train gives the driver the metrics of the latest *checkpoint* report, so rank 0 reports the result with a
small checkpoint folder holding it as `eval.json` (which also keeps it in the run's storage); the other ranks
report without one, leaving out the bulky parts.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Collection
from typing import Any

import ray.train

RESULT_FILE = "eval.json"


def report_evaluation(result: dict[str, Any], rank: int, bulky: Collection[str] = ()) -> None:
    """Report `result` (JSON-serialisable) from this worker; ranks other than 0 leave out the `bulky` keys."""
    if rank != 0:
        ray.train.report({k: v for k, v in result.items() if k not in bulky})
        return
    with tempfile.TemporaryDirectory(prefix="cvlab-eval-") as tmp:
        with open(os.path.join(tmp, RESULT_FILE), "w") as fh:
            json.dump(result, fh)
        ray.train.report(result, checkpoint=ray.train.Checkpoint.from_directory(tmp))
