"""What the held-out triples say about teacher subsets: mean cross-entropy of every subset's combined
(calibrated) teacher on the triples the teachers never trained on, overall and per relation, and on the
synthetic dataset per planted relation pattern. This is the signal the policy's margin reward averages.

    python benchmarks/selection_probe.py RUN_DIR [--dataset NAME] [--no-calibrate] [--relations 12]

RUN_DIR holds teachers trained with ``distill.holdout > 0`` (``dsom pretrain``/``dsom run``).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from dsom.distill.actions import action_names, subset_matrix
from dsom.distill.holdout import fit_temperatures, reward_rows
from dsom.distill.policy import action_ces
from dsom.runs.setup import build_config, load_dataset
from dsom.train.teachers import load_frozen_teachers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--dataset", default=None, help="dataset of the run (default: from its config)")
    p.add_argument("--no-calibrate", action="store_true")
    p.add_argument("--relations", type=int, default=12, help="relations to list (most held-out queries first)")
    args = p.parse_args()
    frozen, meta = load_frozen_teachers(args.run_dir)
    conf = meta.get("config", {})
    cfg = build_config(args.dataset or conf.get("data", {}).get("dataset"),
                       overrides=[("data.synthetic", conf.get("data", {}).get("synthetic", {}))])
    ds = load_dataset(cfg)
    held, seed = conf.get("distill", {}).get("holdout", 0.0), conf.get("distill", {}).get("holdout_seed", 0)
    if held <= 0:
        raise SystemExit(f"{args.run_dir}: its teachers held nothing out (distill.holdout = 0)")
    rows = reward_rows(ds, held, seed)
    q = torch.from_numpy(ds.queries("train"))[rows]
    T = None if args.no_calibrate else fit_temperatures(frozen, q[:4096])
    C = subset_matrix(frozen.num_teachers)
    names = action_names(frozen.modalities)
    ces = torch.empty(len(C), len(q))
    for s in range(0, len(q), 1000):
        b = q[s:s + 1000]
        z = frozen.score_all(b[:, 0], b[:, 1])
        if T is not None:
            z = z / T.view(-1, 1, 1)
        ces[:, s:s + len(b)] = action_ces(z, C, b[:, 2])
    print(f"{ds.name}: {len(q)} held-out queries ({held:.0%} of train triples); temperatures "
          + ("off" if T is None else ", ".join(f"{m} {float(t):.3f}" for m, t in zip(frozen.modalities, T))))
    mean = ces.mean(1)
    order = mean.argsort()
    print("mean held-out CE per subset (lower is better):")
    for a in order.tolist():
        print(f"  {names[a]:<40} {float(mean[a]):.4f}")
    per_query_best = ces.argmin(0)
    print("share of queries whose lowest-CE subset is each subset: "
          + ", ".join(f"{names[a]} {float((per_query_best == a).float().mean()):.3f}" for a in order.tolist()[:6]))
    R = ds.num_relations
    rel = q[:, 1] % R
    truth = ds.extras.get("synthetic")
    counts = torch.bincount(rel, minlength=R)
    print(f"per relation (top {args.relations} by held-out queries): best subset, its CE, all-teacher CE")
    for r in counts.argsort(descending=True)[:args.relations].tolist():
        m = rel == r
        v = ces[:, m].mean(1)
        pattern = ""
        if truth is not None:
            pattern = "blocks " + "+".join(b for b, on in zip(truth.teachers, truth.relation_blocks[r]) if on)
        print(f"  {ds.relations.labels[r][:40]:<40} n={int(m.sum()):>5} {pattern:<28} {names[int(v.argmin())]:<32} "
              f"{float(v.min()):.3f}  all {float(v[-1]):.3f}")
    if truth is not None:
        print("per planted pattern (synthetic): best subset by mean held-out CE")
        patterns = {tuple(np.asarray(truth.relation_blocks[r]).tolist()) for r in range(R)}
        for pat in sorted(patterns):
            rels = [r for r in range(R) if tuple(np.asarray(truth.relation_blocks[r]).tolist()) == pat]
            m = torch.isin(rel, torch.tensor(rels))
            v = ces[:, m].mean(1)
            label = "+".join(b for b, on in zip(truth.teachers, pat) if on)
            print(f"  {label:<24} best {names[int(v.argmin())]:<32} {float(v.min()):.3f}; "
                  + ", ".join(f"{names[a]} {float(v[a]):.3f}" for a in v.argsort()[1:4].tolist()))


if __name__ == "__main__":
    main()
