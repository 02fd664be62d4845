"""The results builder: every model's metrics block of ``results.json`` (DESIGN §5), built one way.

Shapes (:mod:`dsom.schema`): ``results["models"][name][split][policy]`` is a metrics dict (``mrr``, ``mr``,
``hits@k``) for ``policy`` in :data:`~dsom.ranks.TIE_POLICIES`; ``split_head``/``split_tail`` hold the
per-direction metrics.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from dsom import __version__, distributed
from dsom.config import Config
from dsom.data.graph import KGDataset
from dsom.distill.holdout import holdout_mask
from dsom.ensemble import WeightedTeachers, boosting_weights, train_meta_learner
from dsom.errors import ConfigError
from dsom.evaluate import evaluate, split_counts
from dsom.models.teachers import AllViews
from dsom.ranks import TIE_POLICIES
from dsom.schema import Results
from dsom.train.teachers import view_metrics

log = logging.getLogger("dsom")

SMALL_FIT = 1000  # fewer fitting triples than this: warn that the ensembles may learn little (DB15K clean: 73)


def split_results(metrics_by_split: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``{split: {policy: metrics}, split_head: ..., split_tail: ...}`` from :func:`evaluate`-style dicts."""
    out: dict[str, Any] = {}
    for split, m in metrics_by_split.items():
        out[split] = {p: m[p] for p in TIE_POLICIES}
        if "head" in m:
            out[f"{split}_head"] = m["head"]
            out[f"{split}_tail"] = m["tail"]
    return out


def model_results(scorer: Any, ds: KGDataset, cfg: Config, device: torch.device, progress: bool,
                  memory_scale: float = 1.0) -> dict[str, Any]:
    """Results block of one scorer on the configured splits."""
    out: dict[str, Any] = {}
    for split in cfg.eval.splits:
        if len(ds.splits[split]) == 0:
            continue
        out[split] = evaluate(scorer, ds, split, batch_size=cfg.eval.batch_size,
                              memory_budget_mb=cfg.eval.memory_budget_mb / memory_scale,
                              precision=cfg.eval.precision, device=device, progress=progress)
    return split_results(out)


