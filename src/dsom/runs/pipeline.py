"""Stage orchestration: ``dsom run`` / ``pretrain`` / ``distill`` and the missing-rate study (DESIGN §5).

Stages run in order, each resumable: features -> teachers (stage 1) -> ensembles -> students (stage 2)
-> evaluation -> ``results.json`` -> report and trackers. Set-up is :mod:`dsom.runs.setup`, run
directories :mod:`dsom.runs.rundir`, results :mod:`dsom.runs.results`, variants :mod:`dsom.runs.variants`.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsom import distributed
from dsom.config import Config
from dsom.data.graph import KGDataset, triple_keys
from dsom.data.pairs import PairIndex
from dsom.distill.holdout import (
    entity_reliability,
    fit_temperatures,
    reward_rows,
    teacher_ce,
    teacher_dataset,
)
from dsom.distill.rc_valid import train_rc_on_valid
from dsom.distill.selectors import selector_class
from dsom.ensemble import WeightedTeachers
from dsom.runlock import RunLock
from dsom.runs.results import build_results, ensemble_results, frozen_teacher_results, model_results
from dsom.runs.rundir import (
    check_resume_config,
    check_run_dir,
    default_output,
    prepare_run_dir,
    write_json_atomic,
    write_run_report,
)
from dsom.runs.setup import build_features, dataset_warnings, load_dataset
from dsom.runs.variants import EVAL_BASELINES, resolve_variants, variant_overrides
from dsom.schema import Results
from dsom.train.checkpoint import check_vocabulary
from dsom.train.loop import AUTO_CPU_MINUTES, resolve_batching, resolve_device
from dsom.train.student import StudentTrainer, student_config
from dsom.train.teachers import TeacherTrainer, load_frozen_teachers
from dsom.train.tracker import log_final

log = logging.getLogger("dsom")


def distill_stage(frozen: Any, ds: KGDataset, cfg: Config, out: Path, device: torch.device, resume: bool,
                  progress: bool, variants: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train the DSoM student and every requested variant on the same frozen teachers."""
    models: dict[str, Any] = {}
    info: dict[str, Any] = {"students": {}}
    overlap = _valid_test_overlap(ds)
    rows, temperatures, info["selection"] = selection_inputs(frozen, ds, cfg, device)
    stats = None
    if frozen.num_teachers > 1:
        stats = entity_reliability(frozen, torch.from_numpy(ds.queries("train")).to(device), ds.num_entities,
                                   temperatures).to(device)
    # computed alike on every process under torchrun; rank 0's values, so that no last bit differs
    distributed.broadcast_([t for t in (temperatures, stats) if t is not None])
    if temperatures is not None and frozen.num_teachers > 1:
        # the all-teacher mean of the calibrated teachers: what the 'avg' selector distils from, as an ensemble

        w = (1.0 / temperatures / frozen.num_teachers).expand(2 * ds.num_relations, -1).contiguous()
        models["teacher_avg/calibrated"] = model_results(WeightedTeachers(frozen, w), ds, cfg, device, progress,
                                                         memory_scale=frozen.num_teachers + 1)
    for name in ["student", *variants]:
        if name in EVAL_BASELINES:
            if frozen.num_teachers < 2 or len(ds.valid) == 0:
                info[name] = {"skipped": "needs at least two teachers and valid triples"}
                continue
            t0 = time.perf_counter()
            scorer, rc = train_rc_on_valid(frozen, ds, cfg, device, progress)
            distributed.broadcast_module(scorer.policy)  # trained alike on every process; rank 0's copy
            key = name if overlap == 0 else f"{name}/leaks_test"
            models[key] = model_results(scorer, ds, cfg, device, progress, memory_scale=frozen.num_teachers + 1)
            info[key] = {**rc, "seconds": round(time.perf_counter() - t0, 3), "valid_test_overlap": overlap}
            continue
        key = "student" if name == "student" else f"student/{name}"
        vcfg = student_config(cfg, variant_overrides(name) if name != "student" else {})

        cls = selector_class(vcfg.distill.selector)
        if frozen.num_teachers < 2 and cls is not None and cls.chooses:
            vcfg.distill.selector = "avg"  # a single teacher: there is nothing to select
        t0 = time.perf_counter()
        trainer = StudentTrainer(ds, vcfg, out, frozen, name=name.replace(":", "-"), progress=progress,
                                 reward_rows=rows, temperatures=temperatures if vcfg.distill.calibrate else None,
                                 entity_stats=stats)
        state = trainer.fit(resume=resume)
        trainer.save_final()
        models[key] = model_results(trainer.model.student, ds, vcfg, trainer.device, progress)
        entry: dict[str, Any] = {
            "selector": vcfg.distill.selector, "kd": vcfg.distill.kd, "rank": trainer.model.student.rank,
            "parameters": trainer.num_parameters(), "extra_parameters": trainer.extra_parameters(),
            "epochs_run": state.epoch, "best_epoch": state.best_epoch or state.epoch,
            "stopped_early": state.stopped_early, "epoch_cap": state.epoch_cap, "batching": trainer.batching,
            "train_s": round(state.train_seconds, 3),
            "epoch_s": round(state.train_seconds / max(len(state.epoch_seconds), 1), 3),
            "wall_s": round(time.perf_counter() - t0, 3)}
        analysis = trainer.policy_analysis()
        if analysis is not None:
            if name == "student":
                info["policy"] = analysis
            else:
                entry["policy"] = {k: v for k, v in analysis.items() if k != "per_relation"}
        info["students"][key] = entry
        trainer.tracker.end_run(True)
    return models, info


