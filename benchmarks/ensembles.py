"""Re-run the MoSE ensembles of a finished run on its saved teachers with the current code: test MRR / Hits@10
under all three tie policies and the seconds each ensemble took (training on valid plus evaluation).

    DSOM_DATA=../shared/data python benchmarks/ensembles.py runs/study-mkgy/dsom-2022 [--set ensemble.mi_output=relu]
    DSOM_DATA=../shared/data python benchmarks/ensembles.py runs/reproduce/DB15K/seed-2022 --models mose_mi [--mi-reference]

The run's own config.yaml gives the dataset and every ensemble option; ``--set`` overrides them. Nothing in the
run directory is written.
"""

from __future__ import annotations

import argparse
import json

import torch

from dsom.config import Config, apply_dict, load_yaml, parse_assignment
from dsom.ensemble import MetaLearner
from dsom.runs.results import ensemble_results
from dsom.runs.setup import check_config, load_dataset
from dsom.train.teachers import load_frozen_teachers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--set", action="append", default=[], help="config override KEY=VALUE (repeatable)")
    p.add_argument("--models", default="mose_bi,mose_mi")
    p.add_argument("--json", help="also write the numbers to this file")
    p.add_argument("--mi-reference", action="store_true",
                   help="train MoSE-MI's meta-learner through MetaLearner.reference (nn.Sequential on the whole "
                        "(B, N) block, the implementation before issue 12) instead of the blocked forward: the "
                        "'before' of an end-to-end before/after")
    args = p.parse_args()
    cfg = Config()
    apply_dict(cfg, load_yaml(f"{args.run_dir}/config.yaml"))
    for s in args.set:
        key, value = parse_assignment(s)
        apply_dict(cfg, {key: value})
    cfg.ensemble.models = args.models.split(",")
    if args.mi_reference:
        MetaLearner.forward = MetaLearner.reference  # type: ignore[method-assign]
    check_config(cfg)
    ds = load_dataset(cfg)
    frozen, _ = load_frozen_teachers(args.run_dir)
    models, info = ensemble_results(frozen, ds, cfg, torch.device("cpu"), progress=False)
    out = {}
    for name, res in models.items():
        t = res["test"]
        out[name] = {tie: round(100 * t[tie]["mrr"], 2) for tie in ("realistic", "pessimistic", "optimistic")}
        out[name]["hits@10"] = round(100 * t["realistic"]["hits@10"], 2)
        out[name]["seconds"] = info.get(name, {}).get("seconds")
        if name == "mose_mi":
            out[name]["epoch"] = info[name]["epoch"]
            out[name]["losses"] = [round(h["loss"], 4) for h in info[name]["history"]]
        print(f"{name:<8} test MRR realistic {out[name]['realistic']:.2f} pessimistic {out[name]['pessimistic']:.2f} "
              f"optimistic {out[name]['optimistic']:.2f}  H@10 {out[name]['hits@10']:.2f}  {out[name]['seconds']} s"
              + (f"  epoch {out[name]['epoch']}, losses {out[name]['losses']}" if name == "mose_mi" else ""))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
