"""Compare the metrics of two runs' ``results.json``: every model, split, tie policy and metric.

    python tools/compare_results.py RUN_A RUN_B

Prints how many values were compared and every difference; exits 1 when any differs (used for the architecture
issue's "behaviour unchanged" check: the same command and seed before and after a refactor).
"""

from __future__ import annotations

import sys
from pathlib import Path

from dsom.schema import read_results


def main() -> int:
    a, b = (read_results(Path(p) / "results.json") for p in sys.argv[1:3])
    if list(a["models"]) != list(b["models"]):
        print(f"different models: {list(a['models'])} vs {list(b['models'])}")
        return 1
    n, diffs = 0, []
    for model, block in a["models"].items():
        for split, by_policy in block.items():
            for policy, metrics in by_policy.items():
                for key, value in metrics.items():
                    n += 1
                    other = b["models"][model].get(split, {}).get(policy, {}).get(key)
                    if other != value:
                        diffs.append(f"{model} {split} {policy} {key}: {value} vs {other}")
    for key in ("policy",):
        if a.get(key) != b.get(key):
            diffs.append(f"'{key}' sections differ")
    print(f"{len(a['models'])} models, {n} metric values compared, {len(diffs)} different")
    for d in diffs:
        print("  " + d)
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
