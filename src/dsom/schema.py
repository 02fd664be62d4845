"""The typed shape of ``results.json`` (DESIGN §5), its reader, and the one walk over its metrics.

``results["models"][model][split][policy]`` is a :data:`Metrics` dict for every ``policy`` in
:data:`~dsom.ranks.TIE_POLICIES`; ``split`` is ``valid`` or ``test``, and ``valid_head``/``test_tail``... hold the
per-direction metrics. Everything else (timing, policy analysis, ensembles' logs) is optional.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypedDict

from dsom.errors import DsomError
from dsom.ranks import TIE_POLICIES

Metrics = TypedDict("Metrics", {"mrr": float, "mr": float, "hits@1": float, "hits@3": float, "hits@10": float})
METRIC_NAMES = ("mrr", "mr", "hits@1", "hits@3", "hits@10")
#: ``{policy: Metrics}`` for one split; a model's block maps split names to these
SplitMetrics = dict[str, Metrics]
ModelResults = dict[str, SplitMetrics]


class DatasetSummary(TypedDict):
    name: str
    entities: int
    relations: int
    train: int
    valid: int
    test: int


class Timing(TypedDict, total=False):
    pretrain_s: float | None
    pretrain_wall_s: float
    pretrain_epoch_s: float | None
    distill_s: float | None
    distill_epoch_s: float | None


class PolicySummary(TypedDict, total=False):
    actions: dict[str, float]  # arg-max action shares over the training queries
    per_relation: dict[str, dict[str, float]]
    planted_agreement: float
    planted_agreement_all_teachers: float
    planted_agreement_random: float
    planted_agreement_best_possible: float


class Results(TypedDict, total=False):
    """``results.json``. ``dataset`` and ``models`` are always there; the rest depends on the stages run."""

    dataset: DatasetSummary
    models: dict[str, ModelResults]
    dataset_warnings: list[str]
    valid_split: dict[str, Any]
    modalities: list[str]
    features: dict[str, Any]
    diagnostics: dict[str, Any]
    ensembles: dict[str, Any]
    selection: dict[str, Any]
    parameters: dict[str, Any]
    timing: Timing
    versions: dict[str, str]
    device: str
    precision: dict[str, str]
    batching: dict[str, str]  # stage 1's resolved train.batching ({"teachers": "pairs"}); each student's is in distill
    policy: PolicySummary
    distill: dict[str, Any]
    missing_study: dict[str, dict[str, SplitMetrics]]


def metric_rows(results: Results, splits: tuple[str, ...] = ("valid", "test")) -> Iterator[tuple[str, str, str, Metrics]]:
    """``(model, split, policy, metrics)`` for every model, the given splits in that order, every tie policy."""
    for model, block in results["models"].items():
        for split in splits:
            if split in block:
                for policy in TIE_POLICIES:
                    yield model, split, policy, block[split][policy]


def _problem(results: Any) -> str | None:
    if not isinstance(results, dict):
        return "the file is not a JSON object"
    if not isinstance(results.get("dataset"), dict) or not all(
            isinstance(results["dataset"].get(k), int) for k in ("entities", "relations", "train", "valid", "test")):
        return "'dataset' lacks the entity, relation and split counts"
    if not isinstance(results.get("models"), dict):
        return "'models' is missing or not an object"
    for name, block in results["models"].items():
        for split, by_policy in (block.items() if isinstance(block, dict) else [("?", None)]):
            ok = isinstance(by_policy, dict) and all(
                isinstance(by_policy.get(p), dict) and all(isinstance(by_policy[p].get(m), (int, float))
                                                           for m in METRIC_NAMES)
                for p in TIE_POLICIES)
            if not ok and not split.endswith(("_head", "_tail")):
                return f"models.{name}.{split} lacks realistic/pessimistic/optimistic metrics"
    return None


def read_results(path: str | Path) -> Results:
    """A run's ``results.json``, checked against the schema's required parts; a one-line :class:`DsomError`
    otherwise."""
    path = Path(path)
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DsomError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); rerun the run or restore the file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DsomError(f"{path}: cannot read ({exc})") from None
    problem = _problem(results)
    if problem:
        raise DsomError(f"{path}: not a dsom results file ({problem})")
    return results
