"""Result tracking: ``metrics.jsonl``, one JSON object per logged step or epoch (DESIGN §5), always; and the
experiment trackers of ``track.trackers`` (MLflow, TensorBoard, Weights & Biases), which get the same records.

Each external tracker is imported only when chosen; a missing package is a one-line error naming the extra
(``pip install 'dsom[track]'``). See docs/usage.md, "Tracking experiments".
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsom import __version__, distributed
from dsom.errors import ConfigError, DsomError

if TYPE_CHECKING:
    from dsom.config import Config

log = logging.getLogger(__name__)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class JsonlTracker:
    """Appends records to ``metrics.jsonl``; ``truncate_after`` supports resuming at an epoch boundary."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log_params(self, params: dict[str, Any]) -> None:
        self.log({"event": "params", **params})

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None, **context: Any) -> None:
        self.log({**context, **({"step": step} if step is not None else {}), **metrics})

    def log(self, record: dict[str, Any]) -> None:
        if not distributed.is_main():  # under torchrun rank 0 logs (the records hold values reduced over processes)
            return
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(_clean(record)) + "\n")

    def truncate_after(self, stage: str, epoch: int) -> None:
        """Drop records of ``stage`` with an epoch later than ``epoch`` (work redone after a resume)."""
        if not distributed.is_main() or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by an interruption
            if rec.get("stage") == stage and isinstance(rec.get("epoch"), int) and rec["epoch"] > epoch:
                continue
            kept.append(line)
        self.path.write_text("".join(x + "\n" for x in kept), encoding="utf-8")

    def end_run(self, success: bool = True) -> None:
        self.log({"event": "end", "success": success})

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        return out


# --------------------------------------------------------------------------------------- experiment trackers
#: tracker name -> (module it needs, how to install it); 'jsonl' (metrics.jsonl) needs nothing and is always on
PACKAGES: dict[str, tuple[str, str]] = {"mlflow": ("mlflow", "pip install 'dsom[track]'"),
                                        "tensorboard": ("tensorboard", "pip install 'dsom[track]'"),
                                        "wandb": ("wandb", "pip install wandb")}
TRACKERS = ("jsonl", *PACKAGES)
STATE_FILE = "tracking.json"  # in the run directory: the external runs a resumed run continues
_KEYS = ("event", "stage", "epoch", "step")  # what a record says about itself, not a metric


def check_trackers(names: list[str]) -> None:
    """Every name known and its package importable: a one-line :class:`DsomError` otherwise (before any run)."""
    for n in names:
        if n not in TRACKERS:
            raise ConfigError(f"config key 'track.trackers': {n!r} is not one of {', '.join(TRACKERS)}; e.g. "
                              "--tracker mlflow,tensorboard")
    for n in names:
        if n in PACKAGES and importlib.util.find_spec(PACKAGES[n][0]) is None:
            raise DsomError(_missing(n))


def _missing(name: str) -> str:
    module, install = PACKAGES[name]
    return f"--tracker {name} needs the {module} package, which is not installed: {install}"


def require(name: str) -> Any:
    """Import the package of tracker ``name`` or raise a one-line :class:`DsomError` naming the extra."""
    try:
        return importlib.import_module(PACKAGES[name][0])
    except ImportError:
        raise DsomError(_missing(name)) from None


def flatten(tree: dict[str, Any], sep: str = "/", prefix: str = "") -> dict[str, float]:
    """The finite numeric leaves of a nested record as ``{'valid/realistic/mrr': 0.3}`` (booleans, strings,
    lists and non-finite numbers left out)."""
    out: dict[str, float] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, sep, key + sep))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[key] = float(v)
    return out


