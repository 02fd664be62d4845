"""Modality-split ComplEx teachers (MoSE ``ComplExMDR`` in split mode, SPEC §2).

One module holds one ComplEx teacher per modality:

* ``structure``: a free entity table ``E x 2d``;
* every feature modality m: fixed features ``X_m`` (``E x F_m``, a buffer) times a trainable projection
  ``W_m`` (``F_m x 2d``, Xavier-uniform) divided by ``scale`` (MoSE ``learn.py``: 20);
* a separate relation table ``2R x 2d`` per teacher.

Nothing is shared between teachers (MoSE's ``alpha = 1``). All teachers are scored together: the
``(M, E, 2d)`` stack of entity tables and the ``(M, B, 2d)`` queries go through one batched product,
giving ``(M, B, E)`` logits (SPEC §9.1). Trainable parameters: ``2d * (E + M * 2R + sum_m F_m)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

import dsom.models.interaction as interaction
from dsom.models.products import (
    RowBlocks,
    cached_bf16,
    column_scores,
    masked_rows,
    matmul_scores,
    stacked_scores,
)
from dsom.models.representations import normal_table, projected_table, xavier_projection

STRUCTURE = "structure"

QueryFn = Callable[..., torch.Tensor]


def teacher_queries(tables: torch.Tensor, relations: torch.Tensor, head: torch.Tensor, relation: torch.Tensor,
                    scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``(M, B, 2d)`` queries of frozen teachers ``tables (M, E, 2d)``, ``relations (M, 2R, 2d)`` for ids ``(B,)``:
    the complex product of the gathered rows, times ``scale (M,)`` (``None``: 1), in ``dtype`` (the product operand).
    One function so that ``torch.compile`` does it in one pass over the gathered rows: eagerly it is a dozen
    ``(M, B, 2d)`` passes, 10.3 ms against 3.0 compiled at M = 3, B = 1,000, 2d = 1,000 on the 2-core AMX dev
    machine (a stage-2 step there is about 235 ms)."""
    query = interaction.complex_query(tables[:, head], relations[:, relation])
    if scale is not None:
        query = query * scale.to(query.dtype).view(-1, 1, 1)
    return query.to(dtype)


