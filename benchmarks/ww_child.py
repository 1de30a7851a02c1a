"""weightwatcher 0.7.7 as a user runs it on a model folder, for bench_e2e.py (one fresh process).

    .venv/bin/python benchmarks/ww_child.py FOLDER RESULT.json

Runs ``weightwatcher.WeightWatcher(model=FOLDER).analyze()`` with its defaults (CPU) and writes
the per-layer numbers bench_e2e.py compares (name, alpha, xmin, D, num_pl_spikes, lambda_max) to
RESULT.json, with the seconds spent importing and analyzing.
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any


def _number(value: Any) -> float | None:
    number = float(value)
    return number if math.isfinite(number) else None


def main(argv: list[str]) -> int:
    folder, result_path = argv
    started = time.perf_counter()
    import weightwatcher  # type: ignore[import-untyped]

    imported = time.perf_counter()
    details = weightwatcher.WeightWatcher(model=folder).analyze()
    analyzed = time.perf_counter()
    layers = [
        {
            "layer_id": int(row["layer_id"]),
            "name": str(row["name"]),
            "alpha": _number(row["alpha"]),
            "xmin": _number(row["xmin"]),
            "D": _number(row["D"]),
            "num_pl_spikes": int(row["num_pl_spikes"]),
            "lambda_max": _number(row["lambda_max"]),
        }
        for _, row in details.iterrows()
    ]
    document = {
        "import_s": imported - started,
        "analyze_s": analyzed - imported,
        "layers": layers,
    }
    with open(result_path, "w", encoding="utf-8") as stream:
        json.dump(document, stream)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
