"""``dsom report RUN_DIR``: a markdown summary of a run and its plots (DESIGN §5, ``report/``).

``report/summary.md`` holds the models table (test, every tie policy), the policy's action shares and the
planted-truth agreement. PNG plots (with the optional ``[report]`` extra, matplotlib): per-epoch losses,
the per-step delta / R / R_hat curve (Fig. 5 left), the action histogram per epoch, and the arg-max
action shares overall and per relation (Fig. 3).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dsom.errors import DsomError
from dsom.schema import Results, metric_rows, read_results


def models_table(results: Results, split: str = "test") -> str:
    rows = ["| model | policy | MRR | MR | H@1 | H@3 | H@10 |", "|---|---|---:|---:|---:|---:|---:|"]
    for name, _, policy, m in metric_rows(results, (split,)):
        rows.append(f"| {name} | {policy} | {m['mrr']:.4f} | {m['mr']:.1f} | {m['hits@1']:.4f} | "
                    f"{m['hits@3']:.4f} | {m['hits@10']:.4f} |")
    return "\n".join(rows)


def summary_markdown(results: Results) -> str:
    d = results["dataset"]
    lines = [f"# Run report: {d['name']}", "",
             f"{d['entities']:,} entities, {d['relations']:,} relations; train/valid/test "
             f"{d['train']:,}/{d['valid']:,}/{d['test']:,}. Teachers: {', '.join(results.get('modalities', []))}.", ""]
    for w in results.get("dataset_warnings", []):
        lines.append(f"- warning: {w}")
    lines += ["", "## Test metrics (filtered; realistic ties are the headline)", "", models_table(results), ""]
    t = results.get("timing", {})
    lines.append(f"Timing: pretrain {t.get('pretrain_s')} s ({t.get('pretrain_epoch_s')} s/epoch), "
                 f"distill {t.get('distill_s')} s ({t.get('distill_epoch_s')} s/epoch).")
    policy = results.get("policy")
    if policy:
        lines += ["", "## Policy: arg-max action over all training queries", "", "| subset | share |", "|---|---:|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in sorted(policy["actions"].items(), key=lambda kv: -kv[1])]
        if "planted_agreement" in policy:
            lines += ["", f"Planted-truth agreement: {policy['planted_agreement']:.4f} (always all teachers: "
                          f"{policy['planted_agreement_all_teachers']:.4f}; uniform random action: "
                          f"{policy['planted_agreement_random']:.4f}; best possible: "
                          f"{policy['planted_agreement_best_possible']:.4f})."]
    study = results.get("missing_study")
    if study:
        lines += ["", "## Missing-modality study (test MRR, realistic)", ""]
        names = list(next(iter(study.values())))
        lines += ["| missing rate | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for rate, row in study.items():
            lines.append(f"| {rate} | " + " | ".join(f"{row[n]['realistic']['mrr']:.4f}" if n in row else "-"
                                                      for n in names) + " |")
    return "\n".join(lines) + "\n"


def _records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def write_plots(run_dir: Path, results: dict[str, Any]) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    report = run_dir / "report"
    written: list[Path] = []
    recs = _records(run_dir)
    epochs = [r for r in recs if "epoch" in r and "step" not in r and "seconds" in r]
    if epochs:
        fig, ax = plt.subplots(figsize=(7, 4))
        for stage in dict.fromkeys(r["stage"] for r in epochs):
            rs = [r for r in epochs if r["stage"] == stage]
            for key in sorted({k for r in rs for k in r if k.startswith("loss/")}):
                ax.plot([r["epoch"] for r in rs], [r.get(key) for r in rs], label=f"{stage} {key[5:]}")
        ax.set_xlabel("epoch"), ax.set_ylabel("loss"), ax.legend(fontsize=6)
        written.append(_save(fig, report / "losses.png", plt))
    steps = [r for r in recs if "step" in r and r.get("stage") == "distill"]
    if steps:
        fig, ax = plt.subplots(figsize=(7, 4))
        x = range(len(steps))
        for key, label in (("delta", "delta"), ("reward", "R"), ("reward_baseline", "R_hat")):
            ax.plot(x, [r[key] for r in steps], label=label, linewidth=0.8)
        ax.set_xlabel("step"), ax.set_ylabel("batch mean"), ax.legend()
        written.append(_save(fig, report / "reward.png", plt))
    hist = [r for r in epochs if r.get("stage") == "distill" and "actions" in r]
    if hist:
        fig, ax = plt.subplots(figsize=(7, 4))
        names = list(hist[0]["actions"])
        bottom = [0.0] * len(hist)
        for n in names:
            vals = [r["actions"][n] / max(sum(r["actions"].values()), 1) for r in hist]
            ax.bar([r["epoch"] for r in hist], vals, bottom=bottom, label=n)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_xlabel("epoch"), ax.set_ylabel("share of sampled actions"), ax.legend(fontsize=6)
        written.append(_save(fig, report / "actions_per_epoch.png", plt))
    policy = results.get("policy")
    if policy:
        per = policy.get("per_relation", {})
        top = sorted(per.items(), key=lambda kv: -kv[1]["queries"])[:20]
        names = list(policy["actions"])
        fig, ax = plt.subplots(figsize=(8, 5))
        labels = ["all", *[k[:30] for k, _ in top]]
        rows = [policy["actions"], *[v for _, v in top]]
        left = [0.0] * len(rows)
        for n in names:
            vals = [row.get(n, 0.0) for row in rows]
            ax.barh(labels, vals, left=left, label=n)
            left = [a + b for a, b in zip(left, vals)]
        ax.invert_yaxis(), ax.set_xlabel("share of arg-max actions"), ax.legend(fontsize=6)
        written.append(_save(fig, report / "actions_per_relation.png", plt))
    return written


def _save(fig: Any, path: Path, plt: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(run_dir: str | Path, results: Results | None = None) -> Path:
    run_dir = Path(run_dir)
    if results is None:
        path = run_dir / "results.json"
        if not path.exists():
            raise DsomError(f"{run_dir}: no results.json; is this a finished run directory?")
        results = read_results(path)
    (run_dir / "report").mkdir(parents=True, exist_ok=True)
    md = run_dir / "report" / "summary.md"
    md.write_text(summary_markdown(results), encoding="utf-8")
    write_plots(run_dir, results)
    return md
