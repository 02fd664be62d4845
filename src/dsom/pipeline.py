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
from dsom.train.loop import ComplExTrainer

log = logging.getLogger("dsom")

SUPPORTED_MODALITIES = ("structure",)


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
    unknown = [m for m in mods if m not in SUPPORTED_MODALITIES]
    if unknown:
        raise ConfigError(f"modalities: {', '.join(unknown)} not available in this version "
                          f"(supported: {', '.join(SUPPORTED_MODALITIES)}); feature teachers come with stage 1")
    for key in ("model.rank", "train.epochs", "train.batch_size", "eval.batch_size"):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) <= 0:
            raise ConfigError(f"config key '{key}' must be positive")
    if cfg.train.lr <= 0:
        raise ConfigError("config key 'train.lr' must be positive")


def load_dataset(cfg: Config) -> KGDataset:
    return registry.load(cfg.data.dataset, cfg.data.layout, cfg.data.synthetic)


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


def model_results(scorer: Any, ds: KGDataset, cfg: Config, device: torch.device, progress: bool) -> dict[str, Any]:
    """``{split: {policy: metrics}, split_head: ..., split_tail: ...}`` for the configured splits."""
    out: dict[str, Any] = {}
    for split in cfg.eval.splits:
        if len(ds.splits[split]) == 0:
            continue
        m = evaluate(scorer, ds, split, batch_size=cfg.eval.batch_size, memory_budget_mb=cfg.eval.memory_budget_mb,
                     precision=cfg.eval.precision, device=device, progress=progress)
        out[split] = {p: m[p] for p in ("realistic", "pessimistic", "optimistic")}
        out[f"{split}_head"] = m["head"]
        out[f"{split}_tail"] = m["tail"]
    return out


def run(cfg: Config, output: str | Path | None = None, resume: bool = False, force: bool = False,
        progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Train the teachers (structure only, for now), evaluate, and write ``results.json``."""
    out = Path(output) if output else default_output(cfg)
    prepare_run_dir(out, resume, force)
    ds = load_dataset(cfg)
    warnings_ = dataset_warnings(ds)
    for w in warnings_:
        log.warning("dataset %s: %s", ds.name, w)
    (out / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    t0 = time.perf_counter()
    trainer = ComplExTrainer(ds, cfg, out, stage="pretrain", progress=progress)
    state = trainer.fit(resume=resume)
    pretrain_s = time.perf_counter() - t0
    trainer.model.eval()
    results: dict[str, Any] = {
        "dataset": ds.summary(),
        "dataset_warnings": warnings_,
        "modalities": list(cfg.modalities),
        "models": {"teacher/structure": model_results(trainer.model, ds, cfg, trainer.device, progress)},
        "selection": {"metric": f"valid {cfg.train.selection_policy} {cfg.train.selection_metric}",
                      "best_epoch": state.best_epoch or state.epoch, "epochs_run": state.epoch,
                      "stopped_early": state.stopped_early},
        "parameters": {"teacher/structure": trainer.model.num_parameters()},
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