def flatten_params(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Every leaf of a nested configuration as a string under its dotted key (lists as JSON)."""
    out: dict[str, str] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten_params(v, key + "."))
        else:
            out[key] = v if isinstance(v, str) else json.dumps(v)
    return out


def metric_name(stage: str, key: str) -> str:
    """``('distill:policy', 'policy_entropy')`` -> ``'distill/policy/policy_entropy'``."""
    return f"{stage.replace(':', '/')}/{key}" if stage else key


def read_state(run_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((run_dir / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_state(run_dir: Path, name: str, entry: dict[str, Any]) -> None:
    state = read_state(run_dir)
    state[name] = entry
    tmp = run_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, run_dir / STATE_FILE)


class ExternalTracker:
    """Base of the external trackers: turns ``metrics.jsonl`` records into named metrics with a step.

    Epoch records give ``<stage>/<key>`` at step ``epoch`` (``stage`` ``distill:policy`` becomes
    ``distill/policy``); per-batch records (they carry ``step``, the batch of the epoch) give ``<stage>/<key>`` at
    the global batch ``(epoch - 1) * batches + step``. They are buffered until the epoch's record, so that the
    batches of an epoch are known and sent together."""

    name = ""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self._batches: list[tuple[str, int, int, dict[str, float]]] = []

    # the interface of JsonlTracker ------------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        stage = str(params.get("stage", self.stage))
        self.write_params({f"{stage}.{k}": str(v) for k, v in params.items() if k != "stage"})

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None, **context: Any) -> None:
        self.log({**context, **({"step": step} if step is not None else {}), **metrics})

    def log(self, record: dict[str, Any]) -> None:
        if "event" in record:
            return  # parameters arrive through log_params; 'end' is end_run
        values = flatten({k: v for k, v in record.items() if k not in _KEYS})
        if not values:
            return
        stage, epoch, step = str(record.get("stage", self.stage)), record.get("epoch"), record.get("step")
        if isinstance(epoch, int) and isinstance(step, int):
            self._batches.append((stage, epoch, step, values))
            return
        self.flush()
        at = epoch if isinstance(epoch, int) else step if isinstance(step, int) else 0
        self.write_metrics({metric_name(stage, k): v for k, v in values.items()}, at, stage)

    def end_run(self, success: bool = True) -> None:
        self.flush()
        self.close(success)

    # what a tracker implements ----------------------------------------------------------------------------
    def write_params(self, params: dict[str, str]) -> None:
        raise NotImplementedError

    def write_metrics(self, metrics: dict[str, float], step: int, stage: str, kind: str = "epoch") -> None:
        raise NotImplementedError

    def write_results(self, results: dict[str, Any], files: list[Path], config: dict[str, str]) -> None:
        """The final ``results.json`` numbers and the run's files (results.json, config.yaml, report)."""
        raise NotImplementedError

    def close(self, success: bool) -> None:
        """End of a stage: flush and release what it holds."""

    def finish(self) -> None:
        """End of the whole run, after :meth:`write_results`."""

    # ------------------------------------------------------------------------------------------------------
    def flush(self) -> None:
        if not self._batches:
            return
        per_epoch: dict[tuple[str, int], int] = {}
        for stage, epoch, step, _ in self._batches:
            per_epoch[stage, epoch] = max(per_epoch.get((stage, epoch), 0), step + 1)
        grouped: dict[tuple[str, int], dict[str, float]] = {}
        for stage, epoch, step, values in self._batches:
            at = (epoch - 1) * per_epoch[stage, epoch] + step
            for k, v in values.items():
                grouped.setdefault((stage, at), {})[metric_name(stage, k)] = v
        self._batches = []
        for (stage, at), metrics in grouped.items():
            self.write_metrics(metrics, at, stage, kind="batches")


class MlflowTracker(ExternalTracker):
    """One MLflow run per run directory (its id in ``tracking.json``): every stage and the final results log to it.

    The store is ``track.mlflow_uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<run_dir>/mlflow.db`` with
    artifacts in ``<run_dir>/mlartifacts``. Names MLflow refuses (``hits@10``) get ``_`` for the odd characters."""

    name = "mlflow"

    def __init__(self, run_dir: Path, cfg: Config, stage: str, config: dict[str, str], continuing: bool) -> None:
        super().__init__(stage)
        require("mlflow")
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        for noisy in ("alembic", "mlflow.store.db.utils"):  # schema creation talks at INFO
            logging.getLogger(noisy).setLevel(logging.WARNING)
        # MLflow's SQL store uses a loader strategy SQLAlchemy 2.1 deprecates: not the user's concern
        warnings.filterwarnings("ignore", message=r"The ``noload`` loader strategy is deprecated")
        self.uri = cfg.track.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI", "") or \
            f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        try:
            self.client = MlflowClient(tracking_uri=self.uri)
            self.run_id = self._reopen(run_dir, config) if continuing else None
            if self.run_id is None:
                self.run_id = self._create(run_dir, cfg, config)
        except MlflowException as exc:
            first = str(exc.message if hasattr(exc, "message") else exc).strip().splitlines()[0]
            raise DsomError(f"mlflow ({self.uri}): {first}") from None

    @staticmethod
    def key(name: str) -> str:
        return re.sub(r"[^/\w.\- ]", "_", name)

    def _reopen(self, run_dir: Path, config: dict[str, str]) -> str | None:
        from mlflow.exceptions import MlflowException

        state = read_state(run_dir).get("mlflow") or {}
        if state.get("uri") != self.uri or not state.get("run_id"):
            return None
        try:
            run = self.client.get_run(state["run_id"])
        except MlflowException:
            log.warning("mlflow: run %s (from %s) not found in %s; starting a new one", state["run_id"],
                        run_dir / STATE_FILE, self.uri)
            return None
        self.run_id = run.info.run_id
        if run.info.status != "RUNNING":
            self.client.update_run(run.info.run_id, status="RUNNING")
        old = run.data.params
        changed = {self.key(f"resumed.{k}"): v[:5000] for k, v in config.items() if self.key(k) in old
                   and old[self.key(k)] != v[:5000]}
        new = {k: v for k, v in config.items() if self.key(k) not in old}
        self.write_params(new)
        self._batch(tags=changed)
        return run.info.run_id

    def _create(self, run_dir: Path, cfg: Config, config: dict[str, str]) -> str:
        from mlflow.exceptions import MlflowException

        name = cfg.track.experiment
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            where = None
            if self.uri.startswith("sqlite:///"):  # artifacts beside a local database, never in the working folder
                where = (Path(self.uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
            try:
                exp_id = self.client.create_experiment(name, artifact_location=where)
            except MlflowException:  # created meanwhile by another process
                found = self.client.get_experiment_by_name(name)
                if found is None:
                    raise
                exp_id = found.experiment_id
        else:
            if exp.lifecycle_stage == "deleted":
                raise DsomError(f"mlflow: experiment {name!r} is deleted in {self.uri}; restore it or choose another "
                                "with --set track.experiment=NAME")
            exp_id = exp.experiment_id
        run = self.client.create_run(exp_id, run_name=run_dir.resolve().name, tags={
            "dsom.run_dir": str(run_dir.resolve()), "dsom.version": __version__,
            "dsom.dataset": str(cfg.data.dataset)})
        write_state(run_dir, "mlflow", {"uri": self.uri, "experiment_id": exp_id, "run_id": run.info.run_id})
        self.run_id = run.info.run_id
        self.write_params(config)
        return run.info.run_id

    def _batch(self, metrics: Any = (), params: dict[str, str] | None = None, tags: dict[str, str] | None = None,
               ) -> None:
        from mlflow.entities import Param, RunTag

        metrics = list(metrics)
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000], synchronous=True)
        for items, cls in ((params or {}, Param), (tags or {}, RunTag)):
            pairs = [cls(k, v) for k, v in items.items()]
            for i in range(0, len(pairs), 100):
                chunk = pairs[i:i + 100]
                self.client.log_batch(self.run_id, params=chunk if cls is Param else [],
                                      tags=chunk if cls is RunTag else [], synchronous=True)

    def write_params(self, params: dict[str, str]) -> None:
        self._batch(params={self.key(k): v[:5000] for k, v in params.items()})

    def write_metrics(self, metrics: dict[str, float], step: int, stage: str, kind: str = "epoch") -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._batch([Metric(self.key(k), v, now, step) for k, v in metrics.items()])

    def write_results(self, results: dict[str, Any], files: list[Path], config: dict[str, str]) -> None:
        self.write_metrics({f"results/{k}": v for k, v in flatten(results).items()}, 0, "results")
        stages = "distill" if "teachers_from" in results else "pretrain+distill" if "distill" in results else "pretrain"
        tags = {"dsom.stages": stages}
        if "teachers_from" in results:  # dsom distill: under the teachers' run when it was tracked here too
            tags["dsom.teachers_from"] = str(results["teachers_from"])
            for d in (Path(results["teachers_from"]), *Path(results["teachers_from"]).parents[:3]):
                st = read_state(d).get("mlflow") or {}
                if st.get("uri") == self.uri and st.get("run_id"):
                    tags["mlflow.parentRunId"] = st["run_id"]
                    break
        self._batch(tags=tags)
        for f in files:
            self.client.log_artifact(self.run_id, str(f), artifact_path=f.parent.name if f.parent.name == "report"
                                     else None)

    def finish(self) -> None:
        self.client.set_terminated(self.run_id, "FINISHED")


class TensorboardTracker(ExternalTracker):
    """Event files under ``<run_dir>/tensorboard``: one TensorBoard run per stage (``pretrain``, ``distill``,
    ``distill/policy``, ``distill/<variant>``), per-batch values in ``<stage>/batches``, and ``results``."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, stage: str, continuing: bool) -> None:
        super().__init__(stage)
        require("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self._cls = SummaryWriter
        self.root = run_dir / "tensorboard"
        if not continuing and self.root.is_dir():  # a new run (--force): the earlier run's events would mix in
            shutil.rmtree(self.root)
        self._writers: dict[str, Any] = {}

    def _writer(self, folder: str, first_step: int) -> Any:
        if folder not in self._writers:
            # purge_step: a resumed run drops what the earlier event files hold from this step on (redone epochs)
            self._writers[folder] = self._cls(str(self.root / folder), purge_step=first_step)
        return self._writers[folder]

    def write_params(self, params: dict[str, str]) -> None:
        if params:
            stage = next(iter(params)).split(".", 1)[0]
            text = "\n".join(f"    {k}: {v}" for k, v in params.items())
            self._writer(stage.replace(":", "/"), 0).add_text("params", text, 0)

    def write_metrics(self, metrics: dict[str, float], step: int, stage: str, kind: str = "epoch") -> None:
        folder = stage.replace(":", "/") + ("/batches" if kind == "batches" else "")
        w = self._writer(folder, step)
        prefix = metric_name(stage, "")
        for k, v in metrics.items():
            w.add_scalar(k[len(prefix):] if k.startswith(prefix) else k, v, step)

    def write_results(self, results: dict[str, Any], files: list[Path], config: dict[str, str]) -> None:
        w = self._writer("results", 0)
        for k, v in flatten(results).items():
            w.add_scalar(k, v, 0)
        w.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()), 0)
        pngs = [f for f in files if f.suffix == ".png"]
        if pngs:
            try:
                import numpy as np
                from PIL import Image
            except ImportError:
                return
            for f in pngs:
                with Image.open(f) as im:
                    w.add_image(f"report/{f.stem}", np.asarray(im.convert("RGB")), 0, dataformats="HWC")

    def close(self, success: bool) -> None:
        for w in self._writers.values():
            w.close()
        self._writers = {}


_WANDB_RUNS: dict[str, Any] = {}  # run directory -> the W&B run of this process (one per run directory)


class WandbTracker(ExternalTracker):
    """One W&B run per run directory (its id in ``tracking.json``), offline unless ``track.wandb_mode`` or
    ``$WANDB_MODE`` says otherwise; files under ``<run_dir>/wandb``. Each stage plots against its own step."""

    name = "wandb"

    def __init__(self, run_dir: Path, cfg: Config, stage: str, config: dict[str, str], continuing: bool) -> None:
        super().__init__(stage)
        wandb = require("wandb")
        key = str(run_dir.resolve())
        self.run = _WANDB_RUNS.get(key)
        if self.run is None:
            state = (read_state(run_dir).get("wandb") or {}) if continuing else {}
            run_id = state.get("id") or uuid.uuid4().hex[:12]
            mode = cfg.track.wandb_mode if cfg.track.wandb_mode != "auto" else \
                os.environ.get("WANDB_MODE", "") or "offline"
            self.run = wandb.init(project=cfg.track.experiment, name=run_dir.resolve().name, id=run_id,
                                  resume="allow", dir=str(run_dir), mode=mode, config=config)
            write_state(run_dir, "wandb", {"id": run_id, "project": cfg.track.experiment, "mode": mode})
            _WANDB_RUNS[key] = self.run
        self._key = key
        self._defined: set[str] = set()

    def write_params(self, params: dict[str, str]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def write_metrics(self, metrics: dict[str, float], step: int, stage: str, kind: str = "epoch") -> None:
        axis = f"{metric_name(stage, kind)}"
        for k in metrics:
            if k not in self._defined:
                self.run.define_metric(k, step_metric=axis)
                self._defined.add(k)
        self.run.log({**metrics, axis: step})

    def write_results(self, results: dict[str, Any], files: list[Path], config: dict[str, str]) -> None:
        self.run.summary.update({f"results/{k}": v for k, v in flatten(results).items()})
        for f in files:
            self.run.save(str(f), base_path=str(f.parent.parent if f.parent.name == "report" else f.parent),
                          policy="now")

    def finish(self) -> None:
        self.run.finish()
        _WANDB_RUNS.pop(self._key, None)


class Trackers:
    """What a trainer logs to: ``metrics.jsonl`` plus the external trackers of ``track.trackers`` (the same four
    methods as :class:`JsonlTracker`, fanned out). An external tracker that fails mid-run is reported once and
    skipped for that call: ``metrics.jsonl`` stays complete and the training goes on."""

    def __init__(self, jsonl: JsonlTracker, external: list[ExternalTracker]) -> None:
        self.jsonl = jsonl
        self.external = external
        self.path = jsonl.path
        self._warned: set[str] = set()

    def _each(self, method: str, *args: Any) -> None:
        for t in self.external:
            try:
                getattr(t, method)(*args)
            except Exception as exc:  # noqa: BLE001 - a tracker must not stop a training run
                if t.name not in self._warned:
                    self._warned.add(t.name)
                    log.warning("%s: %s failed (%s: %s); metrics.jsonl has everything, training goes on", t.name,
                                method, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")

    def log_params(self, params: dict[str, Any]) -> None:
        self.jsonl.log_params(params)
        self._each("log_params", params)

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None, **context: Any) -> None:
        self.log({**context, **({"step": step} if step is not None else {}), **metrics})

    def log(self, record: dict[str, Any]) -> None:
        self.jsonl.log(record)
        self._each("log", _clean(record))

    def end_run(self, success: bool = True) -> None:
        self.jsonl.end_run(success)
        self._each("end_run", success)

    def truncate_after(self, stage: str, epoch: int) -> None:
        self.jsonl.truncate_after(stage, epoch)

    def records(self) -> list[dict[str, Any]]:
        return self.jsonl.records()


def _config_params(run_dir: Path, cfg: Config) -> dict[str, str]:
    """The expanded configuration as written to ``config.yaml`` (the trainer's own when there is none)."""
    try:
        import yaml

        data = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = None
    return flatten_params(data if isinstance(data, dict) else cfg.to_dict())


def make_tracker(run_dir: str | Path, cfg: Config, stage: str) -> Trackers:
    """The tracker of a trainer in ``run_dir``: ``metrics.jsonl`` and, in the main process only (rank 0 under
    torchrun), the external trackers of ``track.trackers``. They continue the runs recorded in ``tracking.json``
    while ``metrics.jsonl`` exists (later stages, ``--resume``); a run directory without it (new, or cleared by
    ``--force``) starts new external runs."""
    run_dir = Path(run_dir)
    jsonl = JsonlTracker(run_dir / "metrics.jsonl")
    names = [n for n in dict.fromkeys(cfg.track.trackers) if n != "jsonl"]
    if not names or not distributed.is_main():
        return Trackers(jsonl, [])
    check_trackers(names)
    continuing = jsonl.path.exists()
    config = _config_params(run_dir, cfg)
    return Trackers(jsonl, [EXTERNAL[n](run_dir, cfg, stage, config, continuing) for n in names])


#: the external trackers by name: each builds its tracker from ``(run_dir, cfg, stage, config params, continuing)``
EXTERNAL: dict[str, Callable[[Path, Config, str, dict[str, str], bool], ExternalTracker]] = {
    "mlflow": MlflowTracker,
    "tensorboard": lambda run_dir, cfg, stage, config, continuing: TensorboardTracker(run_dir, stage, continuing),
    "wandb": WandbTracker,
}


def log_final(run_dir: str | Path, cfg: Config, results: dict[str, Any]) -> None:
    """After ``results.json`` and the report are written: their numbers and files to the external trackers, which
    then end their runs. Never fails a finished run (a failure is a warning)."""
    run_dir = Path(run_dir)
    try:
        tr = make_tracker(run_dir, cfg, "results")
        files = [run_dir / "results.json", run_dir / "config.yaml",
                 *sorted((run_dir / "report").glob("*.png")), run_dir / "report" / "summary.md"]
        files = [f for f in files if f.is_file()]
        config = _config_params(run_dir, cfg)
        for t in tr.external:
            try:
                t.write_results(results, files, config)
                t.close(True)
                t.finish()
            except Exception as exc:  # noqa: BLE001 - results.json is written; the run has finished
                log.warning("%s: could not log the results (%s: %s)", t.name, type(exc).__name__, exc)
    except DsomError as exc:
        log.warning("trackers: could not log the results (%s)", exc)
