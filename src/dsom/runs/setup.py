"""Setting a run up: the configuration (defaults < method preset < dataset preset < file < overrides) checked
against the registries (modality sources, selectors, KD losses), the dataset and its feature tables.

The schema and the value checks that need nothing but the schema live in :mod:`dsom.config`, the bottom layer;
the checks here consult registries of :mod:`dsom.features` and :mod:`dsom.distill`, which import the schema, so
they sit one floor up.
"""

from __future__ import annotations

import logging
from typing import Any

from dsom.config import METHOD_PRESETS, Config, apply_dict, check_values, load_yaml
from dsom.data import registry
from dsom.data.graph import KGDataset
from dsom.data.info import dataset_info
from dsom.distill.kd import check_kd
from dsom.distill.selectors import check_selector
from dsom.errors import ConfigError
from dsom.features.build import SOURCES, build_modality, with_missing_rate
from dsom.train.loop import resolve_device
from dsom.train.tracker import check_trackers

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
    check_trackers(cfg.track.trackers)

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
