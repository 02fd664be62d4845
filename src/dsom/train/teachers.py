"""Stage 1: joint training of the modality-split ComplEx teachers (MoSE ``ComplExMDR``, SPEC §2.3–2.4).

Loss per batch: ``sum_m [CE_m + N3_m]`` with every teacher scored by one batched product. Validation
ranks every teacher and their mean-logit ensemble in one pass and selects on either MoSE's per-query
"oracle" (the minimum rank over teachers; an upper bound, SPEC §2.4) or the Teacher-Avg metric.
After training, the selected teachers are materialised once into ``checkpoints/teachers/final``
(tables ``X W / scale``, format ``dsom-teachers/1``) so later stages never recompute ``X W``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dsom.config import Config
from dsom.data.graph import KGDataset
from dsom.data.modality import ModalityTable
from dsom.data.pairs import group_pairs
from dsom.errors import DsomError
from dsom.evaluate import split_counts, split_metrics
from dsom.models.chunked import entity_chunk
from dsom.models.fused import complex_cross_entropy, fused_penalty
from dsom.models.teachers import TEACHERS_FORMAT, AllViews, FrozenTeachers, ModalityTeachers
from dsom.ranks import TIE_POLICIES, RankCounts, metrics_from_ranks, min_rank_counts
from dsom.train.checkpoint import check_teachers, read_checkpoint, write_checkpoint
from dsom.train.loop import BatchHook, StepLoss, Trainer

TRAIN_FORMAT = "dsom-teachers-train/1"


def view_metrics(counts: RankCounts, num_triples: int, modalities: list[str]) -> dict[str, dict[str, Any]]:
    """Metrics of every teacher, the Teacher Avg. and the oracle from ``(M + 1, n)`` counts of :class:`AllViews`."""
    M = len(modalities)
    per = [RankCounts(counts.greater[k], counts.equal[k]) for k in range(M + 1)]
    out = {f"teacher/{m}": split_metrics(per[k], num_triples) for k, m in enumerate(modalities)}
    out["teacher_avg"] = split_metrics(per[M], num_triples)
    out["teacher_oracle"] = {p: metrics_from_ranks(min_rank_counts(per[:M], p)) for p in TIE_POLICIES}
    return out


class TeacherTrainer(Trainer):
    """Trains :class:`ModalityTeachers` for ``cfg.modalities`` on the given feature tables."""

    checkpoint_format = TRAIN_FORMAT
    supports_pair_batching = True
    supports_cuda_graphs = True

    def __init__(self, dataset: KGDataset, cfg: Config, run_dir: str | Path, features: Mapping[str, ModalityTable],
                 progress: bool = True, batch_hook: BatchHook | None = None) -> None:
        missing = [m for m in cfg.modalities if m != "structure" and m not in features]
        if missing:
            raise ValueError(f"no feature table for modalities {missing}")
        self.features = {m: features[m] for m in cfg.modalities if m != "structure"}
        super().__init__(dataset, cfg, run_dir, stage="pretrain", progress=progress, batch_hook=batch_hook,
                         checkpoint_subdir="teachers")

    def build_model(self, generator: torch.Generator) -> ModalityTeachers:
        feats = {m: torch.from_numpy(t.features) for m, t in self.features.items()}
        return ModalityTeachers(self.ds.num_entities, 2 * self.ds.num_relations, self.cfg.model.rank, feats,
                                init_scale=self.cfg.model.init_scale, scale=self.cfg.model.teacher_scale,
                                generator=generator)

    def model_meta(self) -> dict[str, Any]:
        m = self.model
        return {"type": "modality-teachers", "modalities": m.modalities, "rank": m.rank,
                "num_entities": m.num_entities, "num_relations": m.num_relations,
                "original_relations": self.ds.num_relations, "scale": m.scale,
                "feature_dims": {k: t.dim for k, t in self.features.items()},
                "feature_sources": {k: t.source for k, t in self.features.items()}}

    def loss(self, batch: torch.Tensor) -> StepLoss:
        h, r, t = batch[:, 0], batch[:, 1], batch[:, 2]
        model: ModalityTeachers = self.model
        B, E = len(batch), model.num_entities
        tr = self.cfg.train
        rows = None
        ph, pr = h, r
        if self.batching == "pairs":  # one query and score row per distinct (h, r) and teacher, shared by its targets
            ph, pr, rows = group_pairs(batch)
        # entity blocks where a (P, E) score block would exceed train.block_mb (big graphs); else one block
        chunk = entity_chunk(len(ph), E, self.cfg.train.block_mb)
        # one autograd node for every teacher (dsom.models.fused): one (B, E) block per teacher, no stack
        tails = self.ce_tails()
        out = complex_cross_entropy(model.entity_table_list(self.precision), model.relations, ph, pr, t, rows,
                                    self.precision, tails, chunk=chunk)
        ce = out.ce.mean(1)
        reg = fused_penalty(out, rows, tr.regularizer, tr.reg, B, tails)
        terms = {"ce": ce.sum()}
        if reg is not None:
            terms["reg"] = reg
        return StepLoss(terms, {f"ce/{m}": ce[k] for k, m in enumerate(model.modalities)})

    def all_view_metrics(self, split: str, max_triples: int | None = None) -> dict[str, dict[str, Any]]:
        frozen = self.model.freeze()
        ev = self.cfg.eval
        counts, n = split_counts(AllViews(frozen), self.ds, split, batch_size=ev.batch_size,
                                 memory_budget_mb=ev.memory_budget_mb / (frozen.num_teachers + 1),
                                 precision=ev.precision, device=self.device, max_triples=max_triples)
        return view_metrics(counts, n, frozen.modalities)

    def validate(self) -> tuple[dict[str, Any], float]:
        self.model.eval()
        t = self.cfg.train
        views = self.all_view_metrics("valid", t.valid_max_triples or None)
        key = "teacher_oracle" if t.teacher_selection == "oracle" else "teacher_avg"
        record = {k: {p: v[p] for p in TIE_POLICIES} for k, v in views.items()}
        return record, views[key][t.selection_policy][t.selection_metric]

    def save_final(self) -> FrozenTeachers:
        """Materialise the (selected) teachers into ``checkpoints/teachers/final``."""
        frozen = self.model.freeze()
        meta = {"format": TEACHERS_FORMAT, "model": {**self.model_meta(), "type": "frozen-teachers"},
                "stage": self.stage, "epoch": self.state.best_epoch or self.state.epoch, "config": self.cfg.to_dict()}
        write_checkpoint(self.ckpt_dir / "final", frozen.tensors(), self.ds, meta)
        return frozen


def load_frozen_teachers(path: str | Path, device: torch.device | str = "cpu") -> tuple[FrozenTeachers, dict[str, Any]]:
    """Materialised teachers from ``checkpoints/teachers/final`` (or a run directory)."""
    p = Path(path)
    if (p / "checkpoints" / "teachers" / "final").is_dir():
        p = p / "checkpoints" / "teachers" / "final"
    d, meta, tensors = read_checkpoint(p)
    if meta.get("format") != TEACHERS_FORMAT:
        raise DsomError(f"{d}: not a teachers checkpoint (format {meta.get('format')!r}); pass a run directory "
                        "or its checkpoints/teachers/final")
    return FrozenTeachers.from_tensors(tensors, check_teachers(d, meta, tensors)).to(device), meta
