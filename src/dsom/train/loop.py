"""Training loop for a ComplEx scorer with the kbc/MoSE objective (SPEC §2.3–2.4).

Loss per batch of reciprocal training queries: mean cross-entropy over all E entities (1-vs-all, true
tail as the class, no label filtering) + N3 (or F2) on the head, relation and true-tail factors.
Adagrad 0.1 by default. Validation every ``valid_every`` epochs on the *valid* split; the best epoch by
``selection_metric`` is checkpointed and restored at the end; early stopping when
``epoch - best_epoch > patience``; ReduceLROnPlateau in mode 'max' (MoSE's mode 'min' was a bug).

Batching (``train.batching``): ``triples`` cuts a shuffle of the queries every ``batch_size``; ``pairs`` shuffles
the distinct (entity, relation) pairs, keeps each pair's queries together and cuts about every ``batch_size``
queries (at the pair boundary at or past each multiple), so a trainer that supports it
(:attr:`Trainer.supports_pair_batching`) scores each pair once and shares the row among its targets, with as many
steps of as many triples as ``triples``. The loss is the mean over the batch's triples either way.

Determinism and resume: the model is initialised from ``seed`` and epoch ``k`` is shuffled with a
generator seeded from ``(seed, k)``, so shuffling does not depend on RNG state. The resumable
checkpoint (``checkpoints/last``) is written at epoch boundaries together with the optimizer,
scheduler and trainer state; a run interrupted anywhere and resumed redoes the unfinished epoch
and ends with the same weights and metrics as an uninterrupted run.
"""

from __future__ import annotations

import abc
import logging
import math
import time
from collections.abc import Callable, Hashable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from dsom import distributed
from dsom.config import Config
from dsom.data.graph import KGDataset
from dsom.data.pairs import PairIndex, epoch_permutation, group_pairs
from dsom.errors import DsomError
from dsom.evaluate import evaluate
from dsom.models.chunked import entity_chunk
from dsom.models.complex import ComplEx
from dsom.models.fused import CETails, complex_cross_entropy, fused_penalty
from dsom.models.products import resolve_precision
from dsom.perf import compile_enabled, release_memory, set_deterministic
from dsom.ranks import TIE_POLICIES
from dsom.train.checkpoint import FORMAT as CHECKPOINT_FORMAT
from dsom.train.checkpoint import (
    check_vocabulary,
    load_train_state,
    read_checkpoint,
    resolve_checkpoint_dir,
    write_checkpoint,
)
from dsom.train.graphs import Capture, GraphStep, cuda_capture, graph_problem
from dsom.train.optim import DeviceAdagradStep, ShadowAdagrad, device_adagrad_problem
from dsom.train.tracker import make_tracker

log = logging.getLogger("dsom")
AUTO_CPU_MINUTES = 60.0  # train.max_minutes = -1 on a CPU: each stage fits in an hour by default
ETA_BATCHES = (1, 6)  # the estimate times batches 2..6 of the first epoch a process trains (batch 1 warms up)

BatchHook = Callable[[int, int], None]


@dataclass
class StepLoss:
    """What every trainer's :meth:`Trainer.loss` returns (one convention for every stage, as the distiller's dict).

    ``terms``: named loss terms, each already weighted, whose sum is the objective the optimizer descends
    (e.g. ``ce``, ``reg``, ``kd``, ``rc``); ``logged``: diagnostics recorded beside them but never summed (e.g. each
    teacher's ``ce/<modality>``). The epoch record logs the batch mean of both."""

    terms: dict[str, torch.Tensor]
    logged: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def total(self) -> torch.Tensor:
        return sum(self.terms.values())  # type: ignore[return-value]

    def detached(self) -> dict[str, torch.Tensor]:
        """Every term and diagnostic, detached, for the epoch's running sums."""
        return {**{k: v.detach() for k, v in self.terms.items()}, **{k: v.detach() for k, v in self.logged.items()}}


@dataclass(frozen=True)
class BatchShare:
    """Under torchrun: the rows ``[start, stop)`` of a global batch of ``size`` rows this process trains on, and
    ``weight``, its share of the batch's mean loss (``(stop - start) / size``). A process whose share is empty (a
    batch with fewer rows than processes) trains on row 0 as a stand-in with weight 0, so it still takes part in
    every collective of the step."""

    start: int
    stop: int
    size: int
    weight: float

    @property
    def draw_rows(self) -> tuple[int, int, int]:
        """``(start, stop, size)``: which rows of the global batch's random draws are this process's."""
        return self.start, self.stop, self.size


