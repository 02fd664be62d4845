"""The training step captured once as a CUDA graph and replayed (``train.cuda_graphs``, issue 12).

On a GPU a step at the benchmarks' shapes is bound by the host: an H200 spent 7.6 ms per ComplEx step on DB15K at
rank 500 for 0.15 ms of products, the time it takes Python and the dispatcher to issue a few hundred kernels one by
one (docs/performance.md, "GPU"). A CUDA graph records those kernels once and replays them with one call.

:class:`GraphStep` does this for a trainer whose step is a function of device tensors alone
(:attr:`~dsom.train.loop.Trainer.supports_cuda_graphs`): its batch is gathered on the device from an index held in a
fixed buffer, its optimizer is Adagrad run by :class:`~dsom.train.optim.DeviceAdagradStep` (learning rates in device
scalars, step counters advanced on the host after each replay), and its loss terms land in fixed tensors read after
the replay. The first :data:`WARMUP` steps of that batch size run eagerly (they compile the loss tails and give
every buffer its final place, on a side stream as CUDA requires), the next one is captured, and every later step of
the same size replays it. Steps of another size (the epoch's short last batch) run eagerly between replays and
update the same parameters and optimizer state. A capture that fails (an op that cannot be captured) is reported
once and the trainer goes on eagerly: the step is then what it was before.

A step may also depend on per-batch host work and host state (stage 2): before each step the trainer's
:meth:`~dsom.train.loop.Trainer.graph_inputs` does the batch's host-side part (stage 2: re-seed the generators the graph
draws from, registered with it by :meth:`~dsom.train.loop.Trainer.graph_generators`, and check that the batch's
neighbour pairs fit the fixed size the step lists them in); :meth:`~dsom.train.loop.Trainer.graph_key` names the host
state the captured step depends on (a cache sealed, the KD warm-up's weight, that size), and when it changes the step is
warmed up and captured again. What the loss leaves for the per-step bookkeeping
(:attr:`~dsom.train.loop.Trainer.step_outputs`) is the captured step's after each replay.

The graph computes what the eager step computes with the same kernels, in the same order; ``tests/test_graphs.py``
checks the parameters after graphed and eager training agree (on CUDA; on CPU the capture is stood in for by
re-running the step, which checks the buffers and the optimizer's bookkeeping).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from dsom.train.optim import DeviceAdagradStep, device_adagrad_problem

if TYPE_CHECKING:
    from dsom.train.loop import Trainer

log = logging.getLogger("dsom")
WARMUP = 2  # eager steps of the graph's batch size before the capture (the first compiles the loss tails)

#: ``capture(fn, generators)`` records ``fn`` (the whole step), drawing from ``generators``, and returns what replays it
Capture = Callable[[Callable[[], None], Sequence[torch.Generator]], Callable[[], None]]


def cuda_capture(fn: Callable[[], None], generators: Sequence[torch.Generator] = ()) -> Callable[[], None]:
    """Capture ``fn`` as a CUDA graph (its memory in the graph's private pool); returns the graph's ``replay``.

    ``generators``: CUDA generators ``fn`` draws from, registered with the graph: each replay draws from a
    generator's seed and offset at that moment (so re-seeding it before a replay gives the draws an eager step after
    the same seed makes) and advances its offset."""
    graph = torch.cuda.CUDAGraph()
    for gen in generators:
        graph.register_generator_state(gen)
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def rerun_capture(fn: Callable[[], None], generators: Sequence[torch.Generator] = ()) -> Callable[[], None]:
    """A stand-in for :func:`cuda_capture` where there is no CUDA (tests): "replaying" runs ``fn`` again, which reads
    the same fixed buffers (and re-seeded generators) a graph would."""
    return fn


def graph_problem(trainer: Trainer) -> str | None:
    """Why ``trainer``'s step cannot be captured (``None``: it can)."""
    t = trainer.cfg.train
    if not trainer.supports_cuda_graphs:
        return f"the {trainer.stage} step is not written to be captured"
    if trainer.batching != "triples":
        return "batching=pairs (a batch's number of pairs varies)"
    if trainer.distributed:
        return "torchrun (gradients are reduced between processes)"
    if not trainer.fused_step():
        return "the loss runs over entity chunks (train.block_mb)"
    return device_adagrad_problem(trainer.optimizer) if t.optimizer == "adagrad" else \
        f"train.optimizer={t.optimizer} (graphs run adagrad only)"


