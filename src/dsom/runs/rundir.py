"""Run directories (DESIGN §5): where a run goes, whether it may start or resume there, atomic JSON writes.

A run directory holds ``config.yaml``, ``metrics.jsonl``, ``checkpoints/`` and, once everything has
succeeded, ``results.json`` (written atomically last, so a failed run never leaves a results file that
does not match its checkpoints) and ``report/``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from dsom import distributed
from dsom.config import Config, _all_keys, apply_dict, get_value, load_yaml
from dsom.errors import ConfigError, DsomError
from dsom.report import write_report

log = logging.getLogger("dsom")


def default_output(cfg: Config) -> Path:
    name = Path(cfg.data.dataset).name or "dataset"
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


# Keys a resumed run may change: budgets, evaluation and hardware settings, never what the checkpoints hold.
RESUME_MAY_CHANGE = ("train.epochs", "train.max_minutes", "train.patience", "train.device", "train.threads",
                     "train.compile", "train.block_mb", "train.checkpoint_every", "distill.epochs", "distill.variants", "eval.",
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
    if not distributed.is_main():  # under torchrun rank 0 alone writes the run directory
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def write_run_report(out: Path, results: dict[str, Any]) -> None:
    if not distributed.is_main():
        return
    try:
        write_report(out, results)
    except Exception as exc:  # noqa: BLE001 - a report must never fail a finished run
        log.warning("could not write the report: %s", exc)
