"""The ``dsom run`` / ``dsom pretrain`` pipeline and its run directory (DESIGN §5).

A run directory holds ``config.yaml``, ``metrics.jsonl``, ``checkpoints/`` and, once everything has
succeeded, ``results.json`` (written atomically last, so a failed run never leaves a results file that
does not match its checkpoints).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from dsom import __version__
from dsom.config import Config, apply_dict, load_yaml
from dsom.data import registry
from dsom.data.graph import KGDataset
from dsom.errors import ConfigError, DsomError
from dsom.evaluate import evaluate

log = logging.getLogger("dsom")

BUILT_IN_MODALITIES = ("structure", "text", "image", "numeric")


def build_config(dataset: str | None = None, config_file: str | None = None,
                 overrides: list[tuple[str, Any]] | None = None) -> Config:
    """Defaults < dataset preset < YAML file < overrides (see :mod:`dsom.config`)."""
    cfg = Config()
    file_values = load_yaml(config_file) if config_file else {}
    name = dataset or file_values.get("data", {}).get("dataset") or cfg.data.dataset
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
    from dsom.features.build import build_modality

    tables: dict[str, Any] = {}
    info: dict[str, Any] = {}
    for m in cfg.modalities:
        if m == "structure":
            continue
        if m in ds.modalities and m not in cfg.features.files:
            from dsom.features.modality import apply_missing_rate

            table, seconds, cached = ds.modalities[m], 0.0, None
            if cfg.features.missing_rate > 0:
                table = apply_missing_rate(table, cfg.features.missing_rate, cfg.features.missing_seed,
                                           cfg.features.imputation)
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
    from dsom.data.info import dataset_info

    try:
        return list(dataset_info(ds).get("warnings", []))
    except Exception as exc:  # noqa: BLE001 - statistics must never stop a run
        return [f"could not compute dataset statistics: {exc}"]


def default_output(cfg: Config) -> Path:
    name = Path(cfg.data.dataset).name or "dataset"
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare_run_dir(out: Path, resume: bool, force: bool) -> None:
    """Refuse to clobber an earlier run unless asked to."""
    has_results = (out / "results.json").exists()
    has_ckpt = (out / "checkpoints").exists()
    if resume:
        if not (out / "config.yaml").exists():
            raise DsomError(f"--resume: {out} holds no run to resume (config.yaml missing)")
        return
    if (has_results or has_ckpt) and not force:
        what = "a finished run" if has_results else "an unfinished run (use --resume to continue it)"
        raise DsomError(f"output directory {out} already holds {what}; choose another -o or pass --force")
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
        out[split] = {p: m[p] for p in ("realistic", "pessimistic", "optimistic")}
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


def teacher_results(trainer: Any, ds: KGDataset, cfg: Config) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every teacher and Teacher Avg. on the configured splits (one ranking pass per split), plus the
    oracle as a diagnostic."""
    models: dict[str, dict[str, Any]] = {}
    oracle: dict[str, Any] = {}
    for split in cfg.eval.splits:
        if len(ds.splits[split]) == 0:
            continue
        views = trainer.all_view_metrics(split)
        oracle[split] = views.pop("teacher_oracle")
        for key, m in views.items():
            models.setdefault(key, {})[split] = m
    return {k: split_results(v) for k, v in models.items()}, oracle


def ensemble_results(frozen: Any, ds: KGDataset, cfg: Config, device: torch.device,
                     progress: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """MoSE-BI and MoSE-MI (SPEC §3), trained on valid; needs at least two teachers and valid triples."""
    from dsom.ensemble import WeightedTeachers, boosting_weights, train_meta_learner

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


def run(cfg: Config, output: str | Path | None = None, resume: bool = False, force: bool = False,
        progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Features -> teachers -> ensembles -> evaluation; writes ``results.json`` last."""
    from dsom.train.teachers import TeacherTrainer

    out = Path(output) if output else default_output(cfg)
    prepare_run_dir(out, resume, force)
    ds = load_dataset(cfg)
    warnings_ = dataset_warnings(ds)
    for w in warnings_:
        log.warning("dataset %s: %s", ds.name, w)
    (out / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    tables, feature_info = build_features(ds, cfg, progress)
    t0 = time.perf_counter()
    trainer = TeacherTrainer(ds, cfg, out, tables, progress=progress)
    state = trainer.fit(resume=resume)
    frozen = trainer.save_final()
    pretrain_s = time.perf_counter() - t0
    trainer.model.eval()
    models, oracle = teacher_results(trainer, ds, cfg)
    if "teacher_avg" not in cfg.ensemble.models:
        models.pop("teacher_avg", None)
    ens_models, ens_info = ensemble_results(frozen, ds, cfg, trainer.device, progress)
    models.update(ens_models)
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
    write_json_atomic(out / "results.json", results)
    trainer.tracker.end_run(True)
    return out, results
