"""Teacher selectors: how each training query's teachers are combined for distillation (SPEC §5.2, §6).

A selector is one class behind the :data:`SELECTORS` registry (the strategy pattern of mdistiller's
distillers). Given the frozen teachers' logits of a batch it returns per-query teacher weights ``(B, M)`` (or,
for MulDE, the combined logits themselves), its own losses and its statistics as a :class:`Selection`.
Adding a selector is one class here plus one ``@register`` line.

========================  ===============================================================================
``rl``                    the DSoM policy (REINFORCE over the ``2^M - 1`` teacher subsets)
``avg``                   every teacher, equal weights (Table 4 "w/ NDKD")
``single:<modality>``     one teacher (Table 6)
``conf``                  the most confident teacher per query (Table 2 ConfTeacher)
``best_teacher``          the teacher with the lowest CE on the target (Table 2 BestTeacher)
``best_strategy``         the subset with the lowest CE on the target (Table 2 BestStrategy)
``mulde``                 a sketch of MulDE's Senior (SPEC §6), relation-wise scaling + contrast attention
========================  ===============================================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dsom import perf
from dsom.config import DistillConfig
from dsom.distill.actions import combine, num_actions, subset_matrix
from dsom.distill.losses import per_query_ce
from dsom.distill.policy import (
    Policy,
    SummaryPolicy,
    action_ces,
    action_rewards,
    entropy,
    policy_state,
    reinforce_loss,
)
from dsom.distill.rowcache import RowCache
from dsom.models.products import RowBlocks
from dsom.numerics import floor_exp
from dsom.perf import MaybeCompiled


@dataclass
class SelectorContext:
    """What a selector may know when it is built."""

    modalities: list[str]
    num_entities: int
    num_relations: int  # including reciprocals
    config: DistillConfig
    generator: torch.Generator | None = None
    entity_stats: torch.Tensor | None = None  # (E, M) per-entity teacher reliability (holdout.entity_reliability)
    compile: bool = False  # torch.compile the reward CEs over (M, B, E) blocks (train.compile)
    num_pairs: int = 0  # distinct training (entity, relation) pairs: the summary policy caches their state (0 = off)

    @property
    def num_teachers(self) -> int:
        return len(self.modalities)


@dataclass
class SelectionBatch:
    """One batch as a selector sees it. ``teacher_logits`` are the (calibrated) frozen teachers' ``(M, B, E)``
    logits; ``student_ce`` the current student's detached CE ``(B,)`` (selectors with ``needs_student``; NaN outside
    ``reward_rows``, where no reward reads it); ``reward_rows`` marks the queries the teachers never trained on
    (``None`` = every row); ``student_logits`` the detached student logits (MulDE only). Under pair batching
    ``teacher_logits`` and ``student_logits`` hold one row per (entity, relation) pair and ``pair_of`` maps each query
    to its row (the policy's state is a function of the pair).

    ``teacher_logits`` may be ``None`` with a ``score_teachers`` function: the teachers are then scored when a selector
    first reads them (:meth:`teachers`), or, by a selector that chooses without reading them, only where the chosen
    weights are non-zero (:meth:`materialise`): the teachers' products are most of stage 2's work, and a query that
    weights a teacher 0 never reads its logits. With ``score_rows`` those rows are kept as one block per teacher
    (:attr:`teacher_rows`), which the distillation loss reads in place.

    Under torchrun a process holds only its share of the global batch: ``draw_rows = (start, stop, size)`` says
    which rows of a batch of ``size`` these are (the random draws of the whole batch are made and sliced, so the
    samples are those of one process), and ``reduce`` sums a tensor over processes (in place), for statistics
    of the whole batch (``None`` = the batch is whole)."""

    teacher_logits: torch.Tensor | None  # float32, or bfloat16 from bf16 products: upcast where read (``logits32``)
    head: torch.Tensor
    relation: torch.Tensor
    target: torch.Tensor
    student_ce: torch.Tensor | None = None
    student_logits: torch.Tensor | None = None
    reward_rows: torch.Tensor | None = None
    reward_index: torch.Tensor | None = None  # (n,): where reward_rows is true, known on the host (None: from the mask)
    generator: torch.Generator | None = None
    draw_rows: tuple[int, int, int] | None = None
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    pair_of: torch.Tensor | None = None  # (B,): teacher_logits are (M, P, E), one row per pair; query b reads pair_of[b]
    pair_keys: torch.Tensor | None = None  # the training-pair id of each row of teacher_logits (the policy-state cache)
    # (B,): each query's slot in the policy's reward cache, -1 where it is not rewarded (None = no cache)
    reward_keys: torch.Tensor | None = None
    # (M, B) bool per query -> the (M, rows, E) teacher logits, scored where true and zero elsewhere (None = everywhere)
    score_teachers: Callable[[torch.Tensor | None], torch.Tensor] | None = None
    # (M, B) bool -> each teacher's logits on its rows only, no (M, B, E) block (None: the block; see materialise)
    score_rows: Callable[[torch.Tensor], RowBlocks] | None = None
    teacher_rows: RowBlocks | None = None  # set by materialise when score_rows is given

    def teachers(self) -> torch.Tensor:
        """The ``(M, rows, E)`` teacher logits, every teacher on every row scored now if they have not been scored
        (from :attr:`teacher_rows`, zeros where a teacher was not scored, if :meth:`materialise` kept only those)."""
        if self.teacher_logits is None:
            if self.teacher_rows is not None:
                self.teacher_logits = self.teacher_rows.rows()
            elif self.score_teachers is None:
                raise ValueError("SelectionBatch has neither teacher_logits nor score_teachers")
            else:
                self.teacher_logits = self.score_teachers(None)
        return self.teacher_logits

    def materialise(self, weights: torch.Tensor, rewarded: torch.Tensor | None = None) -> None:
        """Score the teachers as the chosen ``weights (B, M)`` need them, unless they have been scored: teacher ``m``
        of query ``b`` where ``weights[b, m] != 0``, and every teacher of the queries ``rewarded (B,)`` bool (the rows
        a reward reads). With ``score_rows`` each teacher's rows are kept as its own block (:attr:`teacher_rows`),
        unless every teacher is needed everywhere; else :attr:`teacher_logits` holds them, zeros elsewhere. A
        selector that calls this must read only those rows (:meth:`query_logits`).

        Off a CPU every teacher is scored on every row: which rows are needed is data the host would have to read (a
        sync per step, and a size a CUDA graph cannot hold), while a GPU's products are a small part of its step (the
        price is the whole ``(M, B, E)`` block in memory). The rows a selector weights 0 contribute nothing either
        way."""
        if self.teacher_logits is not None or self.teacher_rows is not None:
            return
        if self.score_teachers is None:
            raise ValueError("SelectionBatch has neither teacher_logits nor score_teachers")
        if not perf.device_is_host(weights.device):
            self.teacher_logits = self.score_teachers(None)
            return
        needed = weights.T != 0
        if rewarded is not None:
            needed = needed | rewarded
        if self.score_rows is not None and not bool(needed.all()):
            self.teacher_rows = self.score_rows(needed)
        else:
            self.teacher_logits = self.score_teachers(needed)

    @property
    def logits32(self) -> torch.Tensor:
        """Every query's teacher logits ``(M, B, E)`` as float32 (a copy where they are bfloat16 or per pair), for the
        eager heuristics."""
        return self.query_logits().float()

    def query_logits(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """The teacher logits of queries ``idx`` (``None`` = all) in their own dtype, ``(M, n, E)``."""
        if self.teacher_logits is None and self.teacher_rows is not None and idx is not None and self.pair_of is None:
            return self.teacher_rows.rows(idx)
        tea = self.teachers()
        if self.pair_of is not None:
            return tea[:, self.pair_of if idx is None else self.pair_of[idx]]
        return tea if idx is None else tea[:, idx]


def masked_reward_rows(reward_rows: torch.Tensor | None, reward_index: torch.Tensor | None,
                       reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> bool:
    """Whether a policy reads ``reward_rows`` as a mask over every row rather than gathering them: off a CPU, in one
    process (no ``reduce``), unless the caller sent their index (``reward_index``)."""
    return (reward_rows is not None and reward_index is None and reduce is None
            and not perf.device_is_host(reward_rows.device))


def sample_actions(probs: torch.Tensor, generator: torch.Generator | None = None,
                   draw_rows: tuple[int, int, int] | None = None) -> torch.Tensor:
    """One action per row of ``probs (B, A)``: ``argmax(p / q)`` with ``q ~ Exp(1)``, the algorithm
    ``torch.multinomial(probs, 1, generator=generator)`` uses for one sample (equal to it, tested). The noise of
    the whole batch (``draw_rows = (start, stop, size)``, default all ``B`` rows) is drawn and rows
    ``[start, stop)`` are used: a process with a share of a batch samples what one process samples there."""
    start, stop, size = draw_rows or (0, len(probs), len(probs))
    noise = torch.empty(size, probs.shape[1], dtype=probs.dtype, device=probs.device)
    noise.exponential_(1.0, generator=generator)
    return (probs / noise[start:stop]).argmax(-1)


@dataclass
class Selection:
    """A selector's answer: ``weights (B, M)`` over teachers, or the combined ``teacher (B, E)`` logits;
    ``losses`` to add to the step (already weighted); ``stats`` to log (tensors, summed over an epoch)."""

    weights: torch.Tensor | None = None
    teacher: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


class Selector(nn.Module):
    """Base class. ``needs_student``: wants ``student_ce``/``student_logits``; ``kd_override``: the KD loss this
    selector requires whatever ``distill.kd`` says (MulDE: vanilla)."""

    name: ClassVar[str] = ""
    needs_student: ClassVar[bool] = False
    kd_override: ClassVar[str | None] = None
    chooses: ClassVar[bool] = True  # picks among several teachers (with one teacher it falls back to ``avg``)

    def __init__(self, ctx: SelectorContext, arg: str = "") -> None:
        super().__init__()
        self.ctx = ctx
        self.register_buffer("subsets", subset_matrix(ctx.num_teachers), persistent=False)

    def select(self, batch: SelectionBatch) -> Selection:  # pragma: no cover - every registered class overrides it
        raise NotImplementedError(f"{type(self).__name__} must define select()")

    def forward(self, batch: SelectionBatch) -> Selection:
        return self.select(batch)


SELECTORS: dict[str, type[Selector]] = {}


def register(name: str) -> Callable[[type[Selector]], type[Selector]]:
    def deco(cls: type[Selector]) -> type[Selector]:
        cls.name = name
        SELECTORS[name] = cls
        return cls
    return deco


def parse_selector(name: str) -> tuple[str, str]:
    """``"single:text"`` -> ``("single", "text")``; ``"rl"`` -> ``("rl", "")``."""
    key, _, arg = name.partition(":")
    return key, arg


def check_selector(name: str, modalities: list[str]) -> None:
    """A clear ``ValueError`` for an unknown selector or a ``single:`` teacher that does not exist."""
    key, arg = parse_selector(name)
    if name == "none":
        return
    if key not in SELECTORS:
        raise ValueError(f"distill.selector={name!r} is not one of {', '.join(sorted(SELECTORS))}, "
                         "single:<modality>, none")
    if key == "single" and arg not in modalities:
        raise ValueError(f"distill.selector={name!r}: no teacher '{arg}' (teachers: {', '.join(modalities)})")


def make_selector(name: str, ctx: SelectorContext) -> Selector | None:
    """The selector registered under ``name`` (``None`` for ``none``: a plain student)."""
    check_selector(name, ctx.modalities)
    if name == "none":
        return None
    key, arg = parse_selector(name)
    return SELECTORS[key](ctx, arg)


def _one_hot(index: torch.Tensor, M: int) -> torch.Tensor:
    return F.one_hot(index, M).float()


# ------------------------------------------------------------------------------------------ heuristics
def selector_class(name: str) -> type[Selector] | None:
    """The registered class of a selector name (``None`` for ``none``)."""
    return None if name == "none" else SELECTORS[parse_selector(name)[0]]


@register("avg")
class AllTeachers(Selector):
    chooses = False

    def select(self, batch: SelectionBatch) -> Selection:
        M, B = self.ctx.num_teachers, len(batch.target)
        return Selection(torch.full((B, M), 1.0 / M, device=batch.target.device))


@register("single")
class SingleTeacher(Selector):
    chooses = False

    def __init__(self, ctx: SelectorContext, arg: str = "") -> None:
        super().__init__(ctx, arg)
        self.index = ctx.modalities.index(arg)

    def select(self, batch: SelectionBatch) -> Selection:
        M, B = self.ctx.num_teachers, len(batch.target)
        return Selection(_one_hot(torch.full((B,), self.index, device=batch.target.device), M))


@register("conf")
class MostConfident(Selector):
    """The teacher with the largest top probability (ties to the lower index)."""

    def select(self, batch: SelectionBatch) -> Selection:
        conf = batch.logits32.softmax(-1).amax(-1)  # (M, B)
        return Selection(_one_hot(conf.argmax(0), conf.shape[0]))


@register("best_teacher")
class BestTeacher(Selector):
    """The teacher with the lowest CE on the query's target."""

    def select(self, batch: SelectionBatch) -> Selection:
        ce = per_query_ce(batch.logits32, batch.target)
        return Selection(_one_hot(ce.argmin(0), ce.shape[0]))


