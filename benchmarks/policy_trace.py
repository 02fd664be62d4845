"""Per-epoch behaviour of a run's policy from its metrics.jsonl: sampled-action shares, mean policy entropy,
mean advantage per action, and the batch-mean delta.

    python benchmarks/policy_trace.py RUN_DIR [--stage distill] [--top 4]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--stage", default="distill")
    p.add_argument("--top", type=int, default=4, help="actions to show per epoch")
    a = p.parse_args()
    rows = [json.loads(x) for x in (Path(a.run_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    deltas: dict[int, list[float]] = {}
    for r in rows:
        if r.get("stage") == a.stage and "step" in r and "delta" in r:
            deltas.setdefault(r["epoch"], []).append(r["delta"])
    print(f"{'epoch':>5} {'entropy':>8} {'delta':>8}  sampled actions (share) | mean advantage of the top actions")
    for r in rows:
        if r.get("stage") != a.stage or "actions" not in r or "step" in r:
            continue
        acts = r["actions"]
        total = max(sum(acts.values()), 1)
        top = sorted(acts.items(), key=lambda kv: -kv[1])[:a.top]
        shares = ", ".join(f"{k} {v / total:.2f}" for k, v in top)
        adv = r.get("mean_advantage", {})
        advs = ", ".join(f"{k} {adv[k]:+.2f}" for k, _ in top if k in adv)
        d = deltas.get(r["epoch"], [])
        delta = f"{sum(d) / len(d):8.3f}" if d else f"{'—':>8}"
        print(f"{r['epoch']:>5} {r.get('policy_entropy', float('nan')):8.3f} {delta}  {shares} | {advs}")


if __name__ == "__main__":
    main()