class ModalityTeachers(nn.Module):
    """Args:
    num_entities: E.
    num_relations: relation ids including reciprocals (2R).
    rank: d.
    features: feature matrices by modality name (row i = entity i); ``structure`` is always added first.
    init_scale: N(0,1) scale of the structural and relation tables (kbc: 1e-3).
    scale: divisor of the projected feature tables (MoSE: 20).
    """

    def __init__(self, num_entities: int, num_relations: int, rank: int, features: Mapping[str, torch.Tensor],
                 init_scale: float = 1e-3, scale: float = 20.0, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if STRUCTURE in features:
            raise ValueError("'structure' has no feature matrix; it is always the first teacher")
        self.num_entities, self.num_relations, self.rank, self.scale = num_entities, num_relations, rank, scale
        self.modalities = [STRUCTURE, *features]
        self.structure = nn.Parameter(normal_table((num_entities, 2 * rank), init_scale, generator))
        self.relations = nn.Parameter(
            normal_table((len(self.modalities), num_relations, 2 * rank), init_scale, generator))
        self.projections = nn.ParameterList()
        for i, (name, x) in enumerate(features.items()):
            x = torch.as_tensor(x, dtype=torch.float32)
            if x.shape[0] != num_entities:
                raise ValueError(f"features of '{name}' have {x.shape[0]} rows, expected {num_entities}")
            self.register_buffer(f"features_{i}", x)
            self.projections.append(nn.Parameter(xavier_projection(x.shape[1], 2 * rank, generator)))

    @property
    def num_teachers(self) -> int:
        return len(self.modalities)

    def feature_matrix(self, i: int) -> torch.Tensor:
        return getattr(self, f"features_{i}")

    def entity_table_list(self, precision: str = "fp32") -> list[torch.Tensor]:
        """The M entity tables ``(E, 2d)``: the structural table, then ``X_m W_m / scale`` per feature modality, each
        product in ``precision`` (:func:`~dsom.models.representations.projected_table`; bf16: bfloat16 tables, from a
        bf16 copy of the fixed features made once). In float32 these products are a fifth of a DB15K rank-500
        stage-1 step with text and numeric features on the 2-core AMX dev machine (85 of 375 ms)."""
        return [self.structure, *(projected_table(self._features_for(i, precision), w, self.scale, precision)
                                  for i, w in enumerate(self.projections))]

    def _features_for(self, i: int, precision: str) -> torch.Tensor:
        """Feature matrix ``i`` as the projection's operand: under ``bf16`` a bfloat16 copy, made again only when the
        buffer is another tensor or was written in place (``load_state_dict``, ``.to``;
        :func:`~dsom.models.products.cached_bf16`)."""
        x = self.feature_matrix(i)
        return cached_bf16(x) if precision == "bf16" else x

    def entity_tables(self) -> torch.Tensor:
        """``(M, E, 2d)``: :meth:`entity_table_list` stacked."""
        return torch.stack(self.entity_table_list())

    def queries(self, tables: torch.Tensor, head: torch.Tensor, relation: torch.Tensor) -> torch.Tensor:
        """``(M, B, 2d)`` query vectors of every teacher for ids ``(B,)``."""
        return interaction.complex_query(tables[:, head], self.relations[:, relation])

    def score_all(self, head: torch.Tensor, relation: torch.Tensor, precision: str = "fp32",
                  tables: torch.Tensor | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """``(M, B, stop - start)`` float32 logits of every teacher, one batched product."""
        tables = self.entity_tables() if tables is None else tables
        return interaction.score_all(tables, self.relations, head, relation, precision, start, stop)

    def factors(self, tables: torch.Tensor, head: torch.Tensor, relation: torch.Tensor,
                tail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """N3 factors per teacher: moduli of head, relation and true-tail rows, each ``(M, B, d)``."""
        return interaction.factors(tables, self.relations, head, relation, tail)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @staticmethod
    def parameter_count(num_entities: int, num_relations: int, rank: int, feature_dims: list[int]) -> int:
        """``2d * (E + M * 2R + sum F_m)`` with ``M = 1 + len(feature_dims)`` (SPEC §10)."""
        return 2 * rank * (num_entities + (1 + len(feature_dims)) * num_relations + sum(feature_dims))


    @torch.no_grad()
    def freeze(self) -> FrozenTeachers:
        """Materialise ``X_m W_m / scale`` once: the frozen teachers used by stage 2 and the ensembles."""
        return FrozenTeachers(list(self.modalities), self.entity_tables().detach().clone(),
                              self.relations.detach().clone())


TEACHERS_FORMAT = "dsom-teachers/1"


class FrozenTeachers:
    """Materialised, frozen teachers: ``tables (M, E, 2d)`` and ``relations (M, 2R, 2d)``.

    Scoring never touches features or projections, so stage 2 costs one batched product per batch.
    """

    def __init__(self, modalities: list[str], tables: torch.Tensor, relations: torch.Tensor) -> None:
        if tables.dim() != 3 or relations.dim() != 3 or tables.shape[0] != relations.shape[0] != len(modalities):
            raise ValueError(f"inconsistent teacher tensors: tables {tuple(tables.shape)}, "
                             f"relations {tuple(relations.shape)}, modalities {modalities}")
        self.modalities = list(modalities)
        self.tables = tables
        self.relations = relations
        self._bf16_tables: torch.Tensor | None = None  # the tables as bf16 product operands, cast once

    @property
    def num_teachers(self) -> int:
        return len(self.modalities)

    @property
    def num_entities(self) -> int:
        return self.tables.shape[1]

    @property
    def rank(self) -> int:
        return self.tables.shape[2] // 2

    def to(self, device: torch.device | str) -> FrozenTeachers:
        return FrozenTeachers(self.modalities, self.tables.to(device), self.relations.to(device))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"tables": self.tables, "relations": self.relations}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], modalities: list[str]) -> FrozenTeachers:
        return cls(modalities, tensors["tables"], tensors["relations"])

    @torch.no_grad()
    def score_all(self, head: torch.Tensor, relation: torch.Tensor, precision: str = "fp32",
                  start: int = 0, stop: int | None = None) -> torch.Tensor:
        """``(M, B, stop - start)`` float32 logits of every teacher, one batched product.

        With ``bf16`` products the frozen tables are cast to bf16 once and kept (:meth:`_bf16`), instead of once per
        batch; the queries are still formed in float32, so the logits are the same."""
        if precision != "bf16":
            return interaction.score_all(self.tables, self.relations, head, relation, precision, start, stop)
        query = teacher_queries(self.tables, self.relations, head, relation, None, self.tables.dtype)
        tables = self._bf16().transpose(1, 2)  # (M, E, 2d) view of the entity-minor cast
        whole = start == 0 and stop is None
        return matmul_scores(query, tables if whole else tables[:, start:stop], precision)

    @torch.no_grad()
    def logits(self, head: torch.Tensor, relation: torch.Tensor, precision: str = "fp32",
               scale: torch.Tensor | None = None, queries: QueryFn = teacher_queries,
               rows: torch.Tensor | None = None) -> torch.Tensor:
        """``(M, B, E)`` logits for stage 2, in the products' own dtype: float32, or bfloat16 under ``bf16`` (the
        product's result is bf16-rounded either way, so keeping it bf16 loses nothing and saves a cast of the whole
        block; consumers upcast inside their fused kernels). ``scale (M,)`` multiplies each teacher's logits, folded
        into its queries (ComplEx scores are linear in the query): no pass over the block.

        Float32 logits are laid out ``(B, M, E)`` and returned as an ``(M, B, E)`` view, so the paper's policy state
        ``(B, M * E)`` is a free reshape (:func:`~dsom.models.products.stacked_scores`); bf16 ones are contiguous
        ``(M, B, E)`` (one batched product), the layout the compiled readers of bf16 run fastest on (the summary
        state: 24 ms against 41 ms from the ``(B, M, E)`` view on the 2-core AMX dev machine). ``queries``:
        :func:`teacher_queries` or the same compiled (the distiller's, under ``train.compile``). ``rows (M, B)`` bool:
        teacher ``m`` is scored only on the rows ``rows[m]`` and is zero on the others (``None`` = every row; the
        rows a selector weights 0 are never read, :meth:`~dsom.distill.selectors.SelectionBatch.materialise`)."""
        if precision != "bf16":
            return stacked_scores(queries(self.tables, self.relations, head, relation, scale, self.tables.dtype),
                                  self.tables, precision, rows)
        query = queries(self.tables, self.relations, head, relation, scale, torch.bfloat16)
        if rows is None or bool(rows.all()):
            return torch.matmul(query, self._bf16())
        tables = self._bf16()
        out = torch.empty(query.shape[0], query.shape[1], tables.shape[2], dtype=torch.bfloat16, device=query.device)
        for m in range(len(out)):
            masked_rows(out[m], rows[m], lambda idx, m=m: torch.matmul(query[m, idx], tables[m]))
        return out

    @torch.no_grad()
    def row_logits(self, head: torch.Tensor, relation: torch.Tensor, rows: torch.Tensor, precision: str = "fp32",
                   scale: torch.Tensor | None = None, queries: QueryFn = teacher_queries) -> RowBlocks:
        """Teacher ``m``'s logits on the rows ``rows[m]`` only (``rows (M, B)`` bool), each teacher's kept as its own
        ``(n_m, E)`` block (:class:`~dsom.models.products.RowBlocks`): what :meth:`logits` with ``rows`` computes,
        without writing them into the ``(M, B, E)`` block (a copy of every row scored). Same dtypes and values as
        :meth:`logits`; ``scale`` and ``queries`` as there."""
        if precision == "bf16":
            query = queries(self.tables, self.relations, head, relation, scale, torch.bfloat16)
            tables = self._bf16()
            return RowBlocks.score(rows, lambda m, idx: torch.matmul(query[m, idx], tables[m]))
        query = queries(self.tables, self.relations, head, relation, scale, self.tables.dtype)
        if precision == "fp32":
            return RowBlocks.score(rows, lambda m, idx: column_scores(query[m, idx], self.tables[m]))
        return RowBlocks.score(rows, lambda m, idx: matmul_scores(query[m, idx], self.tables[m], precision))

    def _bf16(self) -> torch.Tensor:
        """The tables as bf16 product operands ``(M, 2d, E)``, cast once and kept (``M x E x 2d`` more bytes), laid
        out entity-minor: the product then reads contiguous operands (on the 2-core AMX dev machine a
        (1000 x 1000) x (1000 x 12842) bf16 product takes 10.6 ms so against 16.9 ms from an (E, 2d) table)."""
        if self._bf16_tables is None or self._bf16_tables.device != self.tables.device:
            self._bf16_tables = self.tables.transpose(1, 2).to(torch.bfloat16).contiguous()
        return self._bf16_tables

    def index(self, modality: str) -> int:
        if modality not in self.modalities:
            raise ValueError(f"no teacher '{modality}' (teachers: {', '.join(self.modalities)})")
        return self.modalities.index(modality)

    def view(self, modalities: list[str] | None = None) -> TeacherView:
        """Scorer of one teacher or of the mean logits of several (``None``: all = Teacher Avg.)."""
        idx = None if modalities is None else [self.index(m) for m in modalities]
        return TeacherView(self, idx)