def resolve_device(name: str) -> torch.device:
    """The device of ``train.device``; under torchrun a CUDA device is this process's ``cuda:LOCAL_RANK``."""
    if name == "auto":
        return distributed.device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DsomError(f"train.device={name!r} but CUDA is not available; use train.device=cpu or auto")
    return distributed.device(dev)


BATCHINGS = ("auto", "triples", "pairs")


def resolve_batching(name: str, device: torch.device) -> str:
    """``train.batching`` / ``distill.batching`` on ``device``: ``auto`` is ``pairs`` on a CPU (fewer products, as
    accurate on four benchmarks: docs/performance.md) and ``triples`` on a GPU, whose step is captured as a CUDA graph
    only for triple batches (train.cuda_graphs)."""
    if name not in BATCHINGS:
        raise DsomError(f"batching={name!r} is not one of {', '.join(BATCHINGS)}")
    if name != "auto":
        return name
    return "triples" if device.type == "cuda" else "pairs"


def make_optimizer(params: Any, cfg: Config, precision: str = "fp32", compile: bool = False) -> torch.optim.Optimizer:
    """The configured optimizer, using PyTorch's fused kernels where they exist for the parameters' device:
    fused Adagrad (CPU) updates a 12,842 x 1,000 table in 6 ms instead of 36 ms on the dev machine;
    fused Adam (CPU and CUDA). Results match the unfused update to float rounding.

    Under ``bf16`` products Adagrad is :class:`~dsom.train.optim.ShadowAdagrad`: the entity tables' bfloat16 copies
    for the next step's products are written by the update (``compile``: in its one pass)."""
    t = cfg.train
    params = list(params)
    flat = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    on_cpu = all(p.device.type == "cpu" for p in flat)
    if t.optimizer == "adagrad":
        fused = True if on_cpu and flat else None
        if precision == "bf16":
            return ShadowAdagrad(params, lr=t.lr, fused=fused, compile=compile)
        return torch.optim.Adagrad(params, lr=t.lr, fused=fused)
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, fused=True if flat else None)
    return torch.optim.SGD(params, lr=t.lr)


@dataclass
class TrainState:
    """What, besides weights and optimizer, a resumed run needs."""

    epoch: int = 0  # completed epochs
    best_epoch: int = 0  # 0 = no validation yet
    best_value: float = -math.inf
    train_seconds: float = 0.0
    epoch_seconds: list[float] = field(default_factory=list)
    stopped_early: bool = False
    epoch_cap: int = 0  # epochs that fit in train.max_minutes when fewer than train.epochs (0 = no cap applied)
    history: list[dict[str, Any]] = field(default_factory=list)  # validation records


