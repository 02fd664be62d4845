"""The selection ablation (``dsom distill --ablation selection``) over several seeds: one row per student, mean ± std
over the runs given of valid MRR, test MRR and test Hits@10 (realistic, in %), the planted agreement (synthetic
graphs) and the arg-max actions above 5% averaged over the runs.

    python benchmarks/ablation_table.py runs/abl-syn/s2022 runs/abl-syn/s1 runs/abl-syn/s2

Reads each run's ``results.json`` only. Rows are sorted by mean valid MRR (the selection metric a user has).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

SHORT = {"structure": "S", "text": "T", "numeric": "N", "image": "I"}


def _fmt(xs: list[float], scale: float = 100.0, digits: int = 2) -> str:
    if not xs:
        return "—"
    m = statistics.mean(xs) * scale
    if len(xs) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.stdev(xs) * scale:.{digits}f}"


def _policy(results: dict[str, Any], name: str) -> dict[str, Any]:
    if name == "student":
        return results.get("policy", {})
    return results.get("distill", {}).get("students", {}).get(name, {}).get("policy", {})


def rows(runs: list[Path]) -> list[dict[str, Any]]:
    loaded = [json.loads((r / "results.json").read_text()) for r in runs]
    names = [k for k in loaded[0]["models"] if k == "student" or k.startswith("student/")]
    out = []
    for name in names:
        valid, test, h10, agree = [], [], [], []
        actions: dict[str, float] = {}
        for res in loaded:
            m = res["models"].get(name)
            if m is None:
                continue
            valid.append(m["valid"]["realistic"]["mrr"])
            test.append(m["test"]["realistic"]["mrr"])
            h10.append(m["test"]["realistic"]["hits@10"])
            pol = _policy(res, name)
            if "planted_agreement" in pol:
                agree.append(pol["planted_agreement"])
            for a, share in pol.get("actions", {}).items():
                actions[a] = actions.get(a, 0.0) + share / len(loaded)
        top = sorted(((s, a) for a, s in actions.items() if s > 0.05), reverse=True)
        out.append({"name": name, "valid": valid, "test": test, "h10": h10, "agreement": agree,
                    "actions": ", ".join(f"{'+'.join(SHORT.get(x, x) for x in a.split('+'))} {100 * s:.0f}%"
                                         for s, a in top) or "—"})
    return sorted(out, key=lambda r: -statistics.mean(r["valid"]))


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    args = p.parse_args(argv)
    table = rows(args.runs)
    print(f"{len(args.runs)} runs: {', '.join(str(r) for r in args.runs)}; realistic metrics in %, mean ± std")
    print("| student | valid MRR | test MRR | test H@10 | planted agreement | arg-max actions (> 5%, mean over runs) |")
    print("|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['name']} | {_fmt(r['valid'])} | {_fmt(r['test'])} | {_fmt(r['h10'])} | "
              f"{_fmt(r['agreement'], 1.0, 3)} | {r['actions']} |")
    return table


if __name__ == "__main__":
    main()
