"""The student variant registry: named configuration changes trained beside the DSoM student, and the
paper's ablations (``--ablation``) as lists of them. A new variant is one line in :data:`STUDENT_VARIANTS`.
"""

from __future__ import annotations

from typing import Any

from dsom.config import METHOD_PRESETS, Config
from dsom.errors import ConfigError

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
