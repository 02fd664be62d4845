"""``dsom tune``: hyper-parameter search for the distillation stage with Optuna, on held-out triples only.

The teachers are trained once (or taken from ``--teachers RUN``); every trial trains one DSoM student on them with
values sampled from a search space, validates it every ``train.valid_every`` epochs and reports the validation
metric to Optuna's median pruner, which stops unpromising trials early. The objective is the best validation value
of the student (``train.selection_metric`` under ``train.selection_policy``): test is never evaluated.

The study lives in ``OUT/study.db`` (SQLite), so an interrupted search continues where it stopped (trials that were
running when it was killed are marked failed and not counted). The best trial's full configuration is written to
``OUT/best.yaml``, which ``dsom run -c OUT/best.yaml`` accepts, with ``OUT/trials.tsv`` and, when matplotlib and
scikit-learn are installed, ``OUT/history.png`` and ``OUT/importance.png``.

A search space is a YAML mapping from config keys to distributions::

    distill.gamma: {type: float, low: 0.5, high: 4.0, log: true}
    distill.reward: {type: categorical, choices: [margin, binary]}
    distill.policy_hidden: {type: int, low: 32, high: 256, log: true}
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from dsom.config import Config, apply_dict, get_value, load_yaml
from dsom.distill.holdout import entity_reliability
from dsom.errors import ConfigError, DsomError
from dsom.runs import pipeline
from dsom.runs.setup import check_config, load_dataset
from dsom.train.student import StudentTrainer, student_config

log = logging.getLogger("dsom")

#: the default space: the distillation knobs the paper sets by hand (SPEC 5.7) and the policy's own
DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "distill.gamma": {"type": "float", "low": 0.5, "high": 4.0, "log": True},
    "distill.tau": {"type": "float", "low": 1.0, "high": 8.0, "log": True},
    "distill.alpha": {"type": "float", "low": 0.25, "high": 2.0, "log": True},
    "distill.beta": {"type": "float", "low": 0.25, "high": 2.0, "log": True},
    "distill.entropy": {"type": "float", "low": 1e-3, "high": 0.1, "log": True},
    "distill.policy_lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
}
KINDS = ("float", "int", "categorical")


def _require_optuna() -> Any:
    try:
        import optuna
    except ImportError as exc:
        raise DsomError("dsom tune needs Optuna: pip install optuna (it comes with the [pykeen] extra)") from exc
    return optuna


def load_space(path: str | Path | None, cfg: Config) -> dict[str, dict[str, Any]]:
    """The search space (``DEFAULT_SPACE`` without a file), checked against the config schema."""
    space = DEFAULT_SPACE if path is None else load_yaml(path)
    where = "the default space" if path is None else str(path)
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{where}: expected a mapping from config keys to distributions")
    for key, dist in space.items():
        try:
            get_value(cfg, key)
        except AttributeError:
            raise ConfigError(f"{where}: unknown config key '{key}' (see dsom config)") from None
        if not isinstance(dist, dict) or dist.get("type") not in KINDS:
            raise ConfigError(f"{where}: {key}: give {{type: float|int|categorical, ...}}")
        if dist["type"] == "categorical":
            if not isinstance(dist.get("choices"), list) or not dist["choices"]:
                raise ConfigError(f"{where}: {key}: a categorical distribution needs a non-empty 'choices' list")
        elif not all(isinstance(dist.get(b), (int, float)) for b in ("low", "high")) or dist["low"] >= dist["high"]:
            raise ConfigError(f"{where}: {key}: give numbers low < high")
        elif dist.get("log") and dist["low"] <= 0:
            raise ConfigError(f"{where}: {key}: a log distribution needs low > 0")
    return space


def sample(trial: Any, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, d in space.items():
        if d["type"] == "float":
            out[key] = trial.suggest_float(key, float(d["low"]), float(d["high"]), log=bool(d.get("log")))
        elif d["type"] == "int":
            out[key] = trial.suggest_int(key, int(d["low"]), int(d["high"]), log=bool(d.get("log")))
        else:
            out[key] = trial.suggest_categorical(key, d["choices"])
    return out


def tune(cfg: Config, out: str | Path, trials: int, space_file: str | Path | None = None,
         teachers_from: str | Path | None = None, seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Run (or continue) the search until ``trials`` trials finished (completed or pruned); returns a summary."""
    optuna = _require_optuna()
    out = Path(out)
    space = load_space(space_file, cfg)
    if cfg.train.valid_every < 1:
        raise ConfigError("dsom tune reports validation to the pruner: set train.valid_every >= 1")
    ds = load_dataset(cfg)
    if len(ds.valid) == 0:
        raise DsomError(f"dataset '{ds.name}' has no valid triples to tune on")
    out.mkdir(parents=True, exist_ok=True)
    if teachers_from is None:  # train the teachers once, resumably, in OUT/teachers
        teachers_from = out / "teachers"
        if not (Path(teachers_from) / "results.json").exists():
            pipeline.run(cfg, teachers_from, resume=(Path(teachers_from) / "config.yaml").exists(),
                         progress=progress, stages="pretrain")
    frozen, device = pipeline.load_teachers_for(cfg, ds, teachers_from)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="dsom", storage=f"sqlite:///{out / 'study.db'}", load_if_exists=True,
                                direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1))
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)  # killed earlier
        log.info("tune: trial %d was interrupted; marked failed", t.number)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)

    def objective(trial: Any) -> float:
        params = sample(trial, space)
        tcfg = Config()
        apply_dict(tcfg, cfg.to_dict())
        for key, value in params.items():
            apply_dict(tcfg, {key: value})
        check_config(tcfg)
        scfg = student_config(tcfg, {})
        rows, temperatures, _ = pipeline.selection_inputs(frozen, ds, scfg, device)
        stats = None
        if frozen.num_teachers > 1:
            stats = entity_reliability(frozen, torch.from_numpy(ds.queries("train")).to(device), ds.num_entities,
                                       temperatures).to(device)
        trainer = StudentTrainer(ds, scfg, out / f"trial-{trial.number}", frozen, progress=progress,
                                 reward_rows=rows, temperatures=temperatures if scfg.distill.calibrate else None,
                                 entity_stats=stats)

        def report(epoch: int, record: dict[str, Any]) -> None:
            if "selection_value" in record:
                trial.report(float(record["selection_value"]), epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned()

        trainer.epoch_hook = report
        state = trainer.fit()
        trial.set_user_attr("best_epoch", state.best_epoch)
        return float(state.best_value)

    done = len(study.get_trials(deepcopy=False, states=finished))
    if done < trials:
        study.optimize(objective, n_trials=trials - done, catch=())
    summary = _write_outputs(study, cfg, out, space, optuna)
    return summary


def _write_outputs(study: Any, cfg: Config, out: Path, space: dict[str, Any], optuna: Any) -> dict[str, Any]:
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise DsomError("no trial completed; nothing to report (see the trial folders' metrics.jsonl)")
    best = study.best_trial
    best_cfg = Config()
    apply_dict(best_cfg, cfg.to_dict())
    for key, value in best.params.items():
        apply_dict(best_cfg, {key: value})
    (out / "best.yaml").write_text(best_cfg.to_yaml(), encoding="utf-8")
    keys = list(space)
    lines = ["trial\tstate\tvalue\t" + "\t".join(keys)]
    for t in study.get_trials(deepcopy=False):
        value = "" if t.value is None else f"{t.value:.6f}"
        lines.append(f"{t.number}\t{t.state.name}\t{value}\t" + "\t".join(str(t.params.get(k, "")) for k in keys))
    (out / "trials.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _plots(study, out, optuna)
    return {"best_trial": best.number, "best_value": best.value, "best_params": best.params,
            "metric": f"valid {cfg.train.selection_policy} {cfg.train.selection_metric}",
            "trials": {s.name: len(study.get_trials(deepcopy=False, states=(s,))) for s in optuna.trial.TrialState}}


def _plots(study: Any, out: Path, optuna: Any) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization.matplotlib import plot_optimization_history, plot_param_importances
    except ImportError:
        log.info("tune: matplotlib not installed; no plots")
        return
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks its matplotlib backend experimental
        plot_optimization_history(study)
        plt.gcf().savefig(out / "history.png", dpi=100, bbox_inches="tight")
        plt.close("all")
        if len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))) >= 2:
            try:
                plot_param_importances(study)
                plt.gcf().savefig(out / "importance.png", dpi=100, bbox_inches="tight")
            except (ImportError, RuntimeError, ValueError) as exc:
                log.info("tune: no importance plot (%s)", exc)
            plt.close("all")


__all__ = ["DEFAULT_SPACE", "load_space", "tune"]
