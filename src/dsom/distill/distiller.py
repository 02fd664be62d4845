"""The DSoM distiller (SPEC §5): frozen teachers, a unimodal ComplEx student, a teacher selector.

One step on a batch of reciprocal training queries:

1. the frozen teachers' logits ``(M, B, E)`` from their materialised tables (no grad), divided by their fitted
   temperatures when ``distill.calibrate`` is on;
2. the selector (:mod:`dsom.distill.selectors`) turns them into per-query teacher weights ``(B, M)`` (the policy
   samples a subset; heuristics pick one), its own losses and statistics;
3. the combined teacher logits ``sum_m w_m F^m`` and the student's logits;
4. the losses, returned as a dict so every term is logged: ``ce`` (+ ``reg``), ``kd`` (already multiplied
   by gamma) and the selector's (``rc`` for the policy, ``senior`` for MulDE); plus step statistics.

The distiller never updates the teachers: they are a plain tensor holder, not a submodule.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from functools import partial, wraps
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from dsom.config import DistillConfig
from dsom.data.pairs import PairIndex
from dsom.distill.actions import combine, full_action
from dsom.distill.kd import KD_LOSSES, NO_KD, kd_loss
from dsom.distill.losses import per_query_ce
from dsom.distill.policy import SummaryPolicy
from dsom.distill.selectors import (
    SELECTORS,
    PolicySelector,
    SelectionBatch,
    Selector,
    SelectorContext,
    check_selector,
    make_selector,
    masked_reward_rows,
)
from dsom.models.complex import ComplEx
from dsom.models.fused import CETails, complex_scores, fused_penalty
from dsom.models.products import RowBlocks
from dsom.models.teachers import FrozenTeachers, teacher_queries
from dsom.perf import MaybeCompiled

HEURISTICS = ("avg", "conf", "best_teacher", "best_strategy")

# The dtype of the stage-2 neighbour mask per device type. On CPUs torch.compile's kernels load a bool mask 2-4x slower
# than a bfloat16 0/1 mask that they compare to 0 (one thread, B = 1,000, E = 12,842: the split log-sum-exp 34 -> 11 ms,
# NDKD 78 -> 38 ms on AVX-512; 58 -> 16 and 142 -> 71 ms on AVX2; benchmarks/kd_mask.py); GPUs keep the 1-byte bool.
# In training the comparison must be recomputed in the backward, not saved (:func:`mask_recomputed`).
NEIGHBOUR_MASK_DTYPE = {"cpu": torch.bfloat16}


class _KnownSafeCheckpoint(logging.Filter):
    """Drops torch's one-time notice that a checkpoint ``context_fn`` is traced (it asks to check for in-place ops:
    the functions :func:`mask_recomputed` wraps have none)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "context_fn is passed to torch.utils.checkpoint" not in record.getMessage()


logging.getLogger("torch._higher_order_ops.wrap").addFilter(_KnownSafeCheckpoint())


