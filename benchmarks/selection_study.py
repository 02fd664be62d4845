"""The teacher-selection study of issue 10: `--preset paper` against the dsom defaults, several seeds, one
dataset; prints mean ± std of test MRR (all three tie policies for the students) and the policy's behaviour.

    python benchmarks/selection_study.py synthetic --seeds 2022,1,2 --out runs/study-synthetic
    DSOM_DATA=../shared/data python benchmarks/selection_study.py MKG-Y --seeds 2022,1,2 \\
        --args "--modalities structure,text --rank 128 --epochs 30 --set distill.student_rank=64 ..."
    python benchmarks/selection_study.py synthetic --out runs/study-synthetic --summary   # aggregate only

Each (preset, seed) is one `dsom run` in OUT/<preset>-<seed>; finished runs (results.json present) are skipped
and unfinished ones resumed, so the study can be interrupted and restarted.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

MODELS = ("student", "student/ndkd_avg", "teacher_avg", "teacher_avg/calibrated", "mose_mi", "mose_bi")


def run_one(dataset: str, preset: str, seed: int, out: Path, extra: list[str]) -> None:
    if (out / "results.json").exists():
        return
    resume = ["--resume"] if (out / "config.yaml").exists() else []
    cmd = ["dsom", "run", dataset, "--preset", preset, "--seed", str(seed), "-o", str(out), "-q", *resume, *extra]
    if resume:  # a resumed run reads its own config.yaml
        cmd = ["dsom", "run", "-o", str(out), "-q", "--resume"]
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    subprocess.run([str(Path(sys.executable).parent / cmd[0]), *cmd[1:]], check=True)


def fmt(values: list[float]) -> str:
    if not values:
        return "—"
    mean = statistics.mean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.2f} ± {100 * sd:.2f}"


def summary(out: Path, presets: list[str]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for preset in presets:
        runs = sorted(out.glob(f"{preset}-*/results.json"))
        res = [json.loads(p.read_text()) for p in runs]
        if not res:
            continue
        block: dict[str, Any] = {"seeds": [p.parent.name.split("-", 1)[1] for p in runs]}
        for model in MODELS:
            for tie in ("realistic", "pessimistic", "optimistic"):
                vals = [r["models"][model]["test"][tie]["mrr"] for r in res if model in r["models"]]
                if vals:
                    block.setdefault(model, {})[tie] = fmt(vals)
            vals = [r["models"][model]["test"]["realistic"]["hits@10"] for r in res if model in r["models"]]
            if vals:
                block[model]["hits@10"] = fmt(vals)
        pol = [r.get("policy", {}) for r in res]
        for key in ("planted_agreement", "planted_agreement_all_teachers"):
            vals = [p[key] for p in pol if key in p]
            if vals:
                block[key] = f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals) if len(vals) > 1 else 0.0:.3f}"
        block["top_action_share"] = [round(max(p["actions"].values()), 3) for p in pol if "actions" in p]
        block["actions_mean"] = {}
        for p in pol:
            for k, v in p.get("actions", {}).items():
                block["actions_mean"][k] = block["actions_mean"].get(k, 0.0) + v / len(pol)
        block["actions_mean"] = {k: round(v, 3) for k, v in sorted(block["actions_mean"].items(),
                                                                    key=lambda kv: -kv[1]) if v >= 0.005}
        table[preset] = block
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset")
    p.add_argument("--seeds", default="2022,1,2")
    p.add_argument("--presets", default="dsom,paper")
    p.add_argument("--out", default=None)
    p.add_argument("--args", default="", help="extra arguments for every `dsom run` (one string)")
    p.add_argument("--summary", action="store_true", help="only aggregate finished runs")
    a = p.parse_args()
    out = Path(a.out or f"runs/study-{Path(a.dataset).name}")
    presets = a.presets.split(",")
    if not a.summary:
        for preset in presets:
            for seed in [int(s) for s in a.seeds.split(",")]:
                run_one(a.dataset, preset, seed, out / f"{preset}-{seed}", shlex.split(a.args))
    table = summary(out, presets)
    print(json.dumps(table, indent=1, ensure_ascii=False))
    (out / "summary.json").write_text(json.dumps(table, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