class Trainer(abc.ABC):
    """The epoch loop shared by every stage: shuffling, optimizer, validation, selection, early stopping,
    checkpoints and resume. Subclasses build ``self.model`` and define :meth:`loss`, :meth:`validate`
    and the checkpoint tensors."""

    checkpoint_format = ""
    supports_pair_batching = False  # whether :meth:`loss` scores each (entity, relation) pair of a batch once
    #: whether :meth:`loss` is a function of the batch's device tensors, the parameters and what :meth:`graph_inputs`
    #: writes into fixed buffers before each step (no other host data per batch), with the host state it reads named
    #: by :meth:`graph_key`, so that the step can be captured as a CUDA graph (train.cuda_graphs)
    supports_cuda_graphs = False
    #: true while :class:`~dsom.train.graphs.GraphStep` records (or, in tests, re-runs) the captured step: :meth:`loss`
    #: then reads its per-batch host data from the buffers :meth:`graph_inputs` filled
    capturing = False
    share: BatchShare | None = None  # under torchrun, this process's rows of the batch being trained
    current_epoch = 0  # the epoch and batch being trained (set by the epoch loop before each step)
    current_batch = 0

    def __init__(self, dataset: KGDataset, cfg: Config, run_dir: str | Path, stage: str = "pretrain",
                 progress: bool = True, batch_hook: BatchHook | None = None, checkpoint_subdir: str = "") -> None:
        self.ds = dataset
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.stage = stage
        self.progress = progress
        self.batch_hook = batch_hook
        self.device = resolve_device(cfg.train.device)
        self.tracker = make_tracker(self.run_dir, cfg, stage)  # metrics.jsonl + track.trackers
        self.ckpt_dir = self.run_dir / "checkpoints" / checkpoint_subdir
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        set_deterministic(cfg.train.deterministic, self.device.type)
        self.model = self.build_model(torch.Generator().manual_seed(cfg.train.seed)).to(self.device)
        self.precision = resolve_precision(cfg.train.precision, self.device)
        cells = cfg.train.batch_size * dataset.num_entities
        self.compiled = compile_enabled(cfg.train.compile, self.device.type, cells)  # train.compile resolved
        self.optimizer = make_optimizer(self.trainable_parameters(), cfg, self.precision, self.compiled)
        self.scheduler = (torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="max", factor=cfg.train.scheduler_factor, patience=cfg.train.scheduler_patience,
            threshold=cfg.train.scheduler_threshold) if cfg.train.scheduler == "plateau" else None)
        self.state = TrainState()
        self.train_queries_cpu = torch.from_numpy(dataset.queries("train"))
        self.train_queries = self.train_queries_cpu.to(self.device)
        self.current_batch_cpu: torch.Tensor | None = None  # the batch being trained, as a CPU tensor
        self.current_batch_index: torch.Tensor | None = None  # its rows of train_queries, on the device
        self.current_batch_index_cpu: torch.Tensor | None = None  # the same, on the host
        self.batching = (resolve_batching(self.configured_batching(cfg), self.device) if self.supports_pair_batching
                         else "triples")
        self._pairs: PairIndex | None = None

    def configured_batching(self, cfg: Config) -> str:
        """The batching this trainer's stage is configured with (``train.batching``; stage 2 reads its own key)."""
        return cfg.train.batching

    @property
    def distributed(self) -> bool:
        """Whether this process is one of several under torchrun."""
        return distributed.active()

    def fused_step(self) -> bool:
        """Whether a full batch's loss is one fused node (:func:`~dsom.models.fused.complex_cross_entropy`) rather
        than a loop over entity chunks (``train.block_mb``)."""
        return entity_chunk(self.cfg.train.batch_size, self.ds.num_entities, self.cfg.train.block_mb) >= \
            self.ds.num_entities

    # ------------------------------------------------------------------------------- subclass hooks
    @abc.abstractmethod
    def build_model(self, generator: torch.Generator) -> nn.Module:
        raise NotImplementedError

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    @abc.abstractmethod
    def loss(self, batch: torch.Tensor) -> StepLoss:
        """The named loss terms (summed into the objective) and diagnostics of a batch of reciprocal queries
        ``(B, 3)``."""
        raise NotImplementedError

    def validation_scorer(self) -> Any:
        """The model :meth:`validate` ranks with (the student of a distiller, by default ``self.model``)."""
        return self.model

    def validate(self) -> tuple[dict[str, Any], float]:
        """Validation record to log (all tie policies) and the selection value (higher is better)."""
        self.model.eval()
        ev, t = self.cfg.eval, self.cfg.train
        m = evaluate(self.validation_scorer(), self.ds, "valid", batch_size=ev.batch_size,
                     memory_budget_mb=ev.memory_budget_mb, precision=ev.precision, device=self.device,
                     max_triples=t.valid_max_triples or None)
        return {p: m[p] for p in TIE_POLICIES}, m[t.selection_policy][t.selection_metric]

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.model.state_dict().items() if k in dict(self.model.named_parameters())}

    def model_meta(self) -> dict[str, Any]:
        return {}

    def after_step(self, epoch: int, batch: int) -> None:
        """Called after every optimizer step (per-step logging)."""
        return None

    def after_update(self) -> None:
        """Updates of a step besides the model optimizer's (stage 2: the policy's own Adam), right after it; part of a
        captured step."""
        return None

    # ------------------------------------------------------------------------------- CUDA graph hooks
    #: what :meth:`loss` left besides its terms for :meth:`after_step` (stage 2's statistics); a CUDA graph puts the
    #: captured step's back after each replay
    step_outputs: dict[str, torch.Tensor] = {}

    def graph_inputs(self) -> None:
        """Before each step of a CUDA graph: write the batch's host-side inputs (the ``current_*`` attributes) into the
        fixed buffers :meth:`loss` reads while :attr:`capturing` (none by default)."""
        return None

    def graph_key(self) -> Hashable:
        """The host state a captured step depends on (a graph is captured again when it changes); ``None`` = none."""
        return None

    def graph_generators(self) -> list[torch.Generator]:
        """Random generators a captured step draws from (registered with the graph, re-seeded by :meth:`graph_inputs`
        before each replay)."""
        return []

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """Every optimizer a training step updates (their parameters' gradients are summed over processes)."""
        return [self.optimizer]

    def zero_grad(self) -> None:
        """Drop the gradients of every optimizer's parameters (the next backward allocates them anew)."""
        for opt in self.optimizers():
            opt.zero_grad(set_to_none=True)

    def weigh_share(self, step: StepLoss) -> StepLoss:
        """Under torchrun: this process's contribution to the batch's terms and diagnostics, so that their sums
        over processes are the one-process values. Every term here is a mean over the batch's rows, so each is
        weighted by the share's size over the batch's size."""
        w = self.share.weight if self.share is not None else 1.0
        return StepLoss({k: v * w for k, v in step.terms.items()}, {k: v * w for k, v in step.logged.items()})

    def epoch_extras(self, epoch: int) -> dict[str, Any]:
        """Extra fields for the epoch's ``metrics.jsonl`` record."""
        return {}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    _tails: CETails | None = None

    def ce_tails(self) -> CETails:
        """The cross-entropy tails of :func:`~dsom.models.fused.complex_cross_entropy`, compiled where
        ``train.compile`` says so for this trainer's ``batch_size x E`` score blocks."""
        if self._tails is None:
            cells = self.cfg.train.batch_size * self.ds.num_entities
            self._tails = CETails(compile_enabled(self.cfg.train.compile, self.device.type, cells))
        return self._tails

    # ----------------------------------------------------------------------------------- checkpoints
    def _meta(self) -> dict[str, Any]:
        return {"format": self.checkpoint_format, "model": self.model_meta(), "stage": self.stage,
                "epoch": self.state.epoch, "config": self.cfg.to_dict(),
                "best_epoch": self.state.best_epoch, "best_value": self.state.best_value}

    def _save(self, name: str, extra: dict[str, Any] | None = None,
              train_state: dict[str, Any] | None = None) -> None:
        write_checkpoint(self.ckpt_dir / name, self.checkpoint_tensors(), self.ds, {**self._meta(), **(extra or {})},
                         train_state)

    def _load_tensors(self, directory: Path) -> None:
        d, meta, tensors = read_checkpoint(directory)
        check_vocabulary(meta, self.ds, d, "resume with the dataset this run was started on")
        own = self.checkpoint_tensors()
        if meta.get("format") != self.checkpoint_format or set(tensors) != set(own):
            raise DsomError(f"{d}: checkpoint holds {meta.get('format')!r} tensors {sorted(tensors)}, not a "
                            f"{self.checkpoint_format} checkpoint of this configuration; resume with the same config")
        for k, v in tensors.items():
            if v.shape != own[k].shape:
                raise DsomError(f"{d}: tensor '{k}' has shape {tuple(v.shape)}, the configuration needs "
                                f"{tuple(own[k].shape)}; resume with the same config")
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for k, v in tensors.items():
                params[k].copy_(v.to(self.device))

    def _save_last(self) -> None:
        train_state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else {},
            "trainer": _state_to_tensors(self.state),
            "extra": self.extra_train_state(),
        }
        self._save("last", train_state=train_state)

    def extra_train_state(self) -> dict[str, Any]:
        """Subclass state to save with ``checkpoints/last`` (e.g. a second optimizer)."""
        return {}

    def load_extra_train_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_train_state` saved."""
        return None

    def resume(self) -> bool:
        """Load ``checkpoints/last`` if it exists; returns whether something was resumed."""
        last = self.ckpt_dir / "last"
        if not (last / "model.safetensors").exists() and not (self.ckpt_dir / "last.old" / "model.safetensors").exists():
            return False
        self._load_tensors(last)
        d = resolve_checkpoint_dir(last)
        if not (d / "train_state.pt").exists():
            raise DsomError(f"{d}: not a resumable checkpoint (train_state.pt missing)")
        ts = load_train_state(d / "train_state.pt")
        try:
            self.optimizer.load_state_dict(ts["optimizer"])
            if self.scheduler and ts.get("scheduler"):
                self.scheduler.load_state_dict(ts["scheduler"])
            self.state = _state_from_tensors(ts["trainer"])
            self.load_extra_train_state(ts.get("extra", {}))
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as exc:
            raise DsomError(f"{d / 'train_state.pt'}: does not fit this run's optimizer and trainer "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); remove "
                            f"{d} to redo the stage, or start over with --force") from None
        self.tracker.truncate_after(self.stage, self.state.epoch)
        return True

    # ---------------------------------------------------------------------------------------- train
    def epoch_batches(self, epoch: int) -> tuple[torch.Tensor, list[int]]:
        """The order of the training queries in epoch ``epoch`` (CPU) and the offsets of its batches in it.

        ``triples``: a permutation of the queries cut every ``batch_size``. ``pairs``: the shuffled (entity,
        relation) pairs with all their queries, cut about every ``batch_size`` queries (:meth:`PairIndex.epoch_batches`).
        Both depend on (seed, epoch) only."""
        n, bs, seed = len(self.train_queries_cpu), self.cfg.train.batch_size, self.cfg.train.seed
        if self.batching == "pairs":
            if self._pairs is None:
                self._pairs = PairIndex(self.train_queries_cpu)
            return self._pairs.epoch_batches(seed, epoch, bs, self.cfg.train.pair_max_queries)
        return epoch_permutation(n, seed, epoch), [*range(0, n, bs), n]

    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train()
        perm_cpu, offsets = self.epoch_batches(epoch)
        perm = perm_cpu.to(self.device)
        sums: dict[str, torch.Tensor] = {}
        check_every_batch = self.device.type == "cpu"  # on GPU, avoid a host sync per batch
        n_batches = 0
        split = distributed.active()  # under torchrun each process trains its contiguous share of every batch
        bar = tqdm(range(len(offsets) - 1), desc=f"{self.stage} epoch {epoch}", disable=not self.progress,
                   leave=False)
        last = len(offsets) - 2  # an epoch shorter than the estimate's batches is timed up to its last
        for b in bar:
            lo, hi = offsets[b], offsets[b + 1]
            if split:
                a, z = distributed.share(lo, hi)
                self.share = BatchShare(a - lo, z - lo, hi - lo, (z - a) / (hi - lo))
                if a == z:  # fewer rows than processes: a stand-in row with weight 0
                    self.share = BatchShare(0, 1, hi - lo, 0.0)
                    a, z = lo, lo + 1
                lo, hi = a, z
            # host-side copy for index lookups (neighbour sets) without a device-to-host sync
            self.current_batch_cpu = self.train_queries_cpu[perm_cpu[lo:hi]]
            self.current_batch_index = perm[lo:hi]
            self.current_batch_index_cpu = perm_cpu[lo:hi]  # the same rows, on the host
            self.current_epoch, self.current_batch = epoch, b
            terms, loss = self.train_step(perm[lo:hi])
            for k, v in terms.items():  # accumulated in place: no new tensor per step
                if k in sums:
                    sums[k] += v
                else:
                    sums[k] = v.clone()
            n_batches += 1
            if self.progress and check_every_batch and b % 10 == 0 and loss is not None and not split:
                bar.set_postfix(loss=f"{loss.item():.4f}")
            self.after_step(epoch, b)
            self.current_batch_cpu = self.current_batch_index = self.current_batch_index_cpu = None
            if not self._eta_done and (b in ETA_BATCHES or ETA_BATCHES[0] < b == last):
                self._estimate(b, len(offsets) - 1)
            if self.batch_hook is not None:
                self.batch_hook(epoch, b)
        self.share = None
        if split and sums:  # the terms of the whole batches (each process summed its weighted shares)
            keys = sorted(sums)
            total = distributed.sum_(torch.stack([sums[k].double() for k in keys]))
            sums = dict(zip(keys, total))
        out = {k: float(v) / max(n_batches, 1) for k, v in sums.items()}
        if not all(math.isfinite(v) for v in out.values()):
            raise FloatingPointError(f"non-finite loss in epoch {epoch}: {out}; lower train.lr or use train.precision=fp32")
        return out

    def train_step(self, index: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """One optimizer step on the training queries ``train_queries[index]`` (``index (B,)`` on the device, the
        ``current_*`` attributes set by the caller): the step's CUDA graph where there is one (:meth:`graph_step`; a
        batch of another size eagerly, with the graph's update), else loss, backward (under torchrun this process's
        weighted share, the gradients summed over processes) and :meth:`optimizer_step`. Returns the step's detached
        terms (a graph's are overwritten by its next replay) and its loss (``None`` from a graph)."""
        graph = self.graph_step()
        if graph is not None:
            return (graph(index) if len(index) == graph.rows else graph.eager(self.train_queries[index])), None
        step = self.loss(self.train_queries[index])
        if self.share is not None:
            step = self.weigh_share(step)
        loss = step.total
        if self.device.type == "cpu" and not torch.isfinite(loss):  # (on a GPU: no host sync per batch)
            raise FloatingPointError(f"non-finite loss at epoch {self.current_epoch}, batch {self.current_batch}; "
                                     "lower train.lr or use train.precision=fp32")
        self.zero_grad()
        loss.backward()
        if distributed.active():  # the batch's gradient: the processes' weighted shares summed
            distributed.reduce_gradients([p for opt in self.optimizers() for g in opt.param_groups
                                          for p in g["params"]])
        self.optimizer_step()
        return step.detached(), loss

    _device_update: DeviceAdagradStep | None = None
    _device_update_checked = False

    def device_update(self) -> DeviceAdagradStep | None:
        """On a GPU, the Adagrad update with no host sync and one element-wise pass per parameter
        (:class:`~dsom.train.optim.DeviceAdagradStep`, also what a CUDA graph captures, so that eager and captured
        steps compute the same); ``None`` on a CPU (torch's fused Adagrad) and for other optimizers."""
        if not self._device_update_checked:
            self._device_update_checked = True
            if self.device.type == "cuda" and device_adagrad_problem(self.optimizer) is None:
                self._device_update = DeviceAdagradStep(self.optimizer, self.compiled)  # type: ignore[arg-type]
        return self._device_update

    def optimizer_step(self) -> None:
        """Update the parameters from their gradients: :meth:`device_update` where there is one, else the
        optimizer's own step."""
        update = self.device_update()
        if update is not None:
            update.step()
        else:
            self.optimizer.step()
        self.after_update()

    _graph: GraphStep | None = None
    _graph_checked = False

    def graph_step(self) -> GraphStep | None:
        """The step as a CUDA graph (:mod:`dsom.train.graphs`) where ``train.cuda_graphs`` and the step allow it; made
        once per trainer (``None``: eager steps). ``on`` where the step cannot be captured is an error."""
        if self._graph_checked:
            return self._graph
        self._graph_checked = True
        setting = self.cfg.train.cuda_graphs
        if setting == "off":
            return None
        problem = graph_problem(self)
        if problem is None and self.device.type != "cuda" and self.graph_capture is cuda_capture:
            problem = f"train.device is {self.device.type}, not cuda"
        if problem is not None and setting == "auto" and self.device.type != "cuda":
            return None  # the CPU default: nothing to say
        if problem is not None:
            if setting == "on":
                raise DsomError(f"train.cuda_graphs=on but the {self.stage} step cannot be captured: {problem}; "
                                "use train.cuda_graphs=auto")
            log.info("%s: training without CUDA graphs (%s)", self.stage, problem)
            return None
        self._graph = GraphStep(self, self.cfg.train.batch_size, self.graph_capture)
        return self._graph

    #: how :class:`GraphStep` captures (tests replace it with :func:`~dsom.train.graphs.rerun_capture`)
    graph_capture: Capture = staticmethod(cuda_capture)  # type: ignore[assignment]

    _eta_done = False
    _eta_start = 0.0
    #: called as ``epoch_hook(epoch, record)`` after each epoch's record (with ``valid`` and ``selection_value``
    #: when the epoch validated) is logged; it may raise to stop training
    epoch_hook: Callable[[int, dict[str, Any]], None] | None = None

    def _estimate(self, b: int, num_batches: int) -> None:
        """Log once per process how long an epoch and the rest of this stage should take, from the first batches."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        if b == ETA_BATCHES[0] or num_batches <= ETA_BATCHES[0] + 1:
            self._eta_start = now
            if num_batches > ETA_BATCHES[0] + 1:
                return
        self._eta_done = True
        timed = b - ETA_BATCHES[0]
        if timed < 1:
            return
        per_epoch = (now - self._eta_start) / timed * num_batches
        self._apply_time_cap(per_epoch)
        left = max(self.epoch_limit() - self.state.epoch, 1)
        log.info("%s: about %.3g s per epoch (%d batches; timed on batches %d-%d), %d epoch%s to go: about %s%s",
                 self.stage, per_epoch, num_batches, ETA_BATCHES[0] + 2, b + 1, left, "s" if left > 1 else "",
                 _duration(per_epoch * left), " (less if it stops early)" if self.cfg.train.patience > 0
                 and self.cfg.train.valid_every > 0 else "")

    def max_minutes(self) -> float:
        """``train.max_minutes`` resolved: ``-1`` (auto) is :data:`AUTO_CPU_MINUTES` on a CPU and no cap on a GPU."""
        m = self.cfg.train.max_minutes
        return m if m >= 0 else (0.0 if self.device.type == "cuda" else AUTO_CPU_MINUTES)

    def epoch_limit(self) -> int:
        """The epochs this stage trains at most: ``train.epochs``, or fewer under the time cap."""
        return min(self.cfg.train.epochs, self.state.epoch_cap) if self.state.epoch_cap else self.cfg.train.epochs

    def _apply_time_cap(self, per_epoch: float) -> None:
        """Cap the stage at the epochs that fit in ``max_minutes`` at ``per_epoch`` seconds each (decided in each
        process from its own timing, so a run resumed elsewhere fits that machine; under torchrun rank 0's)."""
        minutes = self.max_minutes()
        fit = max(int(minutes * 60 // max(per_epoch, 1e-9)), 1) if minutes > 0 else 0
        fit = int(distributed.broadcast_object(fit))
        if fit and fit < self.cfg.train.epochs:
            self.state.epoch_cap = max(fit, self.state.epoch)
            log.warning("%s: %d epochs at about %.3g s each would take about %s; training %d to fit "
                        "train.max_minutes=%g (%s). For the whole budget: --set train.max_minutes=0",
                        self.stage, self.cfg.train.epochs, per_epoch, _duration(per_epoch * self.cfg.train.epochs),
                        self.state.epoch_cap, minutes, "auto on CPU" if self.cfg.train.max_minutes < 0 else "set")
        else:
            self.state.epoch_cap = 0

    def fit(self, resume: bool = False) -> TrainState:
        t = self.cfg.train
        if resume:
            self.resume()
        else:
            self.tracker.log_params({"stage": self.stage, "parameters": self.num_parameters(),
                                     "train_queries": int(len(self.train_queries)), "device": str(self.device),
                                     "precision": self.precision})
        if self.max_minutes() == 0:  # no cap now, whatever an earlier process decided
            self.state.epoch_cap = 0
        can_validate = t.valid_every > 0 and len(self.ds.valid) > 0
        while self.state.epoch < self.epoch_limit() and not self.state.stopped_early:
            epoch = self.state.epoch + 1
            t0 = time.perf_counter()
            losses = self.train_epoch(epoch)
            seconds = time.perf_counter() - t0
            self.state.epoch = epoch
            self.state.train_seconds += seconds
            self.state.epoch_seconds.append(seconds)
            record: dict[str, Any] = {"stage": self.stage, "epoch": epoch, "seconds": round(seconds, 4),
                                      "lr": self.optimizer.param_groups[0]["lr"], **{f"loss/{k}": v for k, v in losses.items()},
                                      **self.epoch_extras(epoch)}
            if can_validate and epoch % t.valid_every == 0:
                valid, value = self.validate()
                record["valid"] = valid
                record["selection_value"] = value
                improved = value > self.state.best_value
                if improved:
                    self.state.best_value = value
                    self.state.best_epoch = epoch
                    self._save("best", {"valid": valid})
                if self.scheduler is not None:
                    self.scheduler.step(value)
                self.state.history.append({"epoch": epoch, "value": value, "improved": improved})
                if t.patience > 0 and epoch - self.state.best_epoch > t.patience:
                    self.state.stopped_early = True
                    record["early_stop"] = True
            self.tracker.log(record)
            if self.epoch_hook is not None:  # e.g. a hyper-parameter search reporting to its pruner
                self.epoch_hook(epoch, record)
            release_memory()
            if self.progress:
                tqdm.write(_epoch_line(record, t))
            if epoch % max(t.checkpoint_every, 1) == 0 or epoch == self.epoch_limit() or self.state.stopped_early:
                self._save_last()
        if self._graph is not None:  # (its memory is not needed once trained)
            self._graph.release()
        if t.restore_best and self.state.best_epoch > 0:
            if distributed.is_main():  # rank 0 reads the selected weights back and sends them to the others
                self._load_tensors(self.ckpt_dir / "best")
            distributed.broadcast_(self.model.parameters())
        else:
            # No validation: the final weights are the selected ones.
            self._save("best")
        return self.state


class ComplExTrainer(Trainer):
    """Trains one :class:`ComplEx` (a structural teacher alone, or the baseline of the same size)."""

    checkpoint_format = CHECKPOINT_FORMAT
    supports_pair_batching = True
    supports_cuda_graphs = True

    def build_model(self, generator: torch.Generator) -> ComplEx:
        return ComplEx(self.ds.num_entities, 2 * self.ds.num_relations, self.cfg.model.rank,
                       self.cfg.model.init_scale, generator=generator)

    def model_meta(self) -> dict[str, Any]:
        m = self.model
        return {"type": "complex", "rank": m.rank, "num_entities": m.num_entities,
                "num_relations": m.num_relations, "original_relations": self.ds.num_relations}

    def loss(self, batch: torch.Tensor) -> StepLoss:
        h, r, t = batch[:, 0], batch[:, 1], batch[:, 2]
        model: ComplEx = self.model
        rows = None
        ph, pr = h, r
        if self.batching == "pairs":  # one query vector and score row per distinct (h, r), shared by its targets
            ph, pr, rows = group_pairs(batch)
        # entity blocks where the (P, E) scores would exceed train.block_mb (big graphs); else one block
        chunk = entity_chunk(len(ph), model.num_entities, self.cfg.train.block_mb)
        tr = self.cfg.train
        # one autograd node: no dense gather gradients, scores kept in the product precision
        tails = self.ce_tails()
        out = complex_cross_entropy([model.entity], model.relation.unsqueeze(0), ph, pr, t, rows, self.precision,
                                    tails, chunk=chunk)
        ce = out.ce[0].mean()
        reg = fused_penalty(out, rows, tr.regularizer, tr.reg, len(t), tails)
        terms = {"ce": ce}
        if reg is not None:
            terms["reg"] = reg
        return StepLoss(terms)





def _epoch_line(record: dict[str, Any], t: Any) -> str:
    line = (f"{record['stage']} epoch {record['epoch']}/{t.epochs}: loss {record.get('loss/ce', float('nan')):.4f}"
            f" ({record['seconds']:.1f} s)")
    if "selection_value" in record:
        line += f"; valid {t.selection_policy} {t.selection_metric} {record['selection_value']:.4f}"
    if record.get("early_stop"):
        line += "; early stop"
    return line


def _state_to_tensors(state: TrainState) -> dict[str, Any]:
    """TrainState as plain containers (safe for ``torch.load(weights_only=True)``)."""
    d = asdict(state)
    d["best_value"] = float(d["best_value"]) if math.isfinite(d["best_value"]) else None
    return d


def _state_from_tensors(d: dict[str, Any]) -> TrainState:
    d = dict(d)
    d["best_value"] = -math.inf if d.get("best_value") is None else float(d["best_value"])
    return TrainState(**d)


__all__ = ["BATCHINGS", "BatchShare", "ComplExTrainer", "Trainer", "TrainState", "resolve_batching", "resolve_device"]


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.2g} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