def selection_inputs(frozen: Any, ds: KGDataset, cfg: Config, device: torch.device,
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None, dict[str, Any]]:
    """The reward rows (queries of the triples held out from the teachers) and the teachers' temperatures fitted
    on those queries (on valid when nothing is held out), with a summary for ``results.json``."""
    dc = cfg.distill
    info: dict[str, Any] = {"holdout": dc.holdout, "holdout_seed": dc.holdout_seed}
    rows = reward_rows(ds, dc.holdout, dc.holdout_seed) if dc.holdout > 0 else None
    if rows is not None:
        info["holdout_triples"] = int(rows.sum()) // 2
    temperatures = None
    if dc.calibrate and frozen.num_teachers > 0:
        if rows is not None:
            fit_on, where = torch.from_numpy(ds.queries("train"))[rows], "held-out train triples"
        else:
            fit_on, where = torch.from_numpy(ds.queries("valid")), "valid"
        if len(fit_on) == 0:
            log.warning("distill.calibrate: no held-out or valid queries to fit temperatures on; using 1")
        else:
            g = torch.Generator().manual_seed(dc.holdout_seed)
            if len(fit_on) > dc.calibrate_max_queries:
                fit_on = fit_on[torch.randperm(len(fit_on), generator=g)[:dc.calibrate_max_queries]]
            fit_on = fit_on.to(device)
            temperatures = fit_temperatures(frozen, fit_on)
            before, after = teacher_ce(frozen, fit_on), teacher_ce(frozen, fit_on, temperatures)
            info["calibration"] = {
                "fitted_on": where, "queries": int(len(fit_on)),
                **{m: {"temperature": round(float(t), 5), "ce_before": round(float(b), 5),
                       "ce_after": round(float(a), 5)}
                   for m, t, b, a in zip(frozen.modalities, temperatures, before, after)}}
            log.info("teacher temperatures (fitted on %s): %s", where,
                     ", ".join(f"{m} {float(t):.3f}" for m, t in zip(frozen.modalities, temperatures)))
    return rows, temperatures, info


def _valid_test_overlap(ds: KGDataset) -> int:
    if len(ds.valid) == 0 or len(ds.test) == 0:
        return 0
    valid, test = triple_keys([ds.valid, ds.test], ds.num_entities, ds.num_relations)
    return int(np.isin(np.unique(valid), test).sum())


