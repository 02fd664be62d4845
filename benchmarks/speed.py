"""Speed benchmark: dsom vs PyKEEN and vs this machine's matmul roofline, in one process and run.

Phases (each timed on the same data, with its peak resident memory and its FLOP count):

* ``peak``: the machine's fp32 and bf16 matrix-product throughput at the scoring shape ``(B, 2d) x (2d, E)``;
* ``dsom_complex``: one structural ComplEx, 1-vs-all cross-entropy + N3, reciprocal queries (stage-1 style);
* ``pykeen_complex``: PyKEEN's ComplEx trained by its LCWA loop (cross-entropy, Adagrad) at the same rank
  and batch size, inverse triples on;
* ``dsom_teachers``: stage 1, every teacher of ``--modalities`` trained jointly (feature tables are random
  with the real dimensions: text 384, numeric 113, image 768; timing does not depend on their values);
* ``dsom_distill``: stage 2, the DSoM student (policy + NDKD) against frozen teachers of rank ``--rank``;
* ``dsom_eval`` / ``pykeen_eval``: filtered evaluation of the test split (head and tail queries).

With ``--batches N`` each training phase times N batches after one warm-up batch and scales the time to
an epoch by its own number of batches per epoch (dsom: reciprocal training triples / B; PyKEEN LCWA:
unique (h, r) pairs including inverses / B). Roofline time = FLOPs / the faster of the measured fp32 and
bf16 peaks; the roofline fraction is roofline time / measured time (1.0 = at the peak). The ``median`` column is the
epoch estimated from the timed batches' median step instead of their mean (on a shared machine it is moved less by a
step that something else slowed).

``--batching pairs`` trains ComplEx and stage 1 with ``train.batching=pairs`` and stage 2 with
``distill.batching=pairs`` (each distinct (entity, relation) pair of a batch scored once; batches of about
``--batch-size`` queries, as with triples); the batches timed are then the trainer's own pair batches. "TFLOP" counts the
products actually done; "dedup TFLOP" the products if every distinct training pair were scored once per epoch
(the least any 1-vs-all trainer must do), and "dedup frac" the roofline fraction against that.

With ``--profile-steps K`` (default 2) each training phase runs K more steps under ``torch.profiler`` (and the
evaluation once more): the time inside the matrix products is the self time of ``aten::mm``, ``bmm``,
``addmm``, ``baddbmm``, ``addbmm``, ``matmul``, ``dot`` and ``mv`` (CPU: the calling thread's time, which
includes waiting for the product's worker threads; CUDA: kernel time), the time outside is the rest of the
wall time of the step; the four largest outside ops by self time are listed (``--outside-ops N``: N of them), a
compiled graph by the dsom function it runs (``compiled step_terms``, ``compiled step_terms backward``).

    DSOM_DATA=../shared/data python benchmarks/speed.py DB15K --rank 500 --batches 10 --json speed.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from dsom import perf
from dsom.config import Config, set_value
from dsom.data import registry
from dsom.data.graph import KGDataset
from dsom.data.modality import ModalityTable
from dsom.data.pairs import PairIndex
from dsom.distill.holdout import reward_rows
from dsom.evaluate import evaluate
from dsom.models.complex import ComplEx
from dsom.models.products import resolve_precision
from dsom.models.teachers import FrozenTeachers
from dsom.perf import PROFILE_PREFIX, tune_allocator
from dsom.train.loop import ComplExTrainer, Trainer
from dsom.train.student import StudentTrainer
from dsom.train.teachers import TeacherTrainer

FEATURE_DIMS = {"text": 384, "numeric": 113, "image": 768}
# stage-2 teacher temperatures (--rewards holdout): the ones fitted on DB15K's held-out triples by
# `dsom reproduce DB15K` (seed 2022; structure, text, numeric); timing does not depend on their values
CALIBRATION = [1.33125, 0.88482, 0.90174]


# ------------------------------------------------------------------------------------------ measuring
def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    try:  # Linux: writing 5 resets VmHWM, the peak resident set
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def minor_faults() -> float:
    """Minor page faults of this process so far (NaN where ``resource`` is missing, e.g. on Windows)."""
    try:
        import resource
    except ImportError:
        return math.nan
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)


def peak_mb(device: torch.device) -> dict[str, float]:
    out: dict[str, float] = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM"):
                    out["peak_rss_mb"] = int(line.split()[1]) / 1024
    except OSError:
        import resource

        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(dtype: torch.dtype, m: int, k: int, n: int, device: torch.device, seconds: float = 0.7,
                rounds: int = 3) -> float:
    """Best sustained TFLOP/s in ``dtype`` over the three products of a 1-vs-all step: scores
    ``(m, k) x (k, n)``, the query gradient ``(m, n) x (n, k)`` and the table gradient ``(n, m) x (m, k)``,
    each timed ``rounds`` times (the shared 2-core machine is noisy: the best round is the peak)."""
    q = torch.randn(m, k, device=device).to(dtype)
    table = torch.randn(n, k, device=device).to(dtype)
    grad = torch.randn(m, n, device=device).to(dtype)
    best = 0.0
    for fn in [lambda: q @ table.T, lambda: grad @ table, lambda: grad.T @ q] * rounds:
        fn()
        sync(device)
        reps, t0 = 0, time.perf_counter()
        while True:
            fn()
            reps += 1
            sync(device)
            if time.perf_counter() - t0 > seconds:
                break
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e12)
    return best


def score_rows(tr: Trainer) -> int:
    """Score rows (products' M dimension) of epoch 1: under pair batching the distinct (entity, relation) pairs of
    each batch, summed (the pairs themselves when they are whole; more where train.pair_max_queries cuts a pair into
    pieces that land in different batches), else one per training query."""
    order, offsets = tr.epoch_batches(1)
    if tr.batching != "pairs":
        return len(order)
    assert tr._pairs is not None
    return sum(batch_rows(tr, order, offsets, b) for b in range(len(offsets) - 1))


SKIPPABLE = ("complex", "pykeen", "teachers", "distill", "eval")
OUTSIDE_OPS_KEPT = 25
#: device kernels that are matrix products (cuBLAS/cuBLASLt and CUTLASS names: ``sm90_xmma_gemm_...``, ``nvjet_...``,
#: ``cutlass...gemm...``)
GEMM_KERNEL = re.compile(r"gemm|nvjet|xmma|cutlass", re.IGNORECASE)
MATMUL_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addbmm", "aten::matmul", "aten::dot",
              "aten::mv")


COMPILED_GRAPH = "## Call CompiledFxGraph"


def compiled_graph_labels(events: list[Any]) -> dict[int, str]:
    """Readable names for the profiler's ``## Call CompiledFxGraph <hash>`` events, by event id: ``compiled <fn>`` for a
    graph called inside :class:`~dsom.perf.MaybeCompiled`'s ``dsom:<fn>`` range, ``compiled <fn> backward`` for the
    backward graph of such a call (its autograd node has the forward call's sequence number). Others keep their name."""
    def ancestor(ev: Any, match: Callable[[str], bool]) -> Any:
        p = ev.cpu_parent
        while p is not None and not match(p.name):
            p = p.cpu_parent
        return p

    def dsom_range(ev: Any) -> str | None:
        p = ancestor(ev, lambda name: name.startswith(PROFILE_PREFIX))
        return None if p is None else p.name.removeprefix(PROFILE_PREFIX)

    forward_fn: dict[int, str] = {}  # sequence number of a compiled forward's autograd node -> its function
    for ev in events:
        if ev.name == "CompiledFunction" and ev.sequence_nr >= 0 and (fn := dsom_range(ev)) is not None:
            forward_fn[ev.sequence_nr] = fn
    labels: dict[int, str] = {}
    for ev in events:
        if not ev.name.startswith(COMPILED_GRAPH):
            continue
        if (fn := dsom_range(ev)) is not None:
            labels[ev.id] = f"compiled {fn}"
        elif (node := ancestor(ev, lambda name: name.endswith("CompiledFunctionBackward"))) is not None \
                and node.sequence_nr in forward_fn:
            labels[ev.id] = f"compiled {forward_fn[node.sequence_nr]} backward"
    return labels


def split_profile(run: Callable[[], None], device: torch.device, steps: int, rounds: int = 1,
                  reset: Callable[[], None] | None = None) -> dict[str, Any]:
    """Wall time of ``steps`` calls of ``run`` under ``torch.profiler``, split into the matrix products (the self
    time of :data:`MATMUL_OPS`: on CPU the calling thread's time in them, which includes waiting for their worker
    threads; on CUDA their kernel time) and everything else (wall time minus that). Per call, and the
    :data:`OUTSIDE_OPS_KEPT` largest other ops by self time.

    With ``rounds > 1`` the ``steps`` calls are profiled that many times (``reset`` called before each round, so
    every round runs the same batches) and the round with the least wall time is kept: on the 2-core AMX VM the
    profiler itself sometimes slows a round by half (its step 0.13-0.19 s against 0.09 s timed without it, the
    excess in the table casts' ``copy_`` and in ``mm``), and the fastest round is the one least disturbed. The
    kept round's wall time per step, the rounds' and the minor page faults per step are reported."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    best: tuple[float, Any, float] | None = None
    walls = []
    for _ in range(max(rounds, 1)):
        if reset is not None:
            reset()
        sync(device)
        faults0 = minor_faults()
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                run()
            sync(device)
            wall = time.perf_counter() - t0
        faults = (minor_faults() - faults0) / steps
        walls.append(wall / steps)
        if best is None or wall < best[0]:
            best = (wall, prof, faults)
    wall, prof, faults = best
    step = wall / steps
    acc = account_events(prof.events(), device.type == "cuda")
    mm = acc["matmul_us"] / 1e6 / steps
    out = {"profiled_steps": steps, "rounds": len(walls), "round_step_s": [round(w, 4) for w in walls],
           "minor_faults_per_step": faults, "step_s": step, "matmul_s": mm, "outside_s": max(step - mm, 0.0),
           "outside_fraction": max(step - mm, 0.0) / step if step > 0 else math.nan,
           "top_outside": {k: round(v / 1e6 / steps, 5) for k, v in acc["top_outside"].items()}}
    if device.type == "cuda":  # the GPU's own time: what a step costs once the host no longer limits it
        busy = acc["device_busy_us"] / 1e6 / steps
        out.update(device_busy_s=busy, device_idle_fraction=max(step - busy, 0.0) / step if step > 0 else math.nan,
                   device_outside_s=max(busy - mm, 0.0),
                   top_kernels={k: round(v / 1e6 / steps, 6) for k, v in acc["top_kernels"].items()})
    return out


def account_events(events: list[Any], cuda: bool) -> dict[str, Any]:
    """Sum a profile's events (microseconds, all steps): ``matmul_us``, the self time of :data:`MATMUL_OPS` (on CUDA
    the kernel time they launched: ``self_device_time_total``, or, where more, the time of the kernels named like
    GEMMs (:data:`GEMM_KERNEL`), which is what a replayed CUDA graph's products show as); ``top_outside``, the
    :data:`OUTSIDE_OPS_KEPT` largest other ops by the same measure (compiled graphs named by
    :func:`compiled_graph_labels`); on CUDA also ``device_busy_us``, the time of the device's own events (kernels,
    copies, fills: ``device_type`` not CPU), which are left out of ``top_outside`` because the op that launched each
    already counts its time, and ``top_kernels``, the largest of those other than GEMMs."""
    from torch.autograd import DeviceType

    labels = compiled_graph_labels(events)
    mm_us, busy_us, gemm_us = 0.0, 0.0, 0.0
    other: dict[str, float] = {}
    kernels: dict[str, float] = {}
    for ev in events:
        on_device = getattr(ev, "device_type", DeviceType.CPU) != DeviceType.CPU
        us = ev.self_device_time_total if cuda else ev.self_cpu_time_total
        if on_device:
            busy_us += us
            if GEMM_KERNEL.search(ev.name):
                gemm_us += us
            else:
                kernels[ev.name] = kernels.get(ev.name, 0.0) + us
        elif ev.name in MATMUL_OPS:
            mm_us += us
        elif not ev.name.startswith(("ProfilerStep", "[memory]")):
            key = labels.get(ev.id, ev.name)
            other[key] = other.get(key, 0.0) + us
    top = dict(sorted(other.items(), key=lambda kv: -kv[1])[:OUTSIDE_OPS_KEPT])
    out: dict[str, Any] = {"matmul_us": mm_us, "device_busy_us": busy_us, "top_outside": top}
    if cuda:  # a replayed CUDA graph launches its products with no aten op around them: count the kernels themselves
        out["matmul_us"] = max(mm_us, gemm_us)
        out["top_kernels"] = dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:OUTSIDE_OPS_KEPT])
    return out


def trainer_step(tr: Trainer, order: torch.Tensor, perm: torch.Tensor, offsets: Any, k: int, b: int) -> None:
    """One optimizer step of ``tr`` on batch ``k`` of epoch 1's ``order`` (``perm``: the same on the trainer's device;
    ``offsets``: the batch bounds), counted as batch ``b``, as the epoch loop runs it."""
    sl = slice(int(offsets[k]), int(offsets[k + 1]))
    tr.current_epoch, tr.current_batch = 1, b
    # as the epoch loop sets them: the batch's rows (the student's reward rows) and a host copy (neighbour sets)
    tr.current_batch_index = perm[sl]
    tr.current_batch_index_cpu = order[sl]
    tr.current_batch_cpu = tr.train_queries_cpu[order[sl]]
    tr.train_step(perm[sl])  # the epoch loop's step (train.cuda_graphs: the captured one where there is one)
    tr.after_step(1, b)


def time_trainer_steps(tr: Trainer, batches: int, device: torch.device,
                       profile_steps: int = 0, profile_rounds: int = 1) -> tuple[float, int, dict[str, Any]]:
    """Seconds for ``batches`` optimizer steps of a dsom trainer (after one warm-up step; with a CUDA graph
    (``train.cuda_graphs``) after its warm-up steps and its capture), the batches timed, and
    (``profile_steps > 0``) :func:`split_profile` of that many further steps (``profile_rounds`` times, the fastest kept);
    the latter's dict also holds the timed steps' median (``median_step_s``: the epoch estimate least moved by a step
    that something else on the machine slowed). The batches are the trainer's own
    for epoch 1 (:meth:`Trainer.epoch_batches`: triples or pairs)."""
    order, offsets = tr.epoch_batches(1)
    perm = order.to(tr.train_queries.device)
    n_epoch = len(offsets) - 1
    batches = min(batches, n_epoch) if batches > 0 else n_epoch
    counter = iter(range(10**9))
    start = batches + 1  # the first profiled batch (after the warm-up and the timed ones)

    def reset() -> None:  # each profile round runs the same batches
        nonlocal counter
        counter = iter(range(start, 10**9))

    def step() -> None:
        b = next(counter)
        trainer_step(tr, order, perm, offsets, b % n_epoch, b)

    graph = tr.graph_step()
    warm = 1 if graph is None else graph.warmup + 1  # the warm-up steps and, with a CUDA graph, its capture
    start += warm - 1
    times = []
    for b in range(batches + warm):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        if b >= warm:
            times.append(time.perf_counter() - t0)
    prof = split_profile(step, device, profile_steps, profile_rounds, reset) if profile_steps > 0 else {}
    prof["median_step_s"] = float(np.median(times)) if times else math.nan
    # each timed step's seconds and score rows (a slow step of a pair epoch: more rows, or something else)
    timed = [v % n_epoch for v in range(warm, batches + warm)]  # the counter values of the timed steps
    prof["timed_step_s"] = [round(t, 4) for t in times]
    prof["timed_step_rows"] = [batch_rows(tr, order, offsets, b) for b in timed]
    return sum(times), batches, prof


def batch_rows(tr: Trainer, order: torch.Tensor, offsets: list[int], b: int) -> int:
    """Score rows of batch ``b`` of epoch 1: its distinct pairs under pair batching, else its queries."""
    if tr.batching != "pairs":
        return offsets[b + 1] - offsets[b]
    assert tr._pairs is not None
    return len(torch.unique(tr._pairs.pair_of[order[offsets[b]:offsets[b + 1]]]))


# ------------------------------------------------------------------------------------------- phases
def base_config(args: argparse.Namespace, device: torch.device) -> Config:
    cfg = Config()
    for k, v in {"model.rank": args.rank, "train.batch_size": args.batch_size, "train.precision": args.precision,
                 "train.device": str(device), "train.valid_every": 0, "train.batching": args.batching,
                 "distill.batching": args.batching, "train.compile": args.compile,
                 "train.cuda_graphs": getattr(args, "cuda_graphs", "auto")}.items():
        set_value(cfg, k, v)
    if getattr(args, "pair_max_queries", None) is not None:
        set_value(cfg, "train.pair_max_queries", args.pair_max_queries)
    return cfg


def phase_dsom_complex(ds: KGDataset, args: argparse.Namespace, device: torch.device, tmp: str) -> dict[str, Any]:
    tr = ComplExTrainer(ds, base_config(args, device), tmp, progress=False)
    seconds, timed, prof = time_trainer_steps(tr, args.batches, device, args.profile_steps, args.profile_rounds)
    n_epoch = len(tr.epoch_batches(1)[1]) - 1
    rows = score_rows(tr)
    return {"epoch_s": seconds / timed * n_epoch, "median_epoch_s": prof.pop("median_step_s") * n_epoch,
            "batches_timed": timed, "batches_per_epoch": n_epoch,
            "queries_per_s": len(tr.train_queries) / (seconds / timed * n_epoch),
            "flop_per_epoch": 3 * 2 * rows * 2 * args.rank * ds.num_entities, "score_rows_per_epoch": rows,
            "dedup_flop_per_epoch": 3 * 2 * args.pairs * 2 * args.rank * ds.num_entities,
            "batching": tr.batching, "precision": tr.precision, "profile": prof}


def random_features(ds: KGDataset, modalities: list[str]) -> dict[str, ModalityTable]:
    """A random feature table of the real width (:data:`FEATURE_DIMS`) for each feature modality of ``modalities``
    (seed 0, every entity present): the timing does not depend on the values."""
    rng = np.random.default_rng(0)
    return {m: ModalityTable(m, rng.standard_normal((ds.num_entities, FEATURE_DIMS[m]), dtype=np.float32),
                             np.ones(ds.num_entities, bool)) for m in modalities if m != "structure"}


def phase_dsom_teachers(ds: KGDataset, args: argparse.Namespace, device: torch.device, tmp: str) -> dict[str, Any]:
    cfg = base_config(args, device)
    mods = args.modalities.split(",")
    set_value(cfg, "modalities", mods)
    tr = TeacherTrainer(ds, cfg, tmp, random_features(ds, mods), progress=False)
    seconds, timed, prof = time_trainer_steps(tr, args.batches, device, args.profile_steps, args.profile_rounds)
    n_epoch = len(tr.epoch_batches(1)[1]) - 1
    rows = score_rows(tr)
    M = len(mods)
    two_d = 2 * args.rank
    xw = n_epoch * sum(4 * ds.num_entities * FEATURE_DIMS[m] * two_d for m in mods if m != "structure")  # X W, dW
    flop = 3 * 2 * rows * two_d * ds.num_entities * M + xw
    dedup = 3 * 2 * args.pairs * two_d * ds.num_entities * M + xw
    return {"epoch_s": seconds / timed * n_epoch, "median_epoch_s": prof.pop("median_step_s") * n_epoch,
            "batches_timed": timed, "batches_per_epoch": n_epoch,
            "queries_per_s": len(tr.train_queries) / (seconds / timed * n_epoch), "flop_per_epoch": flop,
            "score_rows_per_epoch": rows, "dedup_flop_per_epoch": dedup, "batching": tr.batching, "teachers": M,
            "precision": tr.precision, "profile": prof}


def phase_trainer(phase: str, ds: KGDataset, cfg: Config, modalities: str, tmp: str) -> Trainer:
    """The trainer of a benchmark phase: ``complex`` (one structural ComplEx), ``teachers`` (stage 1 with the
    comma-separated ``modalities`` and :func:`random_features`) or ``distill`` (:func:`stage2_trainer` with dsom's
    held-out rewards), configured by ``cfg`` (changed in place for ``teachers``)."""
    if phase == "complex":
        return ComplExTrainer(ds, cfg, tmp, progress=False)
    if phase == "teachers":
        mods = modalities.split(",")
        set_value(cfg, "modalities", mods)
        return TeacherTrainer(ds, cfg, tmp, random_features(ds, mods), progress=False)
    if phase == "distill":
        return stage2_trainer(ds, cfg, modalities, "holdout", tmp)[0]
    raise ValueError(f"unknown phase {phase!r}; choose complex, teachers or distill")


def stage2_trainer(ds: KGDataset, cfg: Config, modalities: str, rewards: str,
                   tmp: str) -> tuple[StudentTrainer, torch.Tensor | None, torch.Tensor | None]:
    """The benchmark's stage 2: a student of ``cfg`` against random frozen teachers of rank ``cfg.model.rank`` (one
    per modality of the comma-separated ``modalities``); ``rewards`` ``holdout`` (dsom's defaults: rewards on the
    held-out triples only, calibrated teachers) or ``all``. The tracker writes nothing per step. Returns the trainer,
    the rewarded rows given to it and the teachers' temperatures (``None``: every row, no temperatures)."""
    mods = modalities.split(",")
    M = len(mods)
    g = torch.Generator().manual_seed(0)
    E, R2, two_d = ds.num_entities, 2 * ds.num_relations, 2 * cfg.model.rank
    frozen = FrozenTeachers(mods, torch.randn(M, E, two_d, generator=g) * 0.1,
                            torch.randn(M, R2, two_d, generator=g) * 0.1)
    rewarded = temps = None
    if rewards == "holdout":
        rewarded = reward_rows(ds, cfg.distill.holdout, cfg.distill.holdout_seed)
        temps = torch.tensor(CALIBRATION[:M] + [1.0] * max(M - len(CALIBRATION), 0))
    tr = StudentTrainer(ds, cfg, tmp, frozen, progress=False, reward_rows=rewarded, temperatures=temps)
    tr.tracker.log = lambda record: None  # type: ignore[method-assign]  # no per-step file writes in the timing
    return tr, rewarded, temps