def frozen_teacher_results(frozen: Any, ds: KGDataset, cfg: Config, device: torch.device,
                           progress: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every teacher and Teacher Avg. of materialised teachers, ranked in one pass per split, plus the
    oracle (per-query best teacher) as a diagnostic."""
    per: dict[str, dict[str, Any]] = {}
    oracle: dict[str, Any] = {}
    for split in cfg.eval.splits:
        if len(ds.splits[split]) == 0:
            continue
        counts, n = split_counts(AllViews(frozen), ds, split, batch_size=cfg.eval.batch_size,
                                 memory_budget_mb=cfg.eval.memory_budget_mb / (frozen.num_teachers + 1),
                                 precision=cfg.eval.precision, device=device, progress=progress)
        views = view_metrics(counts, n, frozen.modalities)
        oracle[split] = views.pop("teacher_oracle")
        for key, m in views.items():
            per.setdefault(key, {})[split] = m
    return {k: split_results(v) for k, v in per.items()}, oracle


def ensemble_fit_data(ds: KGDataset, cfg: Config) -> tuple[KGDataset, str]:
    """The dataset whose ``valid`` split the ensembles are fitted on (``ensemble.fit_on``) and its name: valid
    itself, or the train triples held out from the teachers (``distill.holdout``) put in the place of valid."""
    if cfg.ensemble.fit_on == "valid":
        return ds, "valid"
    if cfg.distill.holdout <= 0:
        raise ConfigError("ensemble.fit_on=holdout needs train triples the teachers never saw: set distill.holdout > 0 "
                          "(e.g. 0.1) or ensemble.fit_on=valid")
    held = ds.train[holdout_mask(len(ds.train), cfg.distill.holdout, cfg.distill.holdout_seed)]
    return ds.with_split("valid", held), "held-out train triples"


def ensemble_results(frozen: Any, ds: KGDataset, cfg: Config, device: torch.device,
                     progress: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """MoSE-BI and MoSE-MI (SPEC §3), fitted on valid or on the held-out train triples (``ensemble.fit_on``) and
    evaluated on ``ds``; needs at least two teachers and triples to fit on."""
    models: dict[str, Any] = {}
    info: dict[str, Any] = {}
    wanted = [m for m in cfg.ensemble.models if m in ("mose_bi", "mose_mi")]
    if not wanted:
        return models, info
    fit_ds, where = ensemble_fit_data(ds, cfg)
    if frozen.num_teachers < 2 or len(fit_ds.valid) == 0:
        info["skipped"] = f"MoSE-BI/MI need at least two teachers and triples to fit on ({where}: none)"
        return models, info
    info["fitted_on"] = {"split": where, "triples": int(len(fit_ds.valid))}
    if cfg.ensemble.fit_on == "valid" and len(fit_ds.valid) < SMALL_FIT and cfg.distill.holdout > 0:
        log.warning("MoSE-BI/MI are fitted on only %d valid triples; ensemble.fit_on=holdout fits them on the %d "
                    "train triples held out from the teachers", len(fit_ds.valid),
                    int(round(cfg.distill.holdout * len(ds.train))))
    if "mose_bi" in wanted:
        t0 = time.perf_counter()
        w = boosting_weights(frozen, fit_ds, "valid", cfg.ensemble.bi_min_queries, device=device, progress=progress)
        models["mose_bi"] = model_results(WeightedTeachers(frozen, w), ds, cfg, device, progress,
                                          memory_scale=frozen.num_teachers + 1)
        info["mose_bi"] = {"seconds": round(time.perf_counter() - t0, 3),
                           "mean_weight": dict(zip(frozen.modalities, [round(float(x), 4) for x in w.mean(0)])),
                           "uniform_relations": int((w == 1.0 / frozen.num_teachers).all(1).sum())}
    if "mose_mi" in wanted:
        t0 = time.perf_counter()
        scale = cfg.ensemble.mi_hidden + frozen.num_teachers + 2
        scorer, mi = train_meta_learner(frozen, fit_ds, cfg.ensemble, device=device,
                                        memory_budget_mb=cfg.eval.memory_budget_mb, progress=progress,
                                        selection_policy=cfg.train.selection_policy)
        distributed.broadcast_module(scorer.net)  # trained alike on every process; rank 0's copy, to be exact
        models["mose_mi"] = model_results(scorer, ds, cfg, device, progress, memory_scale=scale)
        leaky = mi.pop("leaky_scorer", None)
        if leaky is not None:
            distributed.broadcast_module(leaky.net)
            models["mose_mi/leaky_test_selection"] = model_results(leaky, ds, cfg, device, progress,
                                                                   memory_scale=scale)
        info["mose_mi"] = {**mi, "seconds": round(time.perf_counter() - t0, 3)}
    return models, info


def build_results(cfg: Config, ds: KGDataset, warnings_: list[str], modalities: list[str], models: dict[str, Any],
                  students: dict[str, Any], device: torch.device, distill_info: dict[str, Any],
                  **sections: Any) -> Results:
    """``results.json`` of a run: the dataset header, every model (the DSoM student first, then ``models``, then
    the other students), the stage-specific ``sections`` in the order given, the versions, and the distillation
    summary (:func:`add_distill`). The one place a results file is assembled."""
    results: Results = {
        "dataset": ds.summary(),
        "dataset_warnings": warnings_,
        "valid_split": {"mode": cfg.data.valid, "dropped": ds.extras.get("valid_dropped", 0)},
        "modalities": list(modalities),
        "models": {**{k: v for k, v in students.items() if k == "student"}, **models,
                   **{k: v for k, v in students.items() if k != "student"}},
        "parameters": {},
        "timing": {"pretrain_s": None, "pretrain_epoch_s": None, "distill_s": None, "distill_epoch_s": None},
        **sections,  # type: ignore[typeddict-item]
        "versions": {"dsom": __version__, "torch": torch.__version__},
        "device": str(device),
    }
    add_distill(results, distill_info)
    return results


def add_distill(results: Results, info: dict[str, Any]) -> None:
    """The student's parameter count and timing, the policy analysis and the per-student logs of stage 2."""
    if not info:
        return
    students = info.get("students", {})
    if "student" in students:
        s = students["student"]
        results["parameters"]["student"] = s["parameters"]
        results["parameters"]["policy_and_selector"] = s["extra_parameters"]
        results["timing"]["distill_s"] = s["train_s"]
        results["timing"]["distill_epoch_s"] = s["epoch_s"]
    if "policy" in info:
        results["policy"] = info["policy"]
    results["distill"] = {k: v for k, v in info.items() if k != "policy"}