def run(cfg: Config, output: str | Path | None = None, resume: bool = False, force: bool = False,
        progress: bool = True, stages: str = "all", ablation: str | None = None,
        teachers_from: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Features -> teachers -> ensembles -> student(s) -> evaluation; writes ``results.json`` last.

    ``stages="pretrain"`` stops after the teachers and ensembles; ``teachers_from`` reuses the materialised
    teachers of an earlier run (``dsom distill``) instead of training them.
    """
    out = Path(output) if output else default_output(cfg)
    out = distributed.broadcast_object(out)  # under torchrun: rank 0's (time-stamped) name on every process
    # Everything is validated before the run directory is touched: an earlier run is replaced (--force) or
    # extended (--resume), and config.yaml rewritten, only once the configuration and every input passed.
    check_run_dir(out, resume, force)
    ds = load_dataset(cfg)
    warnings_ = dataset_warnings(ds)
    variants = resolve_variants(cfg, ablation)
    teachers = tables = feature_info = None
    if teachers_from is not None:
        teachers = load_teachers_for(cfg, ds, teachers_from)
    else:
        if not distributed.is_main():  # under torchrun rank 0 builds (and caches) the features, then the others
            distributed.barrier()
        tables, feature_info = build_features(ds, cfg, progress)
        if distributed.is_main():
            distributed.barrier()
    if resume:
        check_resume_config(out, cfg)
    distributed.barrier()  # every process has checked the directory before rank 0 changes it
    lock = RunLock(out).acquire() if distributed.is_main() else None  # rank 0 alone writes the run directory
    try:
        if lock is not None:
            prepare_run_dir(out, resume, force)
            for w in warnings_:
                log.warning("dataset %s: %s", ds.name, w)
            log.info("%s", describe_plan(cfg, ds, variants, stages, teachers_from))
            (out / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
        distributed.barrier()
        if teachers is not None:
            return _distill_only(cfg, ds, out, warnings_, teachers, teachers_from, resume, progress, variants)
        return _run_stages(cfg, ds, out, warnings_, tables, feature_info, resume, progress, stages, variants)
    finally:
        if lock is not None:
            lock.release()


def describe_plan(cfg: Config, ds: KGDataset, variants: list[str], stages: str = "all",
                  teachers_from: str | Path | None = None) -> str:
    """One line saying what a run will train, so a user sees the budget before it is spent (each trainer then
    logs its time per epoch, measured on its first batches)."""
    queries = 2 * (len(ds.train) - round(cfg.distill.holdout * len(ds.train)))  # the teachers' share of train
    batches = -(-queries // cfg.train.batch_size)
    t = cfg.train
    parts = []
    device = resolve_device(t.device)
    stage1, stage2 = resolve_batching(t.batching, device), resolve_batching(cfg.distill.batching, device)
    pairs = "pairs" in (stage1, stage2)
    train_queries = ds.queries("train")
    per_pair = len(train_queries) / max(PairIndex(torch.from_numpy(train_queries)).num_pairs, 1) if pairs else 0.0
    if teachers_from is None:
        parts.append(f"teachers {'+'.join(cfg.modalities)} rank {cfg.model.rank}, up to {t.epochs} epochs of "
                     f"{'about ' if stage1 == 'pairs' else ''}{batches:,} batches ({queries:,} queries"
                     f"{', pair batches' if stage1 == 'pairs' else ''})"
                     + (f", early stopping after {t.patience} epochs without gain" if t.patience > 0
                        and t.valid_every > 0 else ""))
        ens = list(cfg.ensemble.models)
        if ens:
            parts.append("ensembles " + ", ".join(ens))
    else:
        parts.append(f"teachers from {teachers_from}")
    if stages == "all":
        students = ["student", *variants]
        parts.append(f"{len(students)} student{'s' if len(students) > 1 else ''} ({', '.join(students)}) rank "
                     f"{cfg.distill.student_rank or cfg.model.rank}, {cfg.distill.epochs or t.epochs} epochs each"
                     f"{', pair batches' if stage2 == 'pairs' else ''}")
    if pairs:  # whole pairs trained worse models where pairs have many tails (docs/usage.md)
        k = t.pair_max_queries
        parts.append(f"{per_pair:.2f} training queries per (entity, relation) pair (pair batches: "
                     + (f"pairs cut into pieces of at most {k} queries; docs/usage.md)" if k > 0 else
                        "whole pairs, less accurate than triples on FB15K-237's 3.64 (docs/usage.md); "
                        "train.pair_max_queries cuts them)"))
    if t.max_minutes != 0:
        cap = (f"{t.max_minutes:g} min" if t.max_minutes > 0
               else f"auto: {AUTO_CPU_MINUTES:g} min on a CPU, none on a GPU")
        parts.append(f"each stage's time capped by train.max_minutes ({cap}; 0 = no cap)")
    return "plan: " + "; ".join(parts)


def _run_stages(cfg: Config, ds: KGDataset, out: Path, warnings_: list[str], tables: Any, feature_info: Any,
                resume: bool, progress: bool, stages: str, variants: list[str]) -> tuple[Path, dict[str, Any]]:
    t0 = time.perf_counter()

    trainer = TeacherTrainer(teacher_dataset(ds, cfg.distill.holdout, cfg.distill.holdout_seed), cfg, out, tables,
                             progress=progress)
    state = trainer.fit(resume=resume)
    frozen = trainer.save_final()
    pretrain_s = time.perf_counter() - t0
    trainer.model.eval()
    models, oracle = frozen_teacher_results(frozen, ds, cfg, trainer.device, progress)
    if "teacher_avg" not in cfg.ensemble.models:
        models.pop("teacher_avg", None)
    ens_models, ens_info = ensemble_results(frozen, ds, cfg, trainer.device, progress)
    models.update(ens_models)
    distill_info: dict[str, Any] = {}
    students: dict[str, Any] = {}
    if stages == "all":
        students, distill_info = distill_stage(frozen, ds, cfg, out, trainer.device, resume, progress, variants)
    results = build_results(
        cfg, ds, warnings_, cfg.modalities, models, students, trainer.device, distill_info,
        features=feature_info,
        diagnostics={"teacher_oracle": oracle},
        ensembles=ens_info,
        selection={"metric": f"valid {cfg.train.teacher_selection} {cfg.train.selection_policy} "
                             f"{cfg.train.selection_metric}",
                   "best_epoch": state.best_epoch or state.epoch, "epochs_run": state.epoch,
                   "stopped_early": state.stopped_early, "epoch_cap": state.epoch_cap},
        parameters={"teachers": trainer.num_parameters(),
                    "teachers_formula": trainer.model.parameter_count(
                        ds.num_entities, 2 * ds.num_relations, cfg.model.rank, [t.dim for t in tables.values()])},
        timing={"pretrain_s": round(state.train_seconds, 3), "pretrain_wall_s": round(pretrain_s, 3),
                "pretrain_epoch_s": round(state.train_seconds / max(len(state.epoch_seconds), 1), 3),
                "distill_s": None, "distill_epoch_s": None},
        precision={"train": trainer.precision, "eval": cfg.eval.precision},
        batching={"teachers": trainer.batching},
    )
    trainer.tracker.end_run(True)
    finish_run(out, cfg, results)
    return out, results


def finish_run(out: Path, cfg: Config, results: Results) -> None:
    """``results.json`` (atomically, last of the run's files), the report, then the experiment trackers."""
    write_json_atomic(out / "results.json", results)
    write_run_report(out, results)
    log_final(out, cfg, results)  # results and report to the experiment trackers, which end their runs


MISSING_RATES = (0.2, 0.4, 0.6, 0.8)


def missing_study(cfg: Config, output: str | Path | None, resume: bool = False, force: bool = False,
                  progress: bool = True, rates: tuple[float, ...] = MISSING_RATES) -> tuple[Path, dict[str, Any]]:
    """The Figure-4 study (SPEC §7): the full pipeline at missing rate 0 (the main run, in ``output``) and at
    every rate in ``rates`` (sub-runs ``output/missing-<rate>``, teachers retrained each time). The main
    ``results.json`` gains ``missing_study``: test metrics of every teacher, Teacher Avg. and the student per rate."""
    out, results = run(cfg, output, resume=resume, force=force, progress=progress)
    study: dict[str, Any] = {}

    def row(res: dict[str, Any]) -> dict[str, Any]:
        return {k: v["test"] for k, v in res["models"].items()
                if "test" in v and (k in ("student", "teacher_avg") or k.startswith("teacher/"))}

    study["0.0"] = row(results)
    for rate in rates:
        sub_cfg = copy.deepcopy(cfg)
        sub_cfg.features.missing_rate = rate
        _, sub = run(sub_cfg, out / f"missing-{rate}", resume=resume, force=force, progress=progress)
        study[str(rate)] = row(sub)
    results["missing_study"] = study
    if not distributed.is_main():
        return out, results
    lock = RunLock(out).acquire()  # the main run's results.json is rewritten: no other writer meanwhile
    try:
        write_json_atomic(out / "results.json", results)
        write_run_report(out, results)
    finally:
        lock.release()
    return out, results


def load_teachers_for(cfg: Config, ds: KGDataset, teachers_from: str | Path) -> tuple[Any, torch.device]:
    """The frozen teachers of ``dsom distill --teachers``, checked against the dataset; adopts their modalities
    and held-out sample into ``cfg``."""
    device = resolve_device(cfg.train.device)
    frozen, meta = load_frozen_teachers(teachers_from, device)
    check_vocabulary(meta, ds, teachers_from, "distil on the dataset the teachers were trained on")
    cfg.modalities = list(frozen.modalities)
    tcfg = meta.get("config", {}).get("distill", {})
    held, seed = float(tcfg.get("holdout", 0.0)), int(tcfg.get("holdout_seed", 0))
    if (held, seed) != (cfg.distill.holdout, cfg.distill.holdout_seed):
        log.info("distill: the teachers of %s held out %.3g of train (seed %d); using that, not distill.holdout=%.3g",
                 teachers_from, held, seed, cfg.distill.holdout)
        cfg.distill.holdout, cfg.distill.holdout_seed = held, seed
    return frozen, device


def _distill_only(cfg: Config, ds: KGDataset, out: Path, warnings_: list[str], teachers: tuple[Any, torch.device],
                  teachers_from: str | Path, resume: bool, progress: bool,
                  variants: list[str]) -> tuple[Path, dict[str, Any]]:
    frozen, device = teachers
    models, _ = frozen_teacher_results(frozen, ds, cfg, device, progress)
    students, info = distill_stage(frozen, ds, cfg, out, device, resume, progress, variants)
    results = build_results(cfg, ds, warnings_, list(frozen.modalities), models, students, device, info,
                            teachers_from=str(teachers_from))
    finish_run(out, cfg, results)
    return out, results