@register("best_strategy")
class BestStrategy(Selector):
    """The subset whose mean logits have the lowest CE on the target."""

    def select(self, batch: SelectionBatch) -> Selection:
        ces = action_ces(batch.logits32, self.subsets, batch.target)
        return Selection(self.subsets[ces.argmin(0)])


# ------------------------------------------------------------------------------------------ the policy
def build_policy(ctx: SelectorContext) -> nn.Module:
    """The policy network of ``distill.policy_state``: the paper's MLP on all logits, or :class:`SummaryPolicy`."""
    c, M = ctx.config, ctx.num_teachers
    if c.policy_state == "summary":
        return SummaryPolicy(M, num_actions(M), ctx.num_relations, ctx.num_entities, c.policy_hidden,
                             c.policy_relation_dim, c.policy_entity_dim, generator=ctx.generator,
                             entity_stats=ctx.entity_stats, stats_of=c.policy_entity_stats, compile=ctx.compile,
                             cache_pairs=ctx.num_pairs if c.summary_cache else 0)
    return Policy(M * ctx.num_entities, num_actions(M), c.policy_hidden, generator=ctx.generator)


def policy_logits(policy: nn.Module, kind: str, teacher_logits: torch.Tensor | None, head: torch.Tensor,
                  relation: torch.Tensor, target: torch.Tensor | None = None,
                  pair_of: torch.Tensor | None = None, keys: torch.Tensor | None = None) -> torch.Tensor:
    """Action logits ``(B, A)`` of either policy network; ``pair_of``: the logits are per pair (the state of each pair
    is read once); ``keys``: the training-pair id of each row of the logits (the summary state's cache, which may
    make ``teacher_logits`` unnecessary: ``None``)."""
    if isinstance(policy, SummaryPolicy):
        return policy(teacher_logits, head, relation, target, pair_of, keys)
    if teacher_logits is None:
        raise ValueError(f"the {kind!r} policy state needs the teacher logits")
    return policy(policy_state(teacher_logits, kind), pair_of)


