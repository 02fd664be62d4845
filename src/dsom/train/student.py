"""Stage 2: train the unimodal ComplEx student with CE + L_RC + gamma L_NDKD (SPEC §5) or a variant.

The trainer reuses the epoch loop of :class:`~dsom.train.loop.Trainer` (shuffling, Adagrad, validation on
valid, early stopping, resume). The policy's action sampling draws from a generator seeded by
``(seed, epoch, batch)``, so a resumed run samples exactly what an uninterrupted one would. Per step it
logs the batch means of delta, R and R_hat; per epoch the sampled-action histogram. After training,
:meth:`StudentTrainer.policy_analysis` takes the arg-max action of every training query (Fig. 3).
"""

from __future__ import annotations

import copy
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dsom import distributed, perf
from dsom.config import Config, apply_dict
from dsom.data.graph import KGDataset
from dsom.data.pairs import PairIndex, epoch_permutation, group_pairs
from dsom.distill.actions import action_names
from dsom.distill.distiller import NEIGHBOUR_MASK_DTYPE, Distiller
from dsom.distill.kd import KD_LOSSES, NO_KD
from dsom.distill.policy import SummaryPolicy
from dsom.distill.rowcache import RowCache
from dsom.distill.selectors import PolicySelector, SelectionBatch
from dsom.errors import DsomError
from dsom.models.teachers import FrozenTeachers
from dsom.perf import compile_enabled
from dsom.train.checkpoint import save_checkpoint
from dsom.train.loop import BatchHook, StepLoss, Trainer

TRAIN_FORMAT = "dsom-student-train/2"


def student_config(cfg: Config, overrides: Mapping[str, Any] | None = None) -> Config:
    """The configuration a student run uses: ``distill.epochs`` replaces ``train.epochs`` when set."""
    out = copy.deepcopy(cfg)
    apply_dict(out, dict(overrides or {}))
    if out.distill.epochs > 0:
        out.train.epochs = out.distill.epochs
    return out



def _policy_adam(params: Any, lr: float) -> torch.optim.Adam:
    """The policy's Adam, with torch's fused kernel: one pass over the weights instead of about ten (the paper's
    logits policy has 39.5M weights on DB15K; its unfused update took 290 ms per step on the 2-core AMX dev machine).
    The same update to float rounding. On CUDA it is ``capturable`` (its step count on the device), so that a CUDA graph
    can hold it (train.cuda_graphs), eager steps included: both then run the same kernels."""
    params = list(params)
    cuda = bool(params) and params[0].device.type == "cuda"
    opt = torch.optim.Adam(params, lr=lr, fused=True if params else None, capturable=cuda)
    opt._warned_capturable_if_run_uncaptured = True  # (eager steps are meant: no warning that they are uncaptured)
    return opt

