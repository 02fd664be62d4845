"""Mean ± std over seeds of one metric, per model, for groups of runs (a comparison of two code versions or two
settings on held-out triples).

    python tools/seed_table.py --split valid --metric mrr \\
        "old=runs/s16-proj/old/MKG-Y-s*" "new=runs/s16-proj/new/MKG-Y-s*"

Each group is ``NAME=GLOB`` over run folders holding a ``results.json``; the models are those of the first group's
first run. Prints, per model, every group's mean ± sample std (and the per-seed values in brackets, in folder order)
and, with two groups, the difference of the means. Tie policy: ``realistic`` (``--policy``).
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import sys
from pathlib import Path


def load(pattern: str) -> list[dict]:
    runs = sorted(p for p in glob.glob(pattern) if (Path(p) / "results.json").is_file())
    if not runs:
        raise SystemExit(f"seed_table: no run with a results.json matches {pattern!r}")
    return [json.loads((Path(p) / "results.json").read_text()) for p in runs]


def values(results: list[dict], model: str, split: str, policy: str, metric: str) -> list[float]:
    out = []
    for r in results:
        block = r.get("models", {}).get(model, {}).get(split, {}).get(policy, {})
        if metric in block:
            out.append(float(block[metric]))
    return out


def summary(xs: list[float]) -> str:
    if not xs:
        return "-"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.4f} ± {sd:.4f} ({', '.join(f'{x:.4f}' for x in xs)})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("groups", nargs="+", help="NAME=GLOB of run folders")
    p.add_argument("--split", default="valid")
    p.add_argument("--metric", default="mrr")
    p.add_argument("--policy", default="realistic")
    args = p.parse_args(argv)
    groups = []
    for g in args.groups:
        if "=" not in g:
            raise SystemExit(f"seed_table: {g!r} is not NAME=GLOB")
        name, pattern = g.split("=", 1)
        groups.append((name, load(pattern)))
    models = list(groups[0][1][0].get("models", {}))
    print(f"{args.split} {args.metric} ({args.policy}), mean ± std over runs: "
          + ", ".join(f"{n} {len(rs)} runs" for n, rs in groups))
    for model in models:
        vals = [values(rs, model, args.split, args.policy, args.metric) for _, rs in groups]
        cells = " | ".join(f"{n}: {summary(v)}" for (n, _), v in zip(groups, vals))
        diff = ""
        if len(vals) == 2 and vals[0] and vals[1]:
            diff = f" | {groups[1][0]} - {groups[0][0]}: {statistics.mean(vals[1]) - statistics.mean(vals[0]):+.4f}"
        print(f"{model:<28} {cells}{diff}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