class GraphStep:
    """``trainer``'s training step on ``rows``-query batches as a CUDA graph; see the module docstring.

    Args:
        trainer: a trainer for which :func:`graph_problem` is ``None``.
        rows: the batch size the graph is captured for (``train.batch_size``).
        capture: :func:`cuda_capture` (``rerun_capture`` in tests).
        warmup: eager steps before the capture.
    """

    def __init__(self, trainer: Trainer, rows: int, capture: Capture = cuda_capture, warmup: int = WARMUP) -> None:
        self.trainer = trainer
        self.rows = rows
        self.capture = capture
        self.warmup = warmup
        device = trainer.device
        # the trainer's own on CUDA (its eager steps then compute what the graph does), else one for the graph
        self.update = trainer.device_update() or DeviceAdagradStep(trainer.optimizer,  # type: ignore[arg-type]
                                                                   compile=trainer.compiled)
        self.index = torch.zeros(rows, dtype=torch.int64, device=device)  # the batch's rows of train_queries
        self.terms: dict[str, torch.Tensor] = {}  # the last step's detached terms (fixed tensors once captured)
        self.replay: Callable[[], None] | None = None
        self.failed: str | None = None
        self.eager_steps = 0  # since the last capture (or the start)
        self.replays = 0
        self.captures = 0
        self.key: Hashable = None  # the trainer's graph_key at the capture
        self.outputs: dict[str, torch.Tensor] = {}  # the captured step's trainer.step_outputs
        self._side = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __call__(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Train on the queries ``train_queries[index]`` (``(rows,)``, on the device; the trainer's ``current_*``
        attributes describe the same batch); returns the step's detached terms (overwritten by the next replay: read or
        add them before)."""
        if len(index) != self.rows:
            raise ValueError(f"GraphStep holds batches of {self.rows} queries, got {len(index)}")
        tr = self.trainer
        self.index.copy_(index)
        tr.graph_inputs()
        key = tr.graph_key()
        if key != self.key:  # the step reads other host state now: warm up and capture it again
            self.replay, self.eager_steps, self.key = None, 0, key
        if self.replay is None and self.failed is None and self.eager_steps >= self.warmup:
            self._capture()
        if self.replay is not None:
            self.update.prepare()
            self.replay()
            self.update.count()
            tr.step_outputs = self.outputs
            self.replays += 1
            return self.terms
        with self._stream():
            terms = self.eager(tr.train_queries[self.index])
        self.eager_steps += 1
        return terms

    def release(self) -> None:
        """Drop the captured graph and what refers to its memory (its terms, the trainer's step outputs and gradients):
        after training, its private memory pool goes back to the allocator (a run trains several students one after
        another). The counts stay; a later step captures again."""
        self.replay = None
        self.terms, self.outputs = {}, {}
        self.trainer.step_outputs = {}
        self.trainer.zero_grad()

    def eager(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """One step on ``batch`` without the graph (the warm-up, short batches, or after a failed capture), with the
        graph's optimizer update."""
        tr = self.trainer
        step = tr.loss(batch)
        self.trainer.zero_grad()
        step.total.backward()
        self.update.step()
        tr.after_update()
        return step.detached()

    def _body(self) -> None:
        """The captured step: gather the batch, loss, backward (gradients allocated in the graph's pool), update."""
        tr = self.trainer
        self.trainer.zero_grad()
        index, tr.current_batch_index = tr.current_batch_index, self.index  # (what the loss gathers its rows with)
        tr.capturing = True
        try:
            step = tr.loss(tr.train_queries[self.index])
            step.total.backward()
            self.update.apply()
            tr.after_update()
        finally:
            tr.capturing, tr.current_batch_index = False, index
        self.terms = step.detached()
        self.outputs = tr.step_outputs

    def _capture(self) -> None:
        self.update.prepare()
        try:
            self.replay = self.capture(self._body, self.trainer.graph_generators())
            self.captures += 1
            log.info("%s: training step captured as a CUDA graph%s", self.trainer.stage,
                     "" if self.captures == 1 else f" again (capture {self.captures}: the step reads new host state)")
        except Exception as exc:  # noqa: BLE001 - any capture failure means: go on eagerly
            self.replay = None
            self.failed = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            self.trainer.zero_grad()
            log.warning("%s: the training step could not be captured as a CUDA graph (%s); training on without "
                        "(set train.cuda_graphs=off to skip the attempt)", self.trainer.stage, self.failed)
            if self.trainer.cfg.train.cuda_graphs == "on":
                raise

    @contextlib.contextmanager
    def _stream(self) -> Iterator[None]:
        """Eager steps before the capture run on a side stream (CUDA's rule for work a graph will capture)."""
        if self._side is None or self.replay is not None or self.failed is not None:
            yield
            return
        self._side.wait_stream(torch.cuda.current_stream(self.trainer.device))
        with torch.cuda.stream(self._side):
            yield
        torch.cuda.current_stream(self.trainer.device).wait_stream(self._side)