class StudentTrainer(Trainer):
    checkpoint_format = TRAIN_FORMAT
    supports_pair_batching = True  # the student and teachers score each pair once; rewards stay per query
    # captured on CUDA: the policy's draws from one re-seeded generator, the neighbour pairs listed on the device in a
    # fixed-size tensor, the reward rows read as a mask; a cache sealing, the KD warm-up's weight changing or a batch
    # with more neighbour pairs than the capacity is a new capture (graph_key)
    supports_cuda_graphs = True
    #: a captured step builds the neighbour pairs of up to this many times the mean batch's (more: a new capture)
    pair_headroom = 1.5

    def configured_batching(self, cfg: Config) -> str:
        return cfg.distill.batching

    def __init__(self, dataset: KGDataset, cfg: Config, run_dir: str | Path, teachers: FrozenTeachers,
                 name: str = "student", progress: bool = True, batch_hook: BatchHook | None = None,
                 reward_rows: torch.Tensor | None = None, temperatures: torch.Tensor | None = None,
                 entity_stats: torch.Tensor | None = None) -> None:
        """``reward_rows``: bool over the reciprocal train queries, True where the teachers never saw the triple
        (the policy is rewarded only there; ``None`` = everywhere). ``temperatures``: ``(M,)`` teacher temperatures
        (``None`` = 1). ``entity_stats``: ``(E, M)`` per-entity teacher reliability for the policy state."""
        self.teachers = teachers
        self.entity_stats = entity_stats
        self.name = name
        self.temperatures = temperatures
        self._epoch_sums: dict[str, torch.Tensor] = {}
        self._step_stats: list[tuple[int, int]] = []  # (epoch, step) of the rows of _step_buffer filled this epoch
        # (steps, 4): delta, R, R_hat and the number of reward rows per step, on the device
        self._step_buffer: torch.Tensor | None = None
        self.step_outputs: dict[str, torch.Tensor] = {}  # the last step's statistics (after_step reads them)
        self._generator: torch.Generator | None = None  # the policy's draws, re-seeded for every batch
        # a CUDA graph's neighbour pairs are built on the device in tensors of this size (graph_inputs sets it)
        self._pair_capacity = 0
        # the distinct (entity, relation) pair of every training query: batches under distill.batching=pairs and the
        # keys of the summary policy's state cache
        self.query_pairs = PairIndex(torch.from_numpy(dataset.queries("train")))
        cfg = student_config(cfg)
        super().__init__(dataset, cfg, run_dir, stage="distill" if name == "student" else f"distill:{name}",
                         progress=progress, batch_hook=batch_hook, checkpoint_subdir=name)
        self._pairs = self.query_pairs
        self._query_pair_ids = self.query_pairs.pair_of.to(self.device)
        self.neighbours_cpu = dataset.neighbour_index
        self.neighbours = self.neighbours_cpu.to(self.device)
        if reward_rows is not None and len(reward_rows) != len(self.train_queries):
            raise ValueError(f"reward_rows has {len(reward_rows)} rows for {len(self.train_queries)} train queries")
        use_rows = reward_rows is not None and self.cfg.distill.reward_rows == "holdout"
        self.reward_rows = reward_rows.to(self.device) if use_rows else None
        self.reward_rows_cpu = reward_rows.cpu() if use_rows and reward_rows is not None else None
        # each training query's slot in the policy's reward cache (-1: never rewarded), None = no cache
        self._reward_slots: torch.Tensor | None = None
        selector = self.model.selector
        if isinstance(selector, PolicySelector) and self.cfg.distill.reward_cache:
            rewarded = (torch.ones(len(self.train_queries), dtype=torch.bool, device=self.device)
                        if self.reward_rows is None else self.reward_rows)
            self._reward_slots = torch.where(rewarded, rewarded.long().cumsum(0) - 1, -1)
            selector.enable_reward_cache(int(rewarded.sum()))
        self.policy_optimizer: torch.optim.Optimizer | None = None
        if self._own_policy_optimizer():
            self.policy_optimizer = _policy_adam(self.model.selector.parameters(), self.cfg.distill.policy_lr or 1e-3)

    def fit(self, resume: bool = False) -> Any:
        if not (resume and self.resume_available()) and self.cfg.distill.policy_pretrain_epochs > 0:
            self.pretrain_policy()
        return super().fit(resume=resume)

    def resume_available(self) -> bool:
        return (self.ckpt_dir / "last" / "model.safetensors").exists() or (
            self.ckpt_dir / "last.old" / "model.safetensors").exists()

    def pretrain_policy(self) -> None:
        """Fit the policy on the held-out queries before the student starts (``distill.policy_pretrain_epochs``).

        With the margin reward the student's CE cancels from every advantage (``R(a) - b`` is a difference of
        teacher-subset CEs for every baseline), so the policy can learn which subsets predict held-out triples
        best without a student. Logged as stage ``<stage>:policy``."""
        dc = self.cfg.distill
        model: Distiller = self.model
        if model.policy is None or self.reward_rows is None:
            return
        if dc.reward != "margin":
            raise DsomError("distill.policy_pretrain_epochs needs distill.reward=margin (the binary reward compares "
                            "with a student that does not exist yet)")
        opt = self.policy_optimizer or _policy_adam(model.selector.parameters(), dc.policy_lr or 1e-3)
        q = self.train_queries[self.reward_rows]
        bs = self.cfg.train.batch_size
        model.train()
        split = distributed.active()  # under torchrun each process takes its share of every batch, as in training
        for epoch in range(1, dc.policy_pretrain_epochs + 1):
            perm = epoch_permutation(len(q), self.cfg.train.seed + 7919, epoch).to(self.device)
            gen = torch.Generator(device=self.device).manual_seed(self.cfg.train.seed * 7919 + epoch)
            ent = torch.zeros((), device=self.device)
            for s in range(0, len(q), bs):
                lo, hi = s, min(s + bs, len(q))
                draw, rows, stand_in = None, None, False
                if split:
                    a, z = distributed.share(lo, hi)
                    draw, stand_in = (a - lo, z - lo, hi - lo), a == z
                    if stand_in:  # fewer rows than processes: a stand-in row that is rewarded nowhere
                        a, z, draw = lo, lo + 1, (0, 1, hi - lo)
                        rows = torch.zeros(1, dtype=torch.bool, device=self.device)
                    lo, hi = a, z
                b = q[perm[lo:hi]]
                choice = model.selector(SelectionBatch(model.teacher_scores(b[:, 0], b[:, 1], self.precision), b[:, 0],
                                                       b[:, 1], b[:, 2], student_ce=torch.zeros(len(b), device=b.device),
                                                       reward_rows=rows, generator=gen, draw_rows=draw,
                                                       reduce=distributed.sum_ if split else None))
                opt.zero_grad(set_to_none=True)
                choice.losses["rc"].backward()
                distributed.reduce_gradients(model.selector.parameters())
                opt.step()
                if not stand_in:
                    ent += choice.stats["entropy"]
            distributed.sum_(ent)
            self.tracker.log({"stage": f"{self.stage}:policy", "epoch": epoch,
                              "policy_entropy": round(float(ent) / max(len(q), 1), 6)})
        opt.zero_grad(set_to_none=True)

    def _own_policy_optimizer(self) -> bool:
        return self.cfg.distill.policy_optimizer == "adam" and self.model.policy is not None

    def build_model(self, generator: torch.Generator) -> Distiller:
        rank = self.cfg.distill.student_rank or self.cfg.model.rank
        cells = self.cfg.train.batch_size * self.ds.num_entities
        return Distiller(self.teachers.to(self.device), 2 * self.ds.num_relations, rank, self.cfg.distill,
                         self.cfg.model.init_scale, generator=generator,
                         compile=compile_enabled(self.cfg.train.compile, self.device.type, cells),
                         temperatures=self.temperatures, entity_stats=self.entity_stats,
                         num_pairs=self.query_pairs.num_pairs)

    def trainable_parameters(self) -> list[Any]:
        model: Distiller = self.model
        lr = self.cfg.distill.policy_lr
        if model.policy is None:
            return list(model.parameters())
        selector = set(id(p) for p in model.selector.parameters())
        rest = [p for p in model.parameters() if id(p) not in selector]
        if self._own_policy_optimizer():
            return rest  # the policy has its own optimizer
        if lr > 0:
            return [{"params": rest}, {"params": list(model.selector.parameters()), "lr": lr}]
        return list(model.parameters())

    def num_parameters(self) -> int:
        """Student parameters only (the paper's 53.6M on DB15K excludes the policy, SPEC A20)."""
        return self.model.student.num_parameters()

    def extra_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters()) - self.num_parameters()

    def model_meta(self) -> dict[str, Any]:
        s = self.model.student
        return {"type": "distiller", "name": self.name, "rank": s.rank, "num_entities": s.num_entities,
                "num_relations": s.num_relations, "original_relations": self.ds.num_relations,
                "teachers": self.teachers.modalities, "selector": self.cfg.distill.selector, "kd": self.cfg.distill.kd}

    def _neighbour_mask(self, batch: torch.Tensor, batch_cpu: torch.Tensor | None = None,
                        host_lookup: bool | None = None,
                        pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``(B, E)`` mask of each query's training answers and its target, on the batch's device (bool, or 0/1
        bfloat16 where :data:`~dsom.distill.distiller.NEIGHBOUR_MASK_DTYPE` says so: CPUs); with
        ``pairs`` (:func:`~dsom.data.pairs.group_pairs` of the batch) ``(P, E)``, one row per pair (its answers and
        all its queries' targets).

        The CSR lookup has a data-dependent size. On a GPU the host counts the batch's pairs from its copy of the batch
        (a lookup of the batch's keys, about 0.1 ms) and the device lists them in a tensor of that size
        (:meth:`~dsom.data.csr.CSRIndex.padded_pairs`), so the step never waits for the device and the host never
        lists the pairs (3.5 ms per DB15K batch of 1,000 on a 2-core EPYC, about as long as a GPU's whole step);
        under pair batching the host lists them and sends them over asynchronously. In a captured step the tensor has
        the graph's fixed size (:meth:`graph_inputs`)."""
        t = batch[:, 2]
        e, r, of = (batch[:, 0], batch[:, 1], None) if pairs is None else pairs
        dtype = NEIGHBOUR_MASK_DTYPE.get(batch.device.type, torch.bool)  # 0/1 bfloat16 on CPUs: faster to read
        mask = torch.zeros(len(e), self.ds.num_entities, dtype=dtype, device=batch.device)
        if host_lookup is None:
            host_lookup = not perf.device_is_host(batch.device) and batch_cpu is not None
        if self.capturing and self._pair_capacity and pairs is None:  # fixed size, padded with a pair set below too
            rows, cols = self.neighbours.padded_pairs(e, r, self._pair_capacity, fill=(0, t[0]))
        elif host_lookup and pairs is None:
            assert batch_cpu is not None
            rows, cols = self.neighbours.padded_pairs(e, r, self._count_pairs(batch_cpu))
        elif host_lookup:
            assert batch_cpu is not None
            rows, cols = self.neighbours_cpu.pairs(*group_pairs(batch_cpu)[:2])
            rows, cols = _async_to(rows, batch.device), _async_to(cols, batch.device)
        else:
            rows, cols = self.neighbours.pairs(e, r)
        mask[rows, cols] = 1
        mask[torch.arange(len(batch), device=batch.device) if of is None else of, t] = 1
        return mask

    def _kd_weight(self) -> float | None:
        """The KD weight of the current epoch under ``distill.kd_warmup_epochs`` (``None``: gamma)."""
        dc = self.cfg.distill
        return dc.gamma * min(1.0, self.current_epoch / dc.kd_warmup_epochs) if dc.kd_warmup_epochs > 0 else None

    def _step_generator(self) -> torch.Generator:
        """The generator of the policy's draws, seeded by ``(seed, epoch, batch)`` (the same draws as a fresh generator
        with that seed); while a CUDA graph records, :meth:`graph_inputs` has seeded it."""
        if self._generator is None:
            self._generator = torch.Generator(device=self.device)
        if not self.capturing:
            self._generator.manual_seed(self.cfg.train.seed * 1_000_003 + self.current_epoch * 100_003
                                        + self.current_batch)
        return self._generator

    def _needs_neighbours(self) -> bool:
        sel, dc = self.model.selector, self.cfg.distill
        kind = (sel.kd_override or dc.kd) if sel is not None else NO_KD
        return kind != NO_KD and KD_LOSSES[kind].needs_neighbours

    def graph_inputs(self) -> None:
        """Seed the policy's generator for this batch, and make sure the neighbour pairs of the batch fit the capacity
        the captured step builds them in (:meth:`~dsom.data.csr.CSRIndex.padded_pairs`, on the device): the host only
        counts the batch's pairs (grown capacity: a new capture, :meth:`graph_key`)."""
        self._step_generator()
        if not self._needs_neighbours():
            return
        batch_cpu = self.current_batch_cpu
        assert batch_cpu is not None, "graph_inputs needs the host's copy of the batch"
        if self._pair_capacity == 0:  # (DB15K: a mean batch has 332k pairs, the largest of 200 random ones 1.31x that)
            mean = self._count_pairs(self.train_queries_cpu) / len(self.train_queries_cpu) * self.cfg.train.batch_size
            self._pair_capacity = _round_up(int(self.pair_headroom * mean) + 1, 256)
        total = self._count_pairs(batch_cpu)
        if total > self._pair_capacity:
            self._pair_capacity = _round_up(max(2 * self._pair_capacity, total), 256)

    def _count_pairs(self, queries_cpu: torch.Tensor) -> int:
        """The number of (query, known answer) pairs of host queries ``(n, 3)`` (a lookup of their keys: 0.12 ms for a
        DB15K batch of 1,000 on a 2-core EPYC, ``benchmarks/neighbour_pairs.py``)."""
        return int(self.neighbours_cpu.counts(queries_cpu[:, 0], queries_cpu[:, 1]).sum())

    def graph_key(self) -> Hashable:
        """What a captured stage-2 step reads from the host: whether each cache is sealed (read, not filled), the KD
        weight of the warm-up, the neighbour pairs' capacity."""
        return tuple(c.sealed for _, c in self._caches()), self._kd_weight(), self._pair_capacity

    def graph_generators(self) -> list[torch.Generator]:
        return [self._step_generator()] if self.model.policy is not None else []

    def loss(self, batch: torch.Tensor) -> StepLoss:
        tr = self.cfg.train
        kd_weight = self._kd_weight()
        gen = self._step_generator()
        needs_mask = self._needs_neighbours()
        batch_cpu = self.current_batch_cpu  # set by the epoch loop for this very batch, else None
        rows = None
        if self.reward_rows is not None and self.current_batch_index is not None:
            rows = self.reward_rows[self.current_batch_index]
        share = self.share  # under torchrun: this process's rows of the batch
        if share is not None and share.weight == 0:  # a stand-in row: rewarded nowhere
            rows = torch.zeros(len(batch), dtype=torch.bool, device=batch.device)
        reward_index = self._reward_index(batch.device, rows is not None and share is not None and share.weight == 0)
        pairs = group_pairs(batch) if self.batching == "pairs" else None
        keys = None  # the training-pair id of each scored row: the summary policy's state cache
        if self._summary_cache() is not None and self.current_batch_index is not None:
            keys = self._query_pair_ids[self.current_batch_index]
            if pairs is not None:  # one row per pair of the batch: any of its queries names it
                keys = keys.new_empty(len(pairs[0])).scatter_(0, pairs[2], keys)
        reward_keys = None
        if self._reward_slots is not None and self.current_batch_index is not None:
            reward_keys = self._reward_slots[self.current_batch_index]
        losses, stats = self.model(batch, self._neighbour_mask(batch, batch_cpu, pairs=pairs) if needs_mask else None,
                                   precision=self.precision, regularizer=tr.regularizer, reg=tr.reg,
                                   kd_weight=kd_weight, generator=gen, reward_rows=rows,
                                   draw_rows=share.draw_rows if share is not None else None,
                                   reduce=distributed.sum_ if share is not None else None,
                                   pairs=pairs, pair_keys=keys, reward_keys=reward_keys, reward_index=reward_index)
        self.step_outputs = stats
        return StepLoss(losses)

    def _reward_index(self, device: torch.device, stand_in: bool) -> torch.Tensor | None:
        """Under torchrun off a CPU, the batch's rewarded rows ``(n,)`` taken from the host's copy and sent over
        asynchronously, so that a GPU step never waits to learn them (``nonzero`` of the device mask would); ``None``
        on a CPU (the mask is read where it is), in one process (the policy reads the mask as a mask:
        :meth:`~dsom.distill.selectors.PolicySelector.masks_reward_rows`), without rewarded rows or the host's batch
        index."""
        if (perf.device_is_host(device) or self.share is None or self.reward_rows_cpu is None
                or self.current_batch_index_cpu is None):
            return None
        if stand_in:
            return torch.zeros(0, dtype=torch.int64, device=device)
        return _async_to(self.reward_rows_cpu[self.current_batch_index_cpu].nonzero().squeeze(1), device)

    def weigh_share(self, step: StepLoss) -> StepLoss:
        """Like the base class, except the policy's ``rc``: the selector already made it this process's part of
        the mean over the whole batch's reward rows (which a share-size weight would not give)."""
        w = self.share.weight if self.share is not None else 1.0
        return StepLoss({k: v if k in GLOBAL_TERMS else v * w for k, v in step.terms.items()},
                        {k: v * w for k, v in step.logged.items()})

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer, *([self.policy_optimizer] if self.policy_optimizer is not None else [])]

    def _summary_cache(self) -> SummaryPolicy | None:
        """The summary policy when it caches its states (``distill.summary_cache``)."""
        policy = self.model.policy
        return policy if isinstance(policy, SummaryPolicy) and policy.cache is not None else None

    def extra_train_state(self) -> dict[str, Any]:
        out: dict[str, Any] = {"policy_optimizer": self.policy_optimizer.state_dict()} if self.policy_optimizer else {}
        # saved so a resumed run reads the same states and reward CEs as an uninterrupted one (without a first epoch
        # that scores every teacher again)
        for name, cache in self._caches():
            out[name] = cache.state()
        return out

    def _caches(self) -> list[tuple[str, RowCache]]:
        """The policy's caches of what depends on the frozen teachers only, by name: the summary states per training
        pair and the reward CEs per rewarded query (each sealed once every row is in)."""
        policy, sel = self.model.policy, self.model.selector
        caches = [("summary_cache", policy.cache if isinstance(policy, SummaryPolicy) else None),
                  ("reward_cache", sel.reward_cache if isinstance(sel, PolicySelector) else None)]
        return [(name, cache) for name, cache in caches if cache is not None]

    def load_extra_train_state(self, state: dict[str, Any]) -> None:
        if self.policy_optimizer is not None and "policy_optimizer" in state:
            self.policy_optimizer.load_state_dict(state["policy_optimizer"])
        for name, cache in self._caches():
            cache.load_state(state.get(name))

    def after_update(self) -> None:
        if self.policy_optimizer is not None:  # (its gradients are cleared before the next backward)
            self.policy_optimizer.step()

    def after_step(self, epoch: int, batch: int) -> None:
        st = self.step_outputs
        stand_in = self.share is not None and self.share.weight == 0  # counts nothing (its policy terms are 0)
        for key in EPOCH_SUMS:  # summed on the device, read once per epoch
            if key in st:
                v = st[key].detach()
                if stand_in:
                    v = torch.zeros_like(v)
                if key in self._epoch_sums and self._epoch_sums[key].device == v.device:
                    self._epoch_sums[key] += v
                else:
                    self._epoch_sums[key] = v.clone().double() if v.is_floating_point() else v.clone()
        if "delta" in st:  # kept on the device and written once per epoch: no host sync per step on a GPU
            if self._step_buffer is None or self._step_buffer.device != st["delta"].device:
                steps = -(-len(self.train_queries) // self.cfg.train.batch_size)
                self._step_buffer = torch.zeros(steps, 4, device=st["delta"].device)  # preallocated: no heap churn
            if batch < len(self._step_buffer):
                self._step_buffer[batch] = torch.stack([st["delta"], st["reward"], st["reward_baseline"],
                                                        st["reward_count"]])
                self._step_stats.append((epoch, batch))

    def _flush_step_stats(self) -> None:
        if not self._step_stats:
            return
        assert self._step_buffer is not None
        if distributed.active():  # each process holds its share of each step's means: their sums are the means
            distributed.sum_(self._step_buffer)
        values = self._step_buffer.cpu().tolist()
        self._step_buffer.zero_()
        for epoch, step in self._step_stats:
            delta, reward, base, count = values[step]
            if count == 0:  # a batch without a reward row (read as a mask off a CPU): nothing was rewarded
                continue
            self.tracker.log({"stage": self.stage, "epoch": epoch, "step": step, "delta": delta, "reward": reward,
                              "reward_baseline": base})
        self._step_stats.clear()

    def epoch_extras(self, epoch: int) -> dict[str, Any]:
        # an epoch visits every training pair and rewarded query: from now on the caches are read (under torchrun
        # once every process's rows are merged in: the sealed flags are the same on every process, so all of them
        # take part in the merge or none)
        for _, cache in self._caches():
            if not cache.sealed:
                distributed.merge_filled(cache.values, cache.filled)
            cache.seal()
        self._flush_step_stats()
        if distributed.active():  # the epoch's counts over every process's shares (the same keys everywhere)
            self._epoch_sums = {k: distributed.sum_(v.to(self.device)) for k, v in sorted(self._epoch_sums.items())}
        sums = {k: v.cpu() for k, v in self._epoch_sums.items()}
        self._epoch_sums = {}
        if self.model.policy is None or "actions" not in sums or int(sums["actions"].sum()) == 0:
            return {}
        names = action_names(self.teachers.modalities)
        out: dict[str, Any] = {"actions": dict(zip(names, sums["actions"].tolist()))}
        if "entropy" in sums:
            out["policy_entropy"] = round(float(sums["entropy"] / sums["rows"].clamp(min=1)), 6)
        if "advantage_sum" in sums:
            count = sums["advantage_count"]
            out["mean_advantage"] = {n: round(float(a / c), 6) for n, a, c in
                                     zip(names, sums["advantage_sum"], count) if c > 0}
            out["reward_queries"] = int(count.sum())
        return out

    def validation_scorer(self) -> Any:
        return self.model.student

    def save_final(self) -> Path:
        """The selected student as a plain ComplEx checkpoint (``checkpoints/<name>/final``)."""
        meta = {"stage": self.stage, "epoch": self.state.best_epoch or self.state.epoch, "config": self.cfg.to_dict(),
                "distill": self.model_meta()}
        return save_checkpoint(self.ckpt_dir / "final", self.model.student, self.ds, meta)

    @torch.no_grad()
    def policy_analysis(self) -> dict[str, Any] | None:
        """Arg-max action shares over all training queries, overall and per relation (Fig. 3), and on the
        synthetic dataset the agreement with the planted helpful/misleading teachers."""
        model: Distiller = self.model
        if model.policy is None:
            return None
        model.eval()
        q = torch.from_numpy(self.ds.queries("train")).to(self.device)
        actions = model.greedy_actions(q, self.cfg.eval.batch_size, self._query_pair_ids).cpu()
        names = action_names(self.teachers.modalities)
        A = len(names)
        overall = torch.bincount(actions, minlength=A).double() / max(len(actions), 1)
        out: dict[str, Any] = {"actions": {n: round(float(x), 6) for n, x in zip(names, overall)}}
        rel = q[:, 1].cpu()
        R = self.ds.num_relations
        per: dict[str, Any] = {}
        for r in torch.unique(rel).tolist():
            sel = actions[rel == r]
            label = self.ds.relations.labels[r % R] + (" (inverse)" if r >= R else "")
            share = torch.bincount(sel, minlength=A).double() / len(sel)
            per[label] = {"queries": int(len(sel)),
                          **{n: round(float(x), 6) for n, x in zip(names, share) if x > 0}}
        out["per_relation"] = per
        truth = self.ds.extras.get("synthetic")
        if truth is not None and list(truth.teachers[:len(self.teachers.modalities)]) == self.teachers.modalities[
                :len(truth.teachers)]:
            out.update(planted_agreement(actions.numpy(), truth, self.teachers.modalities))
        return out


EPOCH_SUMS = ("actions", "entropy", "rows", "advantage_sum", "advantage_count")
GLOBAL_TERMS = ("rc",)  # losses the selector normalises over the whole batch itself (StudentTrainer.weigh_share)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _async_to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> device without blocking the host (pinned staging where CUDA exists)."""
    if device.type == "cuda":
        x = x.pin_memory()
    return x.to(device, non_blocking=True)


def planted_agreement(actions: np.ndarray, truth: Any, modalities: list[str]) -> dict[str, Any]:
    """Share of training queries whose action contains every planted-helpful teacher and no planted-misleading
    one (docs/training.md), with the same share for always choosing all teachers and for a uniform random action."""
    cols = [list(truth.teachers).index(m) for m in modalities]
    helpful = truth.helpful_subset("train", "both")[:, cols]
    misleading = truth.misleading_subset("train", "both")[:, cols]
    M = len(modalities)
    members = ((np.arange(1, 2**M)[:, None] >> np.arange(M)) & 1).astype(bool)  # (A, M)

    def agree(chosen: np.ndarray) -> np.ndarray:
        return (~(helpful & ~chosen)).all(1) & ~(misleading & chosen).any(1)

    per_action = np.stack([agree(np.broadcast_to(members[a], helpful.shape)) for a in range(len(members))], 1)
    chosen = members[actions]
    return {"planted_agreement": float(per_action[np.arange(len(actions)), actions].mean()),
            # where the disagreement comes from: a helpful teacher left out, a misleading teacher taken
            "planted_missed_helpful": {m: round(float((helpful[:, i] & ~chosen[:, i]).mean()), 6)
                                       for i, m in enumerate(modalities)},
            "planted_took_misleading": {m: round(float((misleading[:, i] & chosen[:, i]).mean()), 6)
                                        for i, m in enumerate(modalities)},
            "planted_agreement_all_teachers": float(per_action[:, -1].mean()),
            "planted_agreement_random": float(per_action.mean()),
            "planted_agreement_best_possible": float(per_action.any(1).mean())}


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