def _all_action_ces(tea: torch.Tensor, subsets: torch.Tensor, target: torch.Tensor, tau: float) -> torch.Tensor:
    """``(A, n)`` CE of every action's combined teacher ``sum_m C[a, m] F^m / tau``, as one expression (the reference
    of :class:`AllActionCEs`; compiled whole, Inductor stores the ``(A, n, E)`` block, which its reductions and the
    target's gather all read)."""
    z = (subsets[:, :, None, None] * (tea.float() / tau)[None]).sum(1)
    return per_query_ce(z, target)


def _subset_logits(tea: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``(n, A, E)`` combined logits ``sum_m coef[a, m] F^m`` of teacher rows ``tea (M, n, E)``: rows first, so a compiled
    reader goes through every action of a row while the row's M teacher rows are in cache."""
    z = coef[None, :, 0, None] * tea[0].float()[:, None]
    for m in range(1, tea.shape[0]):
        z = z + coef[None, :, m, None] * tea[m].float()[:, None]
    return z


def _subset_max(tea: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``(n, A)`` row maxima of :func:`_subset_logits` (one compiled pass, nothing stored)."""
    return _subset_logits(tea, coef).amax(-1)


def _subset_ces(tea: torch.Tensor, coef: torch.Tensor, target: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """``(A, n)`` CEs ``top + log sum_e exp(z_e - top) - z_target`` of :func:`_subset_logits` ``z``, with ``top (n, A)``
    their row maxima and every exponent floored at ``EXP_FLOOR`` (:func:`~dsom.numerics.logsumexp`); the target
    logits are combined from the teachers' own (an ``(M, n)`` gather), so the one reduction is the only reader of
    ``z`` and a compiled kernel recomputes it instead of storing it."""
    total = floor_exp(_subset_logits(tea, coef) - top.unsqueeze(-1)).sum(-1)
    at_target = tea.float().gather(-1, target.view(1, -1, 1).expand(tea.shape[0], -1, 1)).squeeze(-1)  # (M, n)
    # (A, M) x (M, n) as a broadcast sum, not an fp32 matrix product: M is 2-4, and a product in the compiled graph
    # only makes Inductor warn on CUDA that TF32 is off
    return (top + torch.log(total)).T - (coef[:, :, None] * at_target[None]).sum(1)


class AllActionCEs:
    """``(A, n)`` CE of every action's combined teacher ``sum_m C[a, m] F^m / tau`` on the targets, for finite teacher
    logits ``(M, n, E)``: the expected baseline's rewards. Two compiled passes over the teacher rows (the maxima, then
    the exponentials), each recomputing the combined logits a row at a time: no ``(A, n, E)`` block is written (as
    :func:`_all_action_ces` compiled does). On 1,000 DB15K rows of three teachers 77 ms against 128 ms, on 100 rows
    11 against 15 ms (medians on a 2-core AMD EPYC, ``python benchmarks/reward_ces.py``)."""

    def __init__(self) -> None:
        self._max = MaybeCompiled(_subset_max, True)
        self._ces = MaybeCompiled(_subset_ces, True)

    def __call__(self, tea: torch.Tensor, subsets: torch.Tensor, target: torch.Tensor, tau: float) -> torch.Tensor:
        coef = subsets / tau
        return self._ces(tea, coef, target, self._max(tea, coef))


def _all_action_ces_eager(tea: torch.Tensor, subsets: torch.Tensor, target: torch.Tensor, tau: float) -> torch.Tensor:
    """:func:`_all_action_ces` one ``(n, E)`` block at a time (eager)."""
    tea = tea.float()
    return action_ces(tea / tau if tau != 1.0 else tea, subsets, target)


def _chosen_action_ces(tea: torch.Tensor, weights: torch.Tensor, target: torch.Tensor, tau: float) -> torch.Tensor:
    """``(2, n)``: the CE of each row's chosen subset ``sum_m w[b, m] F^m / tau`` and of the all-teacher mean."""
    M = tea.shape[0]
    chosen = per_query_ce(combine(weights / tau, tea), target)
    return torch.stack([chosen, per_query_ce(combine(torch.full_like(weights, 1.0 / (M * tau)), tea), target)])


@register("rl")
class PolicySelector(Selector):
    """DSoM's reinforced selector. Per query it samples a subset from the policy; on the reward rows it pays
    ``distill.reward`` (Eq. 8's +1/-10, or the CE margin over the student) against ``distill.baseline`` (the
    all-teacher reward as in the paper, the batch mean, or the reward expected under the current policy) and
    returns the REINFORCE loss ``rc`` (minus ``distill.entropy`` times the mean policy entropy)."""

    needs_student = True
    #: the paper's policy (the logits state) with an index of reward rows: its action logits are computed without
    #: autograd for every row and again with it for the reward rows (:meth:`Policy.split_forward`); False: every row
    #: with autograd, the rest of the gradient zeros (the path tests compare with)
    split_rows = True

    def __init__(self, ctx: SelectorContext, arg: str = "") -> None:
        super().__init__(ctx, arg)
        self.policy = build_policy(ctx)
        # the reward CEs of every subset (expected baseline): two compiled passes over the (M, n, E) teacher rows
        self._all_ces = AllActionCEs() if ctx.compile else _all_action_ces_eager
        self._chosen_ces = MaybeCompiled(_chosen_action_ces, ctx.compile)
        # the reward cache (enable_reward_cache): (slots, A) CEs of every subset per rewarded training query
        self.reward_cache: RowCache | None = None

    def enable_reward_cache(self, slots: int) -> None:
        """Keep the ``(A,)`` reward CEs of every subset of ``slots`` rewarded training queries (``distill.reward_cache``;
        :attr:`SelectionBatch.reward_keys` names each query's slot). They are a function of the frozen (calibrated)
        teachers, the triple and ``distill.reward_tau`` only: once every slot holds them (the cache sealed, after an
        epoch) they are read, and the teachers are scored only where the chosen subsets need them for the
        distillation loss, not on every reward row (with ``distill.reward_rows=all``: every row)."""
        self.reward_cache = RowCache(slots, self.subsets.shape[0], self.subsets.device)

    def serves_rewards(self, keys: torch.Tensor | None) -> bool:
        """Whether the reward CEs of a batch with slots ``keys`` are read from the sealed cache."""
        return self.reward_cache is not None and self.reward_cache.serves(keys)

    def action_logits(self, batch: SelectionBatch) -> torch.Tensor:
        """The policy's ``(B, A)`` action logits; a summary state read from its cache does not score the teachers."""
        cached = isinstance(self.policy, SummaryPolicy) and self.policy.serves(batch.pair_keys)
        return policy_logits(self.policy, self.ctx.config.policy_state, None if cached else batch.teachers(),
                             batch.head, batch.relation, batch.target, batch.pair_of, batch.pair_keys)

    @torch.no_grad()
    def greedy(self, teacher_logits: torch.Tensor | None, head: torch.Tensor, relation: torch.Tensor,
               target: torch.Tensor | None = None, pair_of: torch.Tensor | None = None,
               keys: torch.Tensor | None = None) -> torch.Tensor:
        """Arg-max actions ``(B,)``; ``pair_of``/``keys`` as in :func:`policy_logits` (teacher logits one row per pair,
        or ``None`` where a sealed summary cache holds every key)."""
        return policy_logits(self.policy, self.ctx.config.policy_state, teacher_logits, head, relation,
                             target, pair_of, keys).argmax(-1)

    def select(self, batch: SelectionBatch) -> Selection:
        c = self.ctx.config
        B, device = len(batch.target), batch.target.device
        rows = batch.reward_rows
        # off a CPU (one process), the reward rows are a mask over every row, not an index: no host read of the mask,
        # and the same shapes in every step (a CUDA graph); the rows outside the mask count for nothing
        valid = rows if rows is not None and self.masks_reward_rows(batch) else None
        idx = (torch.arange(B, device=device) if rows is None or valid is not None
               else rows.nonzero().squeeze(1) if batch.reward_index is None else batch.reward_index)
        row_logits = None  # the reward rows' action logits with autograd, where computed apart from the others
        if (self.split_rows and rows is not None and valid is None and batch.pair_of is None
                and isinstance(self.policy, Policy) and torch.is_grad_enabled()):
            logits, row_logits = self.policy.split_forward(policy_state(batch.teachers(), c.policy_state), idx)
        else:
            logits = self.action_logits(batch)
        probs = logits.detach().float().softmax(-1)
        actions = sample_actions(probs, batch.generator, batch.draw_rows)
        A = probs.shape[1]
        stats: dict[str, torch.Tensor] = {
            "actions": torch.zeros(A, dtype=torch.int64, device=actions.device).scatter_add_(
                0, actions, torch.ones_like(actions)),
            "entropy": entropy(logits.detach().float()).sum(), "rows": torch.tensor(float(len(actions)))}
        losses: dict[str, torch.Tensor] = {}
        total: int | torch.Tensor = len(idx)  # reward rows in the whole batch (summed over processes under torchrun)
        if valid is not None:
            total = valid.float().sum().clamp(min=1)  # (0 rows: every term below is a sum of zeros)
        elif batch.reduce is not None:
            total = int(batch.reduce(torch.tensor(float(total), device=logits.device)).item())
        weights = self.subsets[actions]
        if (valid is not None or total > 0) and (batch.student_ce is not None or c.reward == "margin"):
            # the teachers (unless already scored): every one on the reward rows, elsewhere the chosen ones; with
            # the rewards' CEs cached none here (the distillation loss scores the chosen ones, materialise)
            if not self.serves_rewards(batch.reward_keys):
                if rows is None:
                    batch.teachers()
                else:
                    batch.materialise(weights, rows)
            losses["rc"], more = self._policy_loss(batch, logits, probs, actions, idx, total, valid, row_logits)
            stats.update(more)
        else:  # no reward row in this batch: no gradient, but keep the graph shape
            losses["rc"] = (logits if row_logits is None else row_logits).sum() * 0.0
        return Selection(weights, losses=losses, stats=stats)

    @staticmethod
    def masks_reward_rows(batch: SelectionBatch) -> bool:
        """Whether the reward rows are read as a mask over every row (:meth:`_policy_loss`'s ``valid``) rather than
        gathered (:func:`masked_reward_rows`)."""
        return masked_reward_rows(batch.reward_rows, batch.reward_index, batch.reduce)

    def _policy_loss(self, batch: SelectionBatch, logits: torch.Tensor, probs: torch.Tensor, actions: torch.Tensor,
                     idx: torch.Tensor, total: int | torch.Tensor, valid: torch.Tensor | None = None,
                     row_logits: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The REINFORCE loss and statistics over the reward rows ``idx``. With ``batch.reduce`` (torchrun) the
        batch is one process's share: every mean over the reward rows becomes this share's sum over ``total``,
        the reward rows of the whole batch, and the batch-wide baseline and advantage scale are reduced, so the
        processes' losses and statistics add up to one process's. With ``valid (B,)`` bool (``idx`` = every row,
        ``total`` its count as a device scalar, at least 1) the reward rows are those where it is true: every mean and
        sum runs over them and the other rows add zeros, with no host read (the same values as gathering them).
        ``row_logits (n,)``: the action logits of the rows ``idx`` with autograd (``None``: ``logits[idx]``)."""
        c = self.ctx.config
        red = batch.reduce

        def mean(x: torch.Tensor) -> torch.Tensor:
            if valid is not None:
                return torch.where(valid, x, 0.0).sum() / total
            return x.mean() if red is None else x.sum() / total

        a = actions[idx]
        student_ce = (batch.student_ce[idx] if batch.student_ce is not None
                      else torch.zeros(len(idx), device=a.device))
        full = self.subsets.shape[0] - 1
        every_action = c.baseline == "expected" or c.policy_gradient == "expected"
        keys = None
        if batch.reward_keys is not None and self.reward_cache is not None:
            keys = batch.reward_keys[idx]
        if self.serves_rewards(batch.reward_keys):
            assert self.reward_cache is not None and keys is not None
            ces = self.reward_cache.read(keys).T  # (A, n), as computed in an earlier epoch
        else:
            every = batch.reward_rows is None or valid is not None  # idx = every row: no (M, n, E) copy
            tea = batch.query_logits(None if every else idx)
            target = batch.target if every else batch.target[idx]
            if every_action or keys is not None:  # (the cache holds every subset's CE)
                ces = self._all_ces(tea, self.subsets, target, c.reward_tau)  # (A, n)
                if keys is not None and self.reward_cache is not None:
                    self.reward_cache.store(keys, ces.T, valid)  # (the rows outside valid have no slot)
            else:  # only the chosen subset and the all-teacher mean are needed
                ces = self._chosen_ces(tea, self.subsets[a], target, c.reward_tau)  # (2, n)
        if not every_action and ces.shape[0] != 2:  # the chosen subset's CE and the all-teacher mean's
            ces = torch.stack([ces.gather(0, a.unsqueeze(0)).squeeze(0), ces[full]])
        rewards = action_rewards(ces, student_ce, c.reward, c.reward_positive, c.reward_negative)
        p = probs[idx]
        if ces.shape[0] == 2:
            reward, all_reward = rewards[0], rewards[1]
        else:
            reward, all_reward = rewards.gather(0, a.unsqueeze(0)).squeeze(0), rewards[full]
        if c.baseline == "avg_action":
            base = all_reward
        elif c.baseline == "batch_mean":
            base = (mean(reward) if red is None else red(reward.sum()) / total).expand_as(reward)
        else:  # the reward expected under the current policy: an action-dependent advantage with mean 0
            base = (p * rewards.T).sum(-1)
        delta = reward - base
        scale = torch.ones((), device=delta.device)
        if c.advantage_norm and valid is not None:  # the standard deviation over the valid rows (1 below two rows)
            assert isinstance(total, torch.Tensor)
            spread = torch.where(valid, (delta - mean(delta)) ** 2, 0.0).sum() / (total - 1).clamp(min=1)
            scale = torch.where(total > 1, spread.sqrt().clamp(min=1e-6), scale)
        elif c.advantage_norm and total > 1:
            if red is None:
                scale = delta.std().clamp(min=1e-6)
            else:  # the standard deviation over the whole batch, in two passes like Tensor.std
                mu = red(delta.sum()) / total
                scale = (red(((delta - mu) ** 2).sum()) / (total - 1)).sqrt().clamp(min=1e-6)
        lg = logits[idx] if row_logits is None else row_logits
        if c.policy_gradient == "expected":  # exact gradient of E_pi[R - b] (no sampling noise)
            adv = (rewards.T - base.unsqueeze(1)) / scale
            loss = -mean((lg.float().softmax(-1) * adv.detach()).sum(-1))
        elif red is None and valid is None:
            loss = reinforce_loss(lg, a, delta / scale)
        else:
            loss = -mean((delta / scale).detach() * F.log_softmax(lg, -1).gather(1, a.unsqueeze(1)).squeeze(1))
        if c.entropy > 0:
            loss = loss - c.entropy * mean(entropy(lg.float()))
        A = probs.shape[1]
        counted = torch.ones_like(delta) if valid is None else valid.to(delta.dtype)
        kept = delta if valid is None else torch.where(valid, delta, 0.0)
        stats = {"delta": mean(delta), "reward": mean(reward), "reward_baseline": mean(base),
                 "reward_count": counted.sum(),  # (0 in a masked batch without a reward row: no step to log)
                 "advantage_sum": torch.zeros(A, device=delta.device).index_add_(0, a, kept),
                 "advantage_count": torch.zeros(A, device=delta.device).index_add_(0, a, counted)}
        return loss, stats


# ------------------------------------------------------------------------------------------ MulDE sketch
@register("mulde")
class MulDESenior(Selector):
    """SPEC §6 sketch: relation-specific positive scales ``c_{r,m}`` (softplus, initialised to 1) and per-query
    contrast attention ``softmax_m(-KL(softmax(c F^m / tau) || student) / T_a)``; the Senior is trained with its
    own CE (loss ``senior``) and the student distils it with vanilla KD."""

    needs_student = True
    kd_override = "vanilla"

    def __init__(self, ctx: SelectorContext, arg: str = "") -> None:
        super().__init__(ctx, arg)
        self.scale = nn.Parameter(torch.full((ctx.num_relations, ctx.num_teachers), math.log(math.e - 1.0)))

    def select(self, batch: SelectionBatch) -> Selection:
        c = self.ctx.config
        assert batch.student_logits is not None
        scaled = F.softplus(self.scale[batch.relation]).T.unsqueeze(-1) * batch.logits32  # (M, B, E)
        student = batch.student_logits if batch.pair_of is None else batch.student_logits[batch.pair_of]
        ls = F.log_softmax(student.float() / c.tau, -1)
        kl = (F.softmax(scaled / c.tau, -1) * (F.log_softmax(scaled / c.tau, -1) - ls)).sum(-1)  # (M, B)
        attention = torch.softmax(-kl / c.mulde_attention_temperature, 0)
        senior = (attention.unsqueeze(-1) * scaled).sum(0)
        return Selection(teacher=senior, losses={"senior": F.cross_entropy(senior, batch.target)},
                         stats={"attention": attention.mean(1).detach()})