def _recompute_comparisons(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_RECOMPUTE if op is torch.ops.aten.gt.Scalar else CheckpointPolicy.PREFER_SAVE


def mask_recomputed(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` that, while ``torch.compile`` traces it with autograd on, has its ``x > scalar`` comparisons recomputed in
    the backward instead of saved (selective activation checkpointing; everything else is saved as usual).

    Left alone, the partitioner saves the bool ``neighbours > 0`` of :func:`kd_rows` (1 byte per entry, smaller than
    the bfloat16 mask it came from): the forward then writes a ``(B, E)`` bool block and the backward reads it, the slow
    bool loads the float mask exists to avoid. Recomputed, the backward reads the mask itself: the compiled stage-2
    terms (CE + NDKD, three teachers) forward and backward 120 -> 73 ms (bool mask: 104 ms) at B = 1,000,
    E = 12,842 on the 2-core AMX dev machine. Eager calls run ``fn`` as is."""

    @wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not (torch.is_grad_enabled() and torch.compiler.is_compiling()):
            return fn(*args, **kwargs)
        return checkpoint(fn, *args, use_reentrant=False,
                          context_fn=partial(create_selective_checkpoint_contexts, _recompute_comparisons), **kwargs)

    return run


def kd_rows(teacher: torch.Tensor, student: torch.Tensor, target: torch.Tensor, neighbours: torch.Tensor | None,
            cfg: DistillConfig, kind: str | None = None) -> torch.Tensor:
    """Per-query distillation loss ``(B,)`` of ``kind`` (default ``distill.kd``; :mod:`dsom.distill.kd`) without
    gamma. ``neighbours`` may be bool or a 0/1 float mask (:data:`NEIGHBOUR_MASK_DTYPE`): compared here, inside the
    compiled function, so every pass of the fused kernels reads the float mask."""
    if neighbours is not None and neighbours.dtype != torch.bool:
        neighbours = neighbours > 0
    return kd_loss(kind or cfg.kd)(teacher, student, target, neighbours, cfg)


def step_terms(student: torch.Tensor, teacher_logits: torch.Tensor | None, weights: torch.Tensor | None,
               target: torch.Tensor, neighbours: torch.Tensor | None, cfg: DistillConfig, kd: bool,
               teacher: torch.Tensor | None = None, kd_kind: str | None = None,
               ce: bool = True, rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The element-wise part of a stage-2 step after the matrix products (one function so ``torch.compile``
    can fuse it): per-query student CE (unless ``ce`` is off), the combined teacher ``sum_m w_m F^m`` (unless
    ``teacher`` is given) and the distillation loss. ``(B,)`` tensors keyed ``ce`` and ``kd``. ``student`` may be the
    product's bfloat16 (:func:`~dsom.models.fused.complex_scores`): it is read as float32. With ``rows (B,)`` the
    student's logits are one row per pair and the CE is per query (:func:`per_query_ce`); the KD stays per row
    (a loss that does not read ``target``)."""
    student = student.float()
    out = {"ce": per_query_ce(student, target, rows)} if ce else {}
    if kd:
        if teacher is None:
            teacher = combine(weights, teacher_logits)
        out["kd"] = kd_rows(teacher, student, target, neighbours, cfg, kd_kind)
    return out


def row_step_terms(student: torch.Tensor, blocks: list[torch.Tensor], pos: torch.Tensor, weights: torch.Tensor,
                   target: torch.Tensor, neighbours: torch.Tensor | None, cfg: DistillConfig,
                   kd_kind: str | None = None) -> dict[str, torch.Tensor]:
    """:func:`step_terms` with the combined teacher ``sum_m w_m F^m`` read from each teacher's own block of scored rows
    (:class:`~dsom.models.products.RowBlocks`: ``blocks[m]`` ``(n_m, E)``, ``pos (M, B)`` each query's row there,
    ``-1`` where ``weights[:, m]`` is 0), gathered inside the function: under ``torch.compile`` the rows are read in
    place, so the chosen teachers' scores are never copied into an ``(M, B, E)`` block. Every block must hold at least
    one row (pass only the teachers that were scored somewhere)."""
    teacher = None
    for m, block in enumerate(blocks):
        p = pos[m]
        term = torch.where(p >= 0, weights[:, m], 0.0)[:, None] * block[p.clamp(min=0)].float()
        teacher = term if teacher is None else teacher + term
    return step_terms(student, None, None, target, neighbours, cfg, True, teacher, kd_kind)


def scaled_ce(logits: torch.Tensor, target: torch.Tensor, tau: float, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Per-query cross-entropy ``(B,)`` of ``logits / tau`` (the student's CE the reward compares with; one function so
    ``torch.compile`` fuses its ``B x E`` passes); ``rows``: logits per pair (:func:`per_query_ce`)."""
    return per_query_ce(logits.float() / tau, target, rows)


def gathered_kd(student: torch.Tensor, teacher_logits: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
                neighbours: torch.Tensor, cfg: DistillConfig, kd_kind: str) -> torch.Tensor:
    """``(U,)`` distillation loss of the rows ``index (U,)`` of per-pair logits (student ``(P, E)``, teachers
    ``(M, P, E)``, neighbours ``(P, E)``), with ``weights (U, M)``: the rows are gathered inside the function, so
    under ``torch.compile`` they are read in place (a DB15K pair step: 113 -> 75 ms forward, 98 -> 89 ms backward)."""
    # read as float32 before the gather: the backward then sums a pair's rows in float32 (a bf16 block gathered as is
    # would add them in bf16: relative errors of the student's gradient up to 10x on cancelling rows)
    rows = torch.index_select(student.float(), 0, index)
    return step_terms(rows, teacher_logits[:, index], weights, index[:0], neighbours[index], cfg, True, None,
                      kd_kind, ce=False)["kd"]


def pair_kd_rows(rows: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The distinct (pair, teacher weights) of a pair batch: their pairs ``(U,)``, weights ``(U, M)`` and the one of
    each query ``(B,)``. A neighbour-decoupled KD term depends on nothing else (the neighbour set is the pair's known
    answers, which hold every target), so it is computed once per distinct row."""
    key = torch.cat([rows.unsqueeze(1).to(weights.dtype), weights], 1)  # pair ids < 2^24: exact in float32
    uniq, inverse = torch.unique(key, dim=0, return_inverse=True)
    return uniq[:, 0].long(), uniq[:, 1:], inverse


def per_row(needed: torch.Tensor | None, pair_of: torch.Tensor | None, num_rows: int) -> torch.Tensor | None:
    """``(M, B)`` per-query needed teachers -> ``(M, num_rows)`` per scored row: under pair batching (``pair_of (B,)``)
    a pair's teacher is scored if any of its queries needs it."""
    if needed is None or pair_of is None:
        return needed
    counts = torch.zeros(needed.shape[0], num_rows, device=needed.device).index_add_(1, pair_of, needed.float())
    return counts > 0


class Distiller(nn.Module):
    """Args:
    teachers: frozen, materialised teachers (``M`` of them).
    num_relations: relation ids including reciprocals (2R).
    rank: the student's rank d.
    config: the ``distill`` section.
    temperatures: ``(M,)`` per-teacher temperatures dividing the teacher logits (``None`` = 1).
    entity_stats: ``(E, M)`` per-entity teacher reliability for the policy state (``distill.policy_entity_stats``).
    compile: run the distillation loss through ``torch.compile`` (:class:`~dsom.perf.MaybeCompiled`).
    num_pairs: the distinct training (entity, relation) pairs; the summary policy caches their state
        (``distill.summary_cache``; ``pair_keys`` of :meth:`forward`).
    """

    def __init__(self, teachers: FrozenTeachers, num_relations: int, rank: int, config: DistillConfig,
                 init_scale: float = 1e-3, generator: torch.Generator | None = None, compile: bool = False,
                 temperatures: torch.Tensor | None = None, entity_stats: torch.Tensor | None = None,
                 num_pairs: int = 0) -> None:
        super().__init__()
        self._step_terms = MaybeCompiled(mask_recomputed(step_terms), compile)
        self._row_step_terms = MaybeCompiled(mask_recomputed(row_step_terms), compile)
        self._gathered_kd = MaybeCompiled(mask_recomputed(gathered_kd), compile)
        self._scaled_ce = MaybeCompiled(scaled_ce, compile)
        self._row_ops = CETails(compile)  # the student's N3 penalty: closed form, compiled
        self._teacher_queries = MaybeCompiled(teacher_queries, compile)
        self.cfg = config
        self.teachers = teachers
        self.num_teachers = teachers.num_teachers
        E = teachers.num_entities
        self.student = ComplEx(E, num_relations, rank, init_scale, generator=generator)
        temps = torch.ones(self.num_teachers) if temperatures is None else temperatures.detach().float().cpu()
        if temps.shape != (self.num_teachers,) or not bool((temps > 0).all()):
            raise ValueError(f"temperatures must be {self.num_teachers} positive numbers, got {temps.tolist()}")
        self.register_buffer("inv_temperature", 1.0 / temps)
        self._calibrated = bool((temps != 1).any())  # decided once: no device sync per step
        # per-query batches: a selector that chose without the teachers' logits has each teacher's scored rows kept
        # as its own block, read in place by the compiled terms (False: written into the (M, B, E) block, the path
        # benchmarks/teacher_rows.py compares with)
        self.teacher_row_blocks = True
        self.selector: Selector | None = make_selector(
            config.selector, SelectorContext(teachers.modalities, E, num_relations, config, generator, entity_stats,
                                            compile, num_pairs))

    @property
    def policy(self) -> nn.Module | None:
        """The policy network of the ``rl`` selector (``None`` for every other selector)."""
        return self.selector.policy if isinstance(self.selector, PolicySelector) else None

    def to(self, *args: Any, **kwargs: Any) -> Distiller:  # keep the frozen teachers on the same device
        super().to(*args, **kwargs)
        device = self.student.entity.device
        if self.teachers.tables.device != device:
            self.teachers = self.teachers.to(device)
        return self

    @torch.no_grad()
    def teacher_scores(self, head: torch.Tensor, relation: torch.Tensor, precision: str = "fp32",
                       rows: torch.Tensor | None = None) -> torch.Tensor:
        """``(M, B, E)`` teacher logits divided by the teachers' temperatures (folded into the queries), float32 or,
        under ``bf16``, the products' bfloat16 (:meth:`~dsom.models.teachers.FrozenTeachers.logits`); ``rows (M, B)``
        bool: teacher ``m`` only on the rows ``rows[m]``, zero elsewhere."""
        return self.teachers.logits(head, relation, precision, self.inv_temperature if self._calibrated else None,
                                    self._teacher_queries, rows)

    @torch.no_grad()
    def teacher_row_scores(self, head: torch.Tensor, relation: torch.Tensor, precision: str,
                           rows: torch.Tensor) -> RowBlocks:
        """The calibrated teachers' logits, teacher ``m`` on the rows ``rows[m]`` only, one block per teacher
        (:meth:`~dsom.models.teachers.FrozenTeachers.row_logits`)."""
        return self.teachers.row_logits(head, relation, rows, precision,
                                        self.inv_temperature if self._calibrated else None, self._teacher_queries)

    # ------------------------------------------------------------------------------------------ step
    def forward(self, batch: torch.Tensor, neighbours: torch.Tensor | None, precision: str = "fp32",
                regularizer: str = "n3", reg: float = 0.01, kd_weight: float | None = None,
                generator: torch.Generator | None = None, reward_rows: torch.Tensor | None = None,
                draw_rows: tuple[int, int, int] | None = None,
                reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                pair_keys: torch.Tensor | None = None, reward_keys: torch.Tensor | None = None,
                reward_index: torch.Tensor | None = None,
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Losses and step statistics for reciprocal queries ``(B, 3)``; ``neighbours (B, E)`` bool or 0/1 float (``(P, E)``, one
        row per pair, with ``pairs``) holds each
        query's training answers (target included); ``reward_rows (B,)`` bool marks the queries whose triples
        the teachers never trained on (the only ones the policy is rewarded on; ``None`` = all). ``draw_rows``
        and ``reduce``: under torchrun, which rows of the global batch these are and a sum over processes
        (:class:`~dsom.distill.selectors.SelectionBatch`); the policy's ``rc`` then is this process's part of the
        whole batch's loss, every other loss the mean over this process's rows. ``pairs = (heads (P,), relations (P,),
        pair of each query (B,))``: the batch's distinct (entity, relation) pairs (``distill.batching=pairs``); the
        student and the teachers score each pair once, the policy reads each pair's state once, the CE uses each
        pair's log-sum-exp and a neighbour-decoupled KD term is computed once per distinct (pair, teacher weights):
        the same per-query losses with fewer products and fewer passes over score blocks. ``pair_keys`` (``(B,)``, or
        ``(P,)`` with ``pairs``): the training-pair id of each scored row, for the policy-state cache (``None`` =
        no cache). ``reward_keys (B,)``: each query's slot in the policy's reward cache, ``-1`` where it is not
        rewarded (:meth:`~dsom.distill.selectors.PolicySelector.enable_reward_cache`; ``None`` = no cache).
        ``reward_index (n,)``: the rows where ``reward_rows`` is true, when the caller knows them without reading the
        device (``None``: taken from ``reward_rows``)."""
        cfg = self.cfg
        h, r, t = batch[:, 0], batch[:, 1], batch[:, 2]
        qh, qr, rows = (h, r, None) if pairs is None else pairs
        # (B or P, E) scores in the product's dtype (bf16: read as float32 inside the compiled terms, no float32 copy)
        # and the rows the N3 penalty reads, as one node: the rows' gradients are added into the table's one dense
        # gradient (models/fused.py)
        scored = complex_scores(self.student.entity, self.student.relation, qh, qr, t, precision, self._row_ops)
        student = scored.ce
        losses: dict[str, torch.Tensor] = {}
        # (the penalty reads only the factor rows, not the CE field)
        pen = fused_penalty(scored, rows, regularizer, reg, len(t), self._row_ops)
        if pen is not None:  # = regularizer(regularizer, self.student.factors(h, r, t), reg)
            losses["reg"] = pen
        sel = self.selector
        if sel is None:
            losses["ce"] = per_query_ce(student.float(), t, rows).mean()
            return losses, {}
        gamma = cfg.gamma if kd_weight is None else kd_weight
        detached = student.detach()
        # the teachers' (M, B or P, E) logits are scored when the selector reads them or, if it chooses without them
        # (a fixed teacher, a cached policy state), only where the chosen weights are non-zero (and every teacher on
        # the reward rows): their products are most of a step
        # off a CPU in one process the policy reads the reward rows as a mask over the batch (no host read, fixed
        # shapes: PolicySelector.masks_reward_rows): the student's reward CE is then needed on every row
        masked = masked_reward_rows(reward_rows, reward_index, reduce)
        selection = SelectionBatch(None, h, r, t,
                                   student_ce=(self.reward_ce(detached, t, rows, None if masked else reward_rows,
                                                              reward_index)
                                               if sel.needs_student else None),
                                   student_logits=detached if sel.needs_student else None,
                                   reward_rows=reward_rows, reward_index=reward_index, generator=generator,
                                   draw_rows=draw_rows,
                                   reduce=reduce, pair_of=rows, pair_keys=pair_keys, reward_keys=reward_keys,
                                   score_teachers=lambda needed: self.teacher_scores(
                                       qh, qr, precision, per_row(needed, rows, len(qh))),
                                   score_rows=(partial(self.teacher_row_scores, h, r, precision)
                                               if rows is None and self.teacher_row_blocks else None))
        choice = sel(selection)
        kind = sel.kd_override or cfg.kd
        use_kd = kind != NO_KD and gamma > 0
        if use_kd and choice.teacher is None:  # (no distillation: nothing beyond what the selector read)
            selection.materialise(choice.weights)
        tea_all = selection.teacher_logits
        blocks = selection.teacher_rows if use_kd and choice.teacher is None and tea_all is None else None
        if blocks is not None:  # per query, each teacher's own rows (a teacher scored nowhere is weighted 0)
            present = [m for m, b in enumerate(blocks.blocks) if len(b)]
            terms = self._row_step_terms(student, [blocks.blocks[m] for m in present], blocks.pos[present],
                                         choice.weights[:, present], t, neighbours, cfg, kind)
        elif rows is None:
            terms = self._step_terms(student, tea_all, choice.weights, t, neighbours, cfg, use_kd, choice.teacher,
                                     kind)
        elif use_kd and choice.teacher is None and KD_LOSSES[kind].needs_neighbours and neighbours is not None:
            # pair batches: CE from each pair's log-sum-exp; KD once per distinct (pair, teacher weights)
            u_pair, u_weights, inverse = pair_kd_rows(rows, choice.weights)
            # each pair's first distinct row is read in place (u_pair is sorted and holds every pair: its first rows
            # are 0..P-1); only the further rows of pairs whose queries drew different subsets are gathered (the
            # gather's backward inside the compiled graph is an accumulating index_put_, 22 ms for 1,400 DB15K rows)
            first = torch.ones_like(u_pair, dtype=torch.bool)
            first[1:] = u_pair[1:] != u_pair[:-1]
            # (with the per-query CE from each pair's log-sum-exp: one pass and one gradient block for both)
            firsts = self._step_terms(student, tea_all, u_weights[first], t, neighbours, cfg, True, None, kind,
                                      rows=rows)
            kd = firsts["kd"]
            if len(u_pair) > len(qh):
                extra = ~first
                kd = torch.cat([kd, self._gathered_kd(student, tea_all, u_pair[extra], u_weights[extra], neighbours,
                                                      cfg, kind)])
                # the distinct rows in the order of kd: firsts, then extras
                where = torch.empty_like(u_pair)
                where[first] = torch.arange(len(qh), device=where.device)
                where[extra] = torch.arange(len(qh), len(u_pair), device=where.device)
                inverse = where[inverse]
            terms = {"ce": firsts["ce"], "kd": kd[inverse]}
        else:  # a loss that reads the target, or MulDE's own teacher: per query
            nb = None if neighbours is None else neighbours[rows]
            tea = None if tea_all is None else tea_all[:, rows]
            terms = self._step_terms(student.float()[rows], tea, choice.weights, t, nb, cfg, use_kd, choice.teacher,
                                     kind)
        losses["ce"] = terms["ce"].mean()
        if use_kd:
            losses["kd"] = gamma * terms["kd"].mean()
        losses.update(choice.losses)
        stats = dict(choice.stats)
        if choice.weights is not None and not isinstance(sel, PolicySelector):
            stats["teacher_share"] = choice.weights.mean(0)
        return losses, stats

    @torch.no_grad()
    def reward_ce(self, student: torch.Tensor, target: torch.Tensor, rows: torch.Tensor | None,
                  reward_rows: torch.Tensor | None, reward_index: torch.Tensor | None = None) -> torch.Tensor:
        """The student's CE at ``distill.reward_tau`` that the policy's reward compares with, ``(B,)``, computed on the
        reward rows only (``reward_rows (B,)`` bool; ``None`` = every row) and NaN elsewhere, where no reward reads it:
        with the default held-out rewards that is a tenth of the batch, and the pass over the whole ``(B, E)`` block
        (about 10 ms of a 245 ms DB15K rank-500 step on the 2-core AMX dev machine) shrinks with it. ``student`` holds
        one row per query, or per pair with ``rows`` (the pair of each query)."""
        tau = self.cfg.reward_tau
        if reward_rows is None:
            return self._scaled_ce(student, target, tau, rows)
        idx = reward_rows.nonzero().squeeze(1) if reward_index is None else reward_index
        out = torch.full(target.shape, math.nan, dtype=torch.float32, device=target.device)
        if len(idx):
            logits = student[idx] if rows is None else student[rows[idx]]
            out[idx] = self._scaled_ce(logits, target[idx], tau)
        return out

    @torch.no_grad()
    def greedy_actions(self, queries: torch.Tensor, batch_size: int = 1000,
                       pair_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Arg-max policy actions ``(n,)`` for reciprocal queries (the Fig. 3 analysis).

        The queries are taken pair by pair, batches of ``batch_size`` queries: each distinct (entity, relation) pair
        of a batch is scored by the teachers once and its policy state read once (FB15K-237's 544,230 training queries
        are 149,689 pairs). ``pair_ids (n,)``: each query's training-pair id (``StudentTrainer.query_pairs``), the key
        under which a sealed summary-state cache serves the states without scoring the teachers at all.

        The result is preallocated: small tensors kept alive across iterations would otherwise sit between
        the per-batch score blocks in the heap and fragment it (RSS grew by GBs on DB15K)."""
        assert isinstance(self.selector, PolicySelector)
        n = len(queries)
        keyed = pair_ids is not None
        if pair_ids is None:
            pair_ids = PairIndex(queries).pair_of
        order = torch.argsort(pair_ids, stable=True)
        out = torch.empty(n, dtype=torch.int64, device=queries.device)
        policy = self.selector.policy
        for s in range(0, n, batch_size):
            idx = order[s:s + batch_size]
            q = queries[idx]
            keys, rows, counts = torch.unique_consecutive(pair_ids[idx], return_inverse=True, return_counts=True)
            first = torch.cumsum(counts, 0) - counts
            served = keyed and isinstance(policy, SummaryPolicy) and policy.serves(keys)
            tea = None if served else self.teacher_scores(q[first, 0], q[first, 1])
            out[idx] = self.selector.greedy(tea, q[:, 0], q[:, 1], q[:, 2], pair_of=rows, keys=keys if served else None)
        return out


SELECTOR_NAMES = tuple(sorted(SELECTORS))
__all__ = ["Distiller", "HEURISTICS", "SELECTOR_NAMES", "check_selector", "full_action"]