class TeacherView:
    """A :class:`~dsom.evaluate.Scorer` over frozen teachers: one teacher, or the mean of several
    (``indices=None``: Teacher Avg. / MoSE-AI, the mean of all teachers' logits)."""

    def __init__(self, teachers: FrozenTeachers | ModalityTeachers, indices: list[int] | None = None) -> None:
        if isinstance(teachers, ModalityTeachers):
            teachers = teachers.freeze()
        self.teachers = teachers
        self.indices = list(range(teachers.num_teachers)) if indices is None else indices

    @torch.no_grad()
    def score_all(self, head: torch.Tensor, relation: torch.Tensor, precision: str = "fp32",
                  start: int = 0, stop: int | None = None) -> torch.Tensor:
        scores = self.teachers.score_all(head, relation, precision, start=start, stop=stop)
        return scores[self.indices].mean(0)


class AllViews:
    """Scorer returning ``(M + 1, B, N)``: every teacher, then their mean (ranks all of them in one pass)."""

    def __init__(self, teachers: FrozenTeachers) -> None:
        self.teachers = teachers

    @torch.no_grad()
    def score_all(self, head: torch.Tensor, relation: torch.Tensor, precision: str = "fp32",
                  start: int = 0, stop: int | None = None) -> torch.Tensor:
        s = self.teachers.score_all(head, relation, precision, start=start, stop=stop)
        return torch.cat([s, s.mean(0, keepdim=True)])