def count_teacher_rows(teachers: FrozenTeachers, full: Callable[[], bool] = lambda: False) -> list[Any]:
    """Wrap ``teachers.logits`` (on the instance) to count, in the returned ``[scored, total]`` (updated in place and
    reset by the caller), the teacher rows scored and the ``M x rows`` rows of the blocks; ``full()`` true: score every
    teacher on every row (the ``rows`` a selector asked for are dropped). ``scored`` may be a tensor on the trainer's
    device (read it with ``float``): counting never waits for the device."""
    logits = teachers.logits  # the bound method
    count = [0, 0]

    def counted(head: torch.Tensor, relation: torch.Tensor, precision: str = "fp32", scale: Any = None,
                queries: Any = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        rows = None if full() else rows
        count[0] += teachers.num_teachers * len(head) if rows is None else rows.sum()
        count[1] += teachers.num_teachers * len(head)
        return logits(head, relation, precision, scale, *(() if queries is None else (queries,)), rows=rows)

    row_logits = teachers.row_logits

    def counted_rows(head: torch.Tensor, relation: torch.Tensor, rows: torch.Tensor, *args: Any,
                     **kwargs: Any) -> Any:  # each teacher's rows as its own block (no full() here: see teacher_rows)
        count[0] += rows.sum()
        count[1] += teachers.num_teachers * len(head)
        return row_logits(head, relation, rows, *args, **kwargs)

    teachers.logits = counted  # type: ignore[method-assign]
    teachers.row_logits = counted_rows  # type: ignore[method-assign]
    return count


def phase_dsom_distill(ds: KGDataset, args: argparse.Namespace, device: torch.device, tmp: str) -> dict[str, Any]:
    cfg = base_config(args, device)
    M = len(args.modalities.split(","))
    set_value(cfg, "distill.policy_hidden", args.policy_hidden)
    set_value(cfg, "distill.policy_state", args.policy_state)
    E, two_d = ds.num_entities, 2 * args.rank
    tr, rewarded, temps = stage2_trainer(ds, cfg, args.modalities, args.rewards, tmp)
    policy, selector = tr.model.policy, tr.model.selector
    cached = getattr(policy, "cache", None) is not None and args.stage2_epoch == "later"
    rewards_cached = getattr(selector, "reward_cache", None) is not None and args.stage2_epoch == "later"
    if cached or rewards_cached:  # as from epoch 2 on: every summary state and reward CE the timed steps need is in
        time_trainer_steps(tr, args.batches + args.profile_steps, device)  # its cache, which is sealed
        if cached:
            policy.cache.sealed = True
        if rewards_cached:
            selector.reward_cache.sealed = True
    count = count_teacher_rows(tr.model.teachers)
    seconds, timed, prof = time_trainer_steps(tr, args.batches, device, args.profile_steps, args.profile_rounds)
    n_epoch = len(tr.epoch_batches(1)[1]) - 1
    H, N = args.policy_hidden, len(tr.train_queries)
    share = float(count[0]) / max(count[1], 1)  # the teachers are scored only where a query reads them

    def scoring(rows: int) -> int:  # teachers forward only (the rows scored); student forward + 2 backward products
        return round(2 * rows * two_d * E * M * share) + 3 * 2 * rows * two_d * E

    # layer 1 forward + weight gradient, once per score row (per pair under pair batching: the state is the pair's);
    # with an index of reward rows (a CPU, per-query batches) the gradient and its forward over those rows only
    # (Policy.split_forward)
    n_rows = score_rows(tr)
    split = (args.policy_state != "summary" and rewarded is not None and tr.batching == "triples"
             and getattr(selector, "split_rows", False) and perf.device_is_host(device))
    grad_rows = round(float(rewarded.float().sum())) if split and rewarded is not None else None

    def layer1(rows: int) -> int:
        if args.policy_state == "summary":
            return 0
        if grad_rows is None:
            return 2 * 2 * rows * M * E * H
        return 2 * rows * M * E * H + 2 * 2 * min(grad_rows, rows) * M * E * H

    policy_flop, dedup_policy = layer1(n_rows), layer1(args.pairs)
    return {"epoch_s": seconds / timed * n_epoch, "median_epoch_s": prof.pop("median_step_s") * n_epoch,
            "batches_timed": timed, "batches_per_epoch": n_epoch,
            "queries_per_s": N / (seconds / timed * n_epoch), "flop_per_epoch": scoring(n_rows) + policy_flop,
            "score_rows_per_epoch": n_rows, "dedup_flop_per_epoch": scoring(args.pairs) + dedup_policy,
            "policy_flop_per_epoch": policy_flop, "teachers": M, "policy_hidden": H, "policy_state": args.policy_state,
            "summary_cache": "read" if cached else "computed", "reward_cache": "read" if rewards_cached else "computed",
            "teacher_rows_scored": share,
            "rewards": args.rewards, "reward_rows_fraction": 1.0 if rewarded is None else float(rewarded.float().mean()),
            "temperatures": None if temps is None else temps.tolist(),
            "precision": tr.precision, "batching": tr.batching, "profile": prof}


def phase_dsom_eval(ds: KGDataset, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    model = ComplEx(ds.num_entities, 2 * ds.num_relations, args.rank, 0.1,
                    generator=torch.Generator().manual_seed(0)).to(device)
    sync(device)
    t0 = time.perf_counter()
    m = evaluate(model, ds, "test", batch_size=args.batch_size, device=device)
    sync(device)
    seconds = time.perf_counter() - t0
    n = 2 * len(ds.test)
    test = torch.from_numpy(ds.queries("test"))
    pairs = PairIndex(test).num_pairs  # evaluation scores each distinct pair once
    prof = (split_profile(lambda: evaluate(model, ds, "test", batch_size=args.batch_size, device=device), device, 1)
            if args.profile_steps > 0 else {})
    return {"seconds": seconds, "queries": n, "queries_per_s": n / seconds,
            "flop": 2 * n * 2 * args.rank * ds.num_entities, "dedup_flop_per_epoch": 2 * pairs * 2 * args.rank *
            ds.num_entities, "mrr_random_model": m["realistic"]["mrr"], "profile": prof}


def _pykeen_factory(ds: KGDataset, triples: np.ndarray) -> Any:
    from pykeen.triples import TriplesFactory

    return TriplesFactory(mapped_triples=torch.from_numpy(np.ascontiguousarray(triples)),
                          entity_to_id={label: i for i, label in enumerate(ds.entities.labels)},
                          relation_to_id={label: i for i, label in enumerate(ds.relations.labels)},
                          create_inverse_triples=True)


def lcwa_instances(triples: np.ndarray, num_relations: int) -> int:
    """Unique (h, r) pairs of the triples plus unique (t, r^-1) pairs: PyKEEN's LCWA instances with inverses."""
    fwd = np.unique(triples[:, 0].astype(np.int64) * (2 * num_relations) + triples[:, 1])
    inv = np.unique(triples[:, 2].astype(np.int64) * (2 * num_relations) + triples[:, 1] + num_relations)
    return len(fwd) + len(inv)


def phase_pykeen_complex(ds: KGDataset, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from pykeen.models import ComplEx as PKComplEx
    from pykeen.training import LCWATrainingLoop

    train = ds.train
    total = lcwa_instances(train, ds.num_relations)
    n_epoch = -(-total // args.batch_size)
    if args.batches > 0 and args.batches < n_epoch:
        # The smallest prefix of a fixed shuffle of train whose LCWA instances fill the requested batches.
        order = np.random.default_rng(0).permutation(len(train))
        want = args.batches * args.batch_size
        lo, hi = 1, len(train)
        while lo < hi:
            mid = (lo + hi) // 2
            if lcwa_instances(train[order[:mid]], ds.num_relations) >= want:
                hi = mid
            else:
                lo = mid + 1
        subset = train[order[:lo]]
    else:
        subset = train
    tf = _pykeen_factory(ds, subset)
    instances = lcwa_instances(subset, ds.num_relations)

    def make(factory: Any) -> tuple[Any, Any]:
        model = PKComplEx(triples_factory=factory, embedding_dim=args.rank, loss="crossentropy",
                          random_seed=0).to(device)
        return model, LCWATrainingLoop(model=model, triples_factory=factory, optimizer="adagrad",
                                       optimizer_kwargs={"lr": 0.1})

    warm = _pykeen_factory(ds, subset[: max(1, len(subset) // 20)])
    make(warm)[1].train(triples_factory=warm, num_epochs=1, batch_size=args.batch_size, use_tqdm=False)  # warm-up
    model, loop = make(tf)
    sync(device)
    t0 = time.perf_counter()
    loop.train(triples_factory=tf, num_epochs=1, batch_size=args.batch_size, use_tqdm=False)
    sync(device)
    seconds = time.perf_counter() - t0
    timed = -(-instances // args.batch_size)
    flop = 3 * 2 * args.batch_size * 2 * args.rank * ds.num_entities
    return {"epoch_s": seconds / instances * total, "batches_timed": timed, "batches_per_epoch": n_epoch,
            "queries_per_s": instances / seconds, "flop_per_epoch": flop * n_epoch, "lcwa_instances": total,
            "pykeen_model": model, "factory": tf}


def phase_pykeen_eval(ds: KGDataset, args: argparse.Namespace, device: torch.device, model: Any) -> dict[str, Any]:
    from pykeen.evaluation import RankBasedEvaluator

    sync(device)
    t0 = time.perf_counter()
    res = RankBasedEvaluator(filtered=True).evaluate(
        model, mapped_triples=torch.from_numpy(ds.test), batch_size=args.batch_size,
        additional_filter_triples=[torch.from_numpy(ds.train), torch.from_numpy(ds.valid)], use_tqdm=False)
    sync(device)
    seconds = time.perf_counter() - t0
    n = 2 * len(ds.test)
    return {"seconds": seconds, "queries": n, "queries_per_s": n / seconds,
            "flop": 2 * n * 2 * args.rank * ds.num_entities,
            "mrr_random_model": float(res.get_metric("both.realistic.inverse_harmonic_mean_rank"))}


# ---------------------------------------------------------------------------------------------- main
def run_phase(name: str, fn: Callable[[], dict[str, Any]], device: torch.device, results: dict[str, Any]) -> None:
    print(f"[{name}] running ...", file=sys.stderr, flush=True)
    reset_peak(device)
    out = fn()
    out.update(peak_mb(device))
    results[name] = out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", nargs="?", default="DB15K")
    p.add_argument("--rank", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--batches", type=int, default=0, help="time N batches per training phase (0 = a full epoch)")
    p.add_argument("--modalities", default="structure,text,numeric")
    p.add_argument("--policy-hidden", type=int, default=1024)
    p.add_argument("--policy-state", default="logits", choices=["logits", "summary"],
                   help="stage-2 policy state: the paper's raw logits (default, comparable with earlier runs) or "
                        "dsom's summary")
    p.add_argument("--stage2-epoch", default="later", choices=["later", "first"],
                   help="stage 2: time a 'later' epoch (default: the summary policy's state cache and the reward "
                        "cache already hold the timed batches' pairs and triples, as from epoch 2 on; the batches are "
                        "run once untimed to fill them) or the 'first' (every state and reward CE computed)")
    p.add_argument("--rewards", default="holdout", choices=["holdout", "all"],
                   help="stage 2: 'holdout' = dsom's defaults (the policy rewarded on the distill.holdout triples only, "
                        "teachers calibrated by temperatures), 'all' = every row rewarded, no temperatures (the "
                        "benchmark before 2026-12-02; the paper rewards every row)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--batching", default="triples", choices=["triples", "pairs"],
                   help="train.batching and distill.batching: every training phase (ComplEx, stage 1 and stage 2)")
    p.add_argument("--pair-max-queries", type=int, default=None,
                   help="train.pair_max_queries: with --batching pairs, cut pairs into pieces of at most this many "
                        "queries (0 = whole pairs; default: the configuration's default)")
    p.add_argument("--device", default="auto")
    p.add_argument("--cuda-graphs", default="auto", choices=["auto", "off"],
                   help="train.cuda_graphs for the dsom phases (auto: the ComplEx and stage-1 steps captured on CUDA)")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="train.compile for the dsom phases (auto: on for CUDA and for B x E >= 4M cells on a CPU)")
    p.add_argument("--profile-steps", type=int, default=2,
                   help="training steps per phase run under torch.profiler for the in/outside-products split (0 = none)")
    p.add_argument("--profile-rounds", type=int, default=3,
                   help="profile the same steps this many times and keep the fastest round (the profiler itself can "
                        "slow a round; default 3)")
    p.add_argument("--outside-ops", type=int, default=4,
                   help=f"also list this many of the largest outside ops per profiled phase (at most {OUTSIDE_OPS_KEPT})")
    p.add_argument("--skip", default="", help=f"comma-separated phases to skip ({', '.join(SKIPPABLE)})")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    tune_allocator()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    skip = set(filter(None, args.skip.split(",")))
    if unknown := skip - set(SKIPPABLE):
        p.error(f"--skip: unknown phase(s) {', '.join(sorted(unknown))}; choose from {', '.join(SKIPPABLE)}")
    ds = registry.load(args.dataset)
    args.pairs = PairIndex(torch.from_numpy(ds.queries("train"))).num_pairs  # distinct (entity, relation) pairs
    tmp = f"/tmp/dsom-speed-{os.getpid()}"
    res: dict[str, Any] = {}
    shape = (args.batch_size, 2 * args.rank, ds.num_entities)
    peaks = {"fp32": matmul_peak(torch.float32, *shape, device), "bf16": matmul_peak(torch.bfloat16, *shape, device)}
    best_prec = max(peaks, key=peaks.get)
    peak = peaks[best_prec] * 1e12
    res["machine"] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                      "threads": torch.get_num_threads(), "torch": torch.__version__, "device": str(device),
                      "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                      "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
                      "peak_tflops": {k: round(v, 4) for k, v in peaks.items()}, "roofline_precision": best_prec,
                      "training_precision": resolve_precision(args.precision, device)}
    res["setup"] = {"dataset": ds.name, "entities": ds.num_entities, "relations": ds.num_relations,
                    "train_triples": len(ds.train), "test_triples": len(ds.test), "rank": args.rank,
                    "batch_size": args.batch_size, "batches": args.batches, "modalities": args.modalities,
                    "policy_hidden": args.policy_hidden, "batching": args.batching,
                    "pair_max_queries": args.pair_max_queries if args.pair_max_queries is not None
                    else Config().train.pair_max_queries}
    if "complex" not in skip:
        run_phase("dsom_complex", lambda: phase_dsom_complex(ds, args, device, tmp), device, res)
    pk_model = None
    if "pykeen" not in skip:
        def pk() -> dict[str, Any]:
            nonlocal pk_model
            out = phase_pykeen_complex(ds, args, device)
            pk_model = out.pop("pykeen_model")
            out.pop("factory")
            return out
        run_phase("pykeen_complex", pk, device, res)
    if "teachers" not in skip:
        run_phase("dsom_teachers", lambda: phase_dsom_teachers(ds, args, device, tmp), device, res)
    if "distill" not in skip:
        run_phase("dsom_distill", lambda: phase_dsom_distill(ds, args, device, tmp), device, res)
    if "eval" not in skip:
        run_phase("dsom_eval", lambda: phase_dsom_eval(ds, args, device), device, res)
        if pk_model is not None:
            run_phase("pykeen_eval", lambda: phase_pykeen_eval(ds, args, device, pk_model), device, res)

    for r in res.values():
        if "flop_per_epoch" in r:
            r["roofline_s"] = r["flop_per_epoch"] / peak
            r["roofline_fraction"] = r["roofline_s"] / r["epoch_s"]
            if "dedup_flop_per_epoch" in r:
                r["dedup_roofline_fraction"] = r["dedup_flop_per_epoch"] / peak / r["epoch_s"]
        elif "flop" in r:
            r["roofline_s"] = r["flop"] / peak
            r["roofline_fraction"] = r["roofline_s"] / r["seconds"]
            if "dedup_flop_per_epoch" in r:
                r["dedup_roofline_fraction"] = r["dedup_flop_per_epoch"] / peak / r["seconds"]
    summary: dict[str, Any] = {}
    if "pykeen_complex" in res and "dsom_complex" in res:
        summary["dsom_vs_pykeen_train"] = res["pykeen_complex"]["epoch_s"] / res["dsom_complex"]["epoch_s"]
    if "pykeen_eval" in res:
        summary["dsom_vs_pykeen_eval"] = res["pykeen_eval"]["seconds"] / res["dsom_eval"]["seconds"]
    if "dsom_complex" in res:
        summary["complex_roofline_fraction"] = res["dsom_complex"]["roofline_fraction"]
    if "dsom_teachers" in res:
        summary["stage1_roofline_fraction"] = res["dsom_teachers"]["roofline_fraction"]
    if "dsom_distill" in res:
        summary["stage2_roofline_fraction"] = res["dsom_distill"]["roofline_fraction"]
    res = {**summary, **res}
    print_table(res, args.outside_ops)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)
    return res


def print_table(res: dict[str, Any], outside_ops: int = 4) -> None:
    m, s = res["machine"], res["setup"]
    print(f"machine: {m['processor']}, {m['threads']} threads, {m['device']}"
          f"{' (' + m['gpu'] + ')' if m['gpu'] else ''}, torch {m['torch']}, capability {m['cpu_capability']}")
    print(f"matmul peak at ({s['batch_size']}x{2 * s['rank']})x({2 * s['rank']}x{s['entities']}): "
          f"fp32 {m['peak_tflops']['fp32']:.3f} TFLOP/s, bf16 {m['peak_tflops']['bf16']:.3f} TFLOP/s; "
          f"roofline uses {m['roofline_precision']}; training precision {m['training_precision']}")
    print(f"{s['dataset']}: E={s['entities']}, rank {s['rank']}, batch {s['batch_size']}, "
          f"{'full epoch' if not s['batches'] else str(s['batches']) + ' batches scaled to an epoch'}, "
          f"batching {s.get('batching', 'triples')}")
    if "dsom_distill" in res:
        d = res["dsom_distill"]
        print(f"stage 2: policy state {d['policy_state']} (hidden {d['policy_hidden']}), rewards {d['rewards']}, "
              f"summary states {d.get('summary_cache', 'computed')}, reward CEs {d.get('reward_cache', 'computed')}, "
              f"teacher rows scored {d.get('teacher_rows_scored', 1.0):.3f}")
    print(f"{'phase':<16} {'s/epoch':>9} {'median':>7} {'queries/s':>10} {'TFLOP':>8} {'roofline s':>10} {'fraction':>8} "
          f"{'dedup TFLOP':>11} {'dedup frac':>10} {'peak RSS MB':>11}")
    for name, r in res.items():
        if not isinstance(r, dict) or "queries_per_s" not in r:
            continue
        secs = r.get("epoch_s", r.get("seconds"))
        flop = r.get("flop_per_epoch", r.get("flop", math.nan))
        dedup = r.get("dedup_flop_per_epoch", math.nan)
        print(f"{name:<16} {secs:9.1f} {r.get('median_epoch_s', math.nan):7.1f} {r['queries_per_s']:10.0f} {flop / 1e12:8.2f} {r['roofline_s']:10.1f} "
              f"{r['roofline_fraction']:8.3f} {dedup / 1e12:11.2f} {r.get('dedup_roofline_fraction', math.nan):10.3f} "
              f"{r['peak_rss_mb']:11.0f}" + (f"  GPU {r['peak_gpu_mb']:.0f} MB" if "peak_gpu_mb" in r else ""))
    stepped = {k: r["profile"] for k, r in res.items() if isinstance(r, dict) and r.get("profile", {}).get("timed_step_s")}
    if stepped:
        print("timed steps: seconds (min / median / max) and the three slowest with their score rows")
        for name, pr in stepped.items():
            t, rows = np.asarray(pr["timed_step_s"]), pr["timed_step_rows"]
            slow = ", ".join(f"{t[i]:.3f} s ({rows[i]} rows)" for i in np.argsort(-t)[:3])
            print(f"{name:<16} {t.min():.3f} / {np.median(t):.3f} / {t.max():.3f} s; rows {min(rows)}-{max(rows)}; "
                  f"slowest {slow}")
    profiled = {k: r["profile"] for k, r in res.items() if isinstance(r, dict) and "matmul_s" in r.get("profile", {})}
    if profiled:
        print("time per step under torch.profiler: inside the matrix products (self time of "
              f"{', '.join(x.removeprefix('aten::') for x in MATMUL_OPS)}) and outside (the rest of the wall time)")
        print(f"{'phase':<16} {'step s':>8} {'products s':>10} {'outside s':>9} {'outside %':>9} {'out/prod':>8} "
              f"{'faults':>7} {'rounds (step s)':>22}  largest outside ops (s)")
        for name, pr in profiled.items():
            top = ", ".join(f"{k.removeprefix('aten::')[:40]} {v:.3f}" for k, v in list(pr["top_outside"].items())[:4])
            ratio = pr["outside_s"] / pr["matmul_s"] if pr["matmul_s"] > 0 else math.nan
            print(f"{name:<16} {pr['step_s']:8.3f} {pr['matmul_s']:10.3f} {pr['outside_s']:9.3f} "
                  f"{100 * pr['outside_fraction']:8.1f}% {ratio:8.2f} {pr.get('minor_faults_per_step', math.nan):7.0f} "
                  f"{' '.join(f'{w:.3f}' for w in pr.get('round_step_s', [])):>22}  {top}")
        on_device = {k: pr for k, pr in profiled.items() if "device_busy_s" in pr}
        if on_device:
            print("on the GPU, per step: its busy time (its own kernels, copies, fills), the share of the step it sat "
                  "idle (waiting for the host), and its time outside the products, also against the product time")
            print(f"{'phase':<16} {'busy s':>8} {'idle %':>7} {'outside s':>9} {'out/prod':>8}  "
                  "largest other kernels (ms)")
            for name, pr in on_device.items():
                ratio = pr["device_outside_s"] / pr["matmul_s"] if pr["matmul_s"] > 0 else math.nan
                kern = ", ".join(f"{k[:40]} {1e3 * v:.3f}" for k, v in list(pr.get("top_kernels", {}).items())[:3])
                print(f"{name:<16} {pr['device_busy_s']:8.4f} {100 * pr['device_idle_fraction']:6.1f}% "
                      f"{pr['device_outside_s']:9.4f} {ratio:8.2f}  {kern}")
        if outside_ops > 4:
            for name, pr in profiled.items():
                print(f"{name}: the {outside_ops} largest outside ops, ms per step")
                for k, v in list(pr["top_outside"].items())[:outside_ops]:
                    print(f"    {1e3 * v:8.2f}  {k[:90]}")
    for k in ("dsom_vs_pykeen_train", "dsom_vs_pykeen_eval", "complex_roofline_fraction", "stage1_roofline_fraction",
              "stage2_roofline_fraction"):
        if k in res:
            print(f"{k}: {res[k]:.3f}")


if __name__ == "__main__":
    main()
