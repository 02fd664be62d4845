"""The ``dsom run`` / ``dsom pretrain`` pipeline and its run directory (DESIGN §5).

A run directory holds ``config.yaml``, ``metrics.jsonl``, ``checkpoints/`` and, once everything has
succeeded, ``results.json`` (written atomically last, so a failed run never leaves a results file that
does not match its checkpoints).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsom import __version__
from dsom.config import METHOD_PRESETS, Config, _all_keys, apply_dict, check_values, get_value, load_yaml
from dsom.data import registry
from dsom.data.graph import KGDataset, triple_keys
from dsom.data.info import dataset_info
from dsom.distill.holdout import (
    entity_reliability,
    fit_temperatures,
    reward_rows,
    teacher_ce,
    teacher_dataset,
)
from dsom.distill.kd import check_kd
from dsom.distill.rc_valid import train_rc_on_valid
from dsom.distill.selectors import check_selector, selector_class
from dsom.ensemble import WeightedTeachers, boosting_weights, train_meta_learner
from dsom.errors import ConfigError, DsomError
from dsom.evaluate import evaluate, split_counts
from dsom.features.build import SOURCES, build_modality, with_missing_rate
from dsom.models.teachers import AllViews
from dsom.ranks import TIE_POLICIES
from dsom.report import write_report
from dsom.runlock import RunLock
from dsom.train.checkpoint import check_vocabulary
from dsom.train.loop import resolve_device
from dsom.train.student import StudentTrainer, student_config
from dsom.train.teachers import TeacherTrainer, load_frozen_teachers, view_metrics
from dsom.train.tracker import log_final

log = logging.getLogger("dsom")

BUILT_IN_MODALITIES = ("structure", *SOURCES)


def build_config(dataset: str | None = None, config_file: str | None = None,
                 overrides: list[tuple[str, Any]] | None = None, preset: str | None = None) -> Config:
    """Defaults < method preset (``--preset``) < dataset preset < YAML file < overrides (see :mod:`dsom.config`)."""
    cfg = Config()
    if dataset is not None and not dataset.strip():
        raise ConfigError("the dataset argument is empty; name a registered dataset or a folder, or leave it out "
                          "for the embedded synthetic graph")
    file_values = load_yaml(config_file) if config_file else {}
    name = dataset or file_values.get("data", {}).get("dataset") or cfg.data.dataset
    chosen = preset or dict(overrides or {}).get("preset") or file_values.get("preset") or cfg.preset
    if chosen not in METHOD_PRESETS:
        raise ConfigError(f"--preset {chosen}: choose one of {', '.join(METHOD_PRESETS)}")
    cfg.preset = chosen
    apply_dict(cfg, METHOD_PRESETS[chosen])
    apply_dict(cfg, registry.preset(name))
    apply_dict(cfg, file_values)
    if dataset:
        cfg.data.dataset = dataset
    for key, value in overrides or []:
        apply_dict(cfg, {key: value})
    check_config(cfg)
    return cfg


def check_config(cfg: Config) -> None:
    mods = cfg.modalities
    if "structure" not in mods:
        raise ConfigError("modalities: 'structure' must be one of the modalities")
    if len(set(mods)) != len(mods):
        raise ConfigError(f"modalities: {mods} lists a modality twice")
    unknown = [m for m in mods if m not in BUILT_IN_MODALITIES and m not in cfg.features.files]
    if unknown:
        raise ConfigError(f"modalities: {', '.join(unknown)} has no built-in source (built in: "
                          f"{', '.join(BUILT_IN_MODALITIES)}); give a feature file with "
                          f"--set features.files.{unknown[0]}=PATH")

    try:
        check_selector(cfg.distill.selector, list(mods))
        check_kd(cfg.distill.kd)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not 0.0 <= cfg.features.missing_rate <= 1.0:
        raise ConfigError("config key 'features.missing_rate' must be in [0, 1]")
    bad = [m for m in cfg.ensemble.models if m not in ("teacher_avg", "mose_bi", "mose_mi")]
    if bad:
        raise ConfigError(f"ensemble.models: unknown {bad}; choose from teacher_avg, mose_bi, mose_mi")
    for key in ("model.rank", "train.epochs", "train.batch_size", "eval.batch_size"):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) <= 0:
            raise ConfigError(f"config key '{key}' must be positive")
    if cfg.train.lr <= 0:
        raise ConfigError("config key 'train.lr' must be positive")
    if not 0.0 <= cfg.distill.holdout < 1.0:
        raise ConfigError(f"config key 'distill.holdout' must be in [0, 1), got {cfg.distill.holdout}")
    check_values(cfg)

    try:
        resolve_device(cfg.train.device)
    except RuntimeError as exc:
        raise ConfigError(f"config key 'train.device': {exc}; use auto, cpu, cuda or cuda:N") from None


def load_dataset(cfg: Config) -> KGDataset:
    """The configured dataset, with ``data.valid=clean`` applied."""
    ds = registry.load(cfg.data.dataset, cfg.data.layout, cfg.data.synthetic)
    if cfg.data.valid == "clean":
        ds, dropped = ds.clean_valid()
        log.info("data.valid=clean: dropped %d valid triples shared with train/test or repeated; %d remain",
                 dropped, len(ds.valid))
        ds.extras["valid_dropped"] = dropped
    return ds


def build_features(ds: KGDataset, cfg: Config, progress: bool = True,
                   force: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """Feature tables of the configured feature modalities (built or read from the cache) and a summary
    for ``results.json``. The synthetic dataset carries its own tables."""
    tables: dict[str, Any] = {}
    info: dict[str, Any] = {}
    for m in cfg.modalities:
        if m == "structure":
            continue
        if m in ds.modalities and m not in cfg.features.files:
            table, seconds, cached = with_missing_rate(ds.modalities[m], m, cfg.features), 0.0, None
        else:
            built = build_modality(ds, m, cfg.features, force=force, progress=progress)
            table, seconds, cached = built.table, built.seconds, built.cached
        tables[m] = table
        info[m] = {"shape": [table.num_entities, table.dim], "present": int(table.present.sum()),
                   "seconds": round(seconds, 3), "cached": cached, "source": table.source}
        log.info("features %s: %d x %d, present %d, %.1f s", m, table.num_entities, table.dim,
                 int(table.present.sum()), seconds)
    return tables, info


def dataset_warnings(ds: KGDataset) -> list[str]:
    """The warnings of ``dsom data info`` (split contamination, unseen entities, leakage)."""
    try:
        return list(dataset_info(ds).get("warnings", []))
    except Exception as exc:  # noqa: BLE001 - statistics must never stop a run
        return [f"could not compute dataset statistics: {exc}"]


def default_output(cfg: Config) -> Path:
    name = Path(cfg.data.dataset).name or "dataset"
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


# Keys a resumed run may change: budgets, evaluation and hardware settings, never what the checkpoints hold.
RESUME_MAY_CHANGE = ("train.epochs", "train.patience", "train.device", "train.threads", "train.compile",
                     "train.block_mb", "train.checkpoint_every", "distill.epochs", "distill.variants", "eval.",
                     "ensemble.", "track.")


def check_run_dir(out: Path, resume: bool, force: bool) -> None:
    """Refuse to clobber an earlier run unless asked to (reads only; :func:`prepare_run_dir` acts)."""
    if out.exists() and not out.is_dir():
        raise DsomError(f"output {out} exists and is not a directory; choose another -o")
    if out.is_symlink() and not out.exists():
        raise DsomError(f"output {out} is a broken symlink or a symlink loop; choose another -o")
    has_results = (out / "results.json").exists()
    has_ckpt = (out / "checkpoints").exists()
    if resume:
        if not (out / "config.yaml").is_file():
            raise DsomError(f"--resume: {out} holds no run to resume (config.yaml missing)")
        return
    if (has_results or has_ckpt) and not force:
        what = "a finished run" if has_results else "an unfinished run (use --resume to continue it)"
        raise DsomError(f"output directory {out} already holds {what}; choose another -o or pass --force")


def check_resume_config(out: Path, cfg: Config) -> None:
    """A resumed run may change only :data:`RESUME_MAY_CHANGE`; anything else would not match its checkpoints."""
    saved = Config()
    try:
        apply_dict(saved, load_yaml(out / "config.yaml"))
    except ConfigError as exc:
        raise DsomError(f"--resume: {out / 'config.yaml'} is not a valid configuration ({exc})") from None
    for key in _all_keys(cfg):
        if key.startswith(RESUME_MAY_CHANGE):
            continue
        before, after = get_value(saved, key), get_value(cfg, key)
        if before != after:
            raise DsomError(f"--resume: {key} was {before!r} in {out / 'config.yaml'}, now {after!r}; a resumed run "
                            f"keeps its configuration (it may change only epochs, patience, devices, evaluation and "
                            f"variants): drop the change, or start a new run with another -o or --force")


def prepare_run_dir(out: Path, resume: bool, force: bool) -> None:
    """Refuse to clobber an earlier run unless asked to; with ``force``, clear the earlier run's outputs
    (called only after the new run's configuration and inputs have been validated)."""
    check_run_dir(out, resume, force)
    if resume:
        return
    has_results = (out / "results.json").exists()
    if force:
        if has_results:
            os.replace(out / "results.json", out / "results.previous.json")
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    os.replace(tmp, path)


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


def ensemble_results(frozen: Any, ds: KGDataset, cfg: Config, device: torch.device,
                     progress: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """MoSE-BI and MoSE-MI (SPEC §3), trained on valid; needs at least two teachers and valid triples."""
    models: dict[str, Any] = {}
    info: dict[str, Any] = {}
    wanted = [m for m in cfg.ensemble.models if m in ("mose_bi", "mose_mi")]
    if not wanted:
        return models, info
    if frozen.num_teachers < 2 or len(ds.valid) == 0:
        info["skipped"] = "MoSE-BI/MI need at least two teachers and a non-empty valid split"
        return models, info
    if "mose_bi" in wanted:
        t0 = time.perf_counter()
        w = boosting_weights(frozen, ds, "valid", cfg.ensemble.bi_min_queries, device=device, progress=progress)
        models["mose_bi"] = model_results(WeightedTeachers(frozen, w), ds, cfg, device, progress,
                                          memory_scale=frozen.num_teachers + 1)
        info["mose_bi"] = {"seconds": round(time.perf_counter() - t0, 3),
                           "mean_weight": dict(zip(frozen.modalities, [round(float(x), 4) for x in w.mean(0)])),
                           "uniform_relations": int((w == 1.0 / frozen.num_teachers).all(1).sum())}
    if "mose_mi" in wanted:
        t0 = time.perf_counter()
        scale = cfg.ensemble.mi_hidden + frozen.num_teachers + 2
        scorer, mi = train_meta_learner(frozen, ds, cfg.ensemble, device=device,
                                        memory_budget_mb=cfg.eval.memory_budget_mb, progress=progress,
                                        selection_policy=cfg.train.selection_policy)
        models["mose_mi"] = model_results(scorer, ds, cfg, device, progress, memory_scale=scale)
        leaky = mi.pop("leaky_scorer", None)
        if leaky is not None:
            models["mose_mi/leaky_test_selection"] = model_results(leaky, ds, cfg, device, progress,
                                                                   memory_scale=scale)
        info["mose_mi"] = {**mi, "seconds": round(time.perf_counter() - t0, 3)}
    return models, info


STUDENT_VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {"distill.selector": "none"},  # a plain ComplEx trained alone for the same epochs
    "ndkd_avg": {"distill.selector": "avg"},  # Table 4 "w/ NDKD": all-teacher mean, no policy
    "nekd": {"distill.kd": "nekd"},  # Table 4 "w/ RC & L_NEKD"
    "nnkd": {"distill.kd": "nnkd"},  # Table 4 "w/ RC & L_NNKD"
    "vanilla_kd": {"distill.kd": "vanilla"},  # Table 4 "w/ RC & Vanilla KD"
    "dkd": {"distill.kd": "dkd"},  # Table 4 "w/ RC & DKD"
    "conf": {"distill.selector": "conf"},  # Table 2 ConfTeacher
    "best_teacher": {"distill.selector": "best_teacher"},  # Table 2 BestTeacher
    "best_strategy": {"distill.selector": "best_strategy"},  # Table 2 BestStrategy
    "mulde": {"distill.selector": "mulde"},  # Table 2 MulDE (SPEC sketch)
    # the selection ablation (docs/results.md): the paper's policy on the same teachers, then each dsom fix removed
    "paper_policy": {k: v for k, v in METHOD_PRESETS["paper"].items()
                     if k not in ("distill.holdout", "distill.tau_squared")},
    "rewards_on_train": {"distill.reward_rows": "all"},
    "no_calibration": {"distill.calibrate": False},
    "binary_reward": {"distill.reward": "binary", "distill.baseline": "avg_action", "distill.advantage_norm": False},
    "logits_state": {"distill.policy_state": "logits", "distill.policy_relation_dim": 0},
    "no_relation": {"distill.policy_relation_dim": 0},
    "no_entity_stats": {"distill.policy_entity_stats": "none"},
    "query_entity_stats": {"distill.policy_entity_stats": "query"},
    "no_entropy": {"distill.entropy": 0.0},
    "shared_optimizer": {"distill.policy_optimizer": "shared"},
}
EVAL_BASELINES = ("rc_on_val",)
ABLATIONS = {
    "table2": ["conf", "best_teacher", "best_strategy", "mulde"],
    "table4": ["ndkd_avg", "nekd", "nnkd", "vanilla_kd", "dkd", "rc_on_val"],
    "table6": ["single:{m}"],
    "dim": ["rank:{d}"],
    "selection": ["ndkd_avg", "paper_policy", "rewards_on_train", "no_calibration", "binary_reward", "logits_state",
                  "no_relation", "no_entity_stats", "query_entity_stats", "no_entropy", "shared_optimizer"],
}
PAPER_DIMS = (1000, 512, 256, 128, 64)


def variant_overrides(name: str) -> dict[str, Any]:
    """Config overrides of a named student variant (``single:<m>``, ``rank:<d>`` or a key of STUDENT_VARIANTS)."""
    if name in STUDENT_VARIANTS:
        return STUDENT_VARIANTS[name]
    if name.startswith("single:"):
        return {"distill.selector": name}
    if name.startswith("rank:") and name[5:].isdigit() and int(name[5:]) > 0:
        return {"distill.student_rank": int(name[5:])}
    raise ConfigError(f"distill.variants: unknown variant '{name}' (choose from {', '.join(STUDENT_VARIANTS)}, "
                      f"single:<modality>, rank:<d>, {', '.join(EVAL_BASELINES)})")


def student_dims(teacher_rank: int) -> list[int]:
    """Student ranks of the dimension study (Table 5): the paper's dimensions below the teachers' rank, or, for
    teachers smaller than the smallest of them, successive halvings of the teachers' rank (at most five)."""
    dims = [d for d in PAPER_DIMS if d < teacher_rank]
    if not dims:
        dims = [teacher_rank >> k for k in range(1, 6) if teacher_rank >> k >= 1]
    return dims


def resolve_variants(cfg: Config, ablation: str | None = None) -> list[str]:
    """``distill.variants`` plus the variants of an ablation table, without duplicates."""
    names = list(cfg.distill.variants)
    if ablation:
        if ablation not in ABLATIONS:
            raise ConfigError(f"--ablation {ablation}: choose one of {', '.join(ABLATIONS)}")
        for v in ABLATIONS[ablation]:
            if "{m}" in v:
                names += [v.format(m=m) for m in cfg.modalities]
            elif "{d}" in v:
                names += [v.format(d=d) for d in student_dims(cfg.model.rank)]
            else:
                names.append(v)
    out = []
    for n in names:
        if n not in out:
            if n not in EVAL_BASELINES:
                variant_overrides(n)
            out.append(n)
    return out


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
            "stopped_early": state.stopped_early, "train_s": round(state.train_seconds, 3),
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
    # Everything is validated before the run directory is touched: an earlier run is replaced (--force) or
    # extended (--resume), and config.yaml rewritten, only once the configuration and every input passed.
    check_run_dir(out, resume, force)
    ds = load_dataset(cfg)
    warnings_ = dataset_warnings(ds)
    variants = resolve_variants(cfg, ablation)
    teachers = tables = feature_info = None
    if teachers_from is not None:
        teachers = _load_teachers_for(cfg, ds, teachers_from)
    else:
        tables, feature_info = build_features(ds, cfg, progress)
    if resume:
        check_resume_config(out, cfg)
    lock = RunLock(out).acquire()
    try:
        prepare_run_dir(out, resume, force)
        for w in warnings_:
            log.warning("dataset %s: %s", ds.name, w)
        log.info("%s", describe_plan(cfg, ds, variants, stages, teachers_from))
        (out / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
        if teachers is not None:
            return _distill_only(cfg, ds, out, warnings_, teachers, teachers_from, resume, progress, variants)
        return _run_stages(cfg, ds, out, warnings_, tables, feature_info, resume, progress, stages, variants)
    finally:
        lock.release()


def describe_plan(cfg: Config, ds: KGDataset, variants: list[str], stages: str = "all",
                  teachers_from: str | Path | None = None) -> str:
    """One line saying what a run will train, so a user sees the budget before it is spent (each trainer then
    logs its time per epoch, measured on its first batches)."""
    queries = 2 * (len(ds.train) - round(cfg.distill.holdout * len(ds.train)))  # the teachers' share of train
    batches = -(-queries // cfg.train.batch_size)
    t = cfg.train
    parts = []
    if teachers_from is None:
        parts.append(f"teachers {'+'.join(cfg.modalities)} rank {cfg.model.rank}, up to {t.epochs} epochs of "
                     f"{batches:,} batches ({queries:,} queries)"
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
                     f"{cfg.distill.student_rank or cfg.model.rank}, {cfg.distill.epochs or t.epochs} epochs each")
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
    if stages == "all":
        d_models, distill_info = distill_stage(frozen, ds, cfg, out, trainer.device, resume, progress, variants)
        models = {**{k: v for k, v in d_models.items() if k == "student"}, **models,
                  **{k: v for k, v in d_models.items() if k != "student"}}
    results: dict[str, Any] = {
        "dataset": ds.summary(),
        "dataset_warnings": warnings_,
        "valid_split": {"mode": cfg.data.valid, "dropped": ds.extras.get("valid_dropped", 0)},
        "modalities": list(cfg.modalities),
        "features": feature_info,
        "models": models,
        "diagnostics": {"teacher_oracle": oracle},
        "ensembles": ens_info,
        "selection": {"metric": f"valid {cfg.train.teacher_selection} {cfg.train.selection_policy} "
                                f"{cfg.train.selection_metric}",
                      "best_epoch": state.best_epoch or state.epoch, "epochs_run": state.epoch,
                      "stopped_early": state.stopped_early},
        "parameters": {"teachers": trainer.num_parameters(),
                       "teachers_formula": trainer.model.parameter_count(
                           ds.num_entities, 2 * ds.num_relations, cfg.model.rank, [t.dim for t in tables.values()])},
        "timing": {"pretrain_s": round(state.train_seconds, 3), "pretrain_wall_s": round(pretrain_s, 3),
                   "pretrain_epoch_s": round(state.train_seconds / max(len(state.epoch_seconds), 1), 3),
                   "distill_s": None, "distill_epoch_s": None},
        "versions": {"dsom": __version__, "torch": torch.__version__},
        "device": str(trainer.device),
        "precision": {"train": trainer.precision, "eval": cfg.eval.precision},
    }
    _add_distill(results, distill_info)
    write_json_atomic(out / "results.json", results)
    trainer.tracker.end_run(True)
    _write_report(out, results)
    log_final(out, cfg, results)  # results and report to the experiment trackers, which end their runs
    return out, results


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

    lock = RunLock(out).acquire()  # the main run's results.json is rewritten: no other writer meanwhile
    try:
        write_json_atomic(out / "results.json", results)
        _write_report(out, results)
    finally:
        lock.release()
    return out, results


def _add_distill(results: dict[str, Any], info: dict[str, Any]) -> None:
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


def _write_report(out: Path, results: dict[str, Any]) -> None:
    try:
        write_report(out, results)
    except Exception as exc:  # noqa: BLE001 - a report must never fail a finished run
        log.warning("could not write the report: %s", exc)


def _load_teachers_for(cfg: Config, ds: KGDataset, teachers_from: str | Path) -> tuple[Any, torch.device]:
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
    d_models, info = distill_stage(frozen, ds, cfg, out, device, resume, progress, variants)
    results: dict[str, Any] = {
        "dataset": ds.summary(), "dataset_warnings": warnings_,
        "valid_split": {"mode": cfg.data.valid, "dropped": ds.extras.get("valid_dropped", 0)},
        "modalities": list(frozen.modalities), "teachers_from": str(teachers_from),
        "models": {**{k: v for k, v in d_models.items() if k == "student"}, **models,
                   **{k: v for k, v in d_models.items() if k != "student"}},
        "parameters": {},
        "timing": {"pretrain_s": None, "pretrain_epoch_s": None, "distill_s": None, "distill_epoch_s": None},
        "versions": {"dsom": __version__, "torch": torch.__version__}, "device": str(device),
    }
    _add_distill(results, info)
    write_json_atomic(out / "results.json", results)
    _write_report(out, results)
    log_final(out, cfg, results)
    return out, results
