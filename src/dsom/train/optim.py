"""Adagrad that keeps a bfloat16 copy of the large tables, written by the update itself (issue 12).

Under ``train.precision=bf16`` every step casts each float32 entity table to bfloat16 for its products
(:func:`~dsom.models.fused._cast`): a pass that reads the whole table and writes half of it again, right after the
optimizer wrote the table. :class:`ShadowAdagrad` writes that bfloat16 copy (the table's *shadow*) in the same pass as
the update, and :func:`~dsom.models.products.bf16_shadow` hands it to the next forward, so the table is not read
again. The update is torch's Adagrad (``sum += g^2``, ``p -= lr / (1 + (step - 1) lr_decay) * g / (sqrt(sum) + eps)``)
as one compiled element-wise pass; its state (``step``, ``sum``) is torch's, so checkpoints load either way.

Only parameters with at least :data:`SHADOW_MIN_NUMEL` elements get a shadow (entity tables; a relation table's cast
costs little), and only where the update is plain: dense float32 gradients, no weight decay, not maximising. Everything
else goes through torch's own (fused) step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from dsom.models.products import keep_bf16_shadow
from dsom.perf import MaybeCompiled

SHADOW_MIN_NUMEL = 1 << 20  # DB15K rank 500: the entity table has 12.8M elements, its relation table 0.56M


def adagrad_shadow_update(param: torch.Tensor, grad: torch.Tensor, state_sum: torch.Tensor, shadow: torch.Tensor,
                           clr: torch.Tensor, eps: float) -> None:
    """One Adagrad step of ``param`` in place, its bfloat16 copy written into ``shadow`` (one pass compiled)."""
    total = state_sum + grad * grad
    new = param - clr * grad / (total.sqrt() + eps)
    state_sum.copy_(total)
    param.copy_(new)
    shadow.copy_(new)


class ShadowAdagrad(torch.optim.Adagrad):
    """:class:`torch.optim.Adagrad` (fused on CPU) whose large parameters also get a bfloat16 shadow per step.

    Args:
        params, lr, fused: as for :class:`torch.optim.Adagrad`.
        compile: run the shadowed update through ``torch.compile`` (one pass). Eager, or if compilation fails, it is
            torch's fused step followed by a cast of each shadowed table (as fast as before, no faster).
    """

    def __init__(self, params: Iterable[Any], lr: float, fused: bool | None = None, compile: bool = True) -> None:
        super().__init__(params, lr=lr, fused=fused)
        self._update = MaybeCompiled(adagrad_shadow_update, compile)
        self._shadows: dict[int, torch.Tensor] = {}  # id(param) -> its bfloat16 buffer, reused every step

    def _shadowed(self, group: dict[str, Any], p: torch.Tensor) -> bool:
        return (p.grad is not None and p.numel() >= SHADOW_MIN_NUMEL and p.dtype == torch.float32
                and not p.grad.is_sparse and p.grad.dtype == torch.float32 and not group["weight_decay"]
                and not group["maximize"] and not group.get("differentiable", False))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        shadowed = [(group, p) for group in self.param_groups for p in group["params"] if self._shadowed(group, p)]
        if not self._update.enabled:  # eager (or compilation failed): torch's fused step, then one cast per table
            super().step()
            for _, p in shadowed:
                keep_bf16_shadow(p, self._shadow_of(p).copy_(p))
            return loss
        held: list[tuple[torch.Tensor, torch.Tensor]] = []
        try:
            for group, p in shadowed:
                state = self.state[p]
                state["step"] += 1
                clr = group["lr"] / (1 + (state["step"] - 1) * group["lr_decay"])
                clr_t = torch.as_tensor(clr, dtype=torch.float32, device=p.device)
                shadow = self._shadow_of(p)
                self._update(p, p.grad, state["sum"], shadow, clr_t, group["eps"])
                keep_bf16_shadow(p, shadow)
                held.append((p, p.grad))
                p.grad = None  # torch's step below skips it
            super().step()
        finally:
            for p, g in held:
                p.grad = g
        return loss

    def _shadow_of(self, p: torch.Tensor) -> torch.Tensor:
        """``p``'s bfloat16 buffer, made once and rewritten every step."""
        shadow = self._shadows.get(id(p))
        if shadow is None or shadow.shape != p.shape or shadow.device != p.device:
            shadow = self._shadows[id(p)] = torch.empty_like(p, dtype=torch.bfloat16)
        return shadow


def adagrad_update(param: torch.Tensor, grad: torch.Tensor, state_sum: torch.Tensor, clr: torch.Tensor,
                   eps: float) -> None:
    """One Adagrad step of ``param`` in place (``clr``: the step's learning rate as a device scalar)."""
    total = state_sum + grad * grad
    state_sum.copy_(total)
    param.copy_(param - clr * (grad / (total.sqrt() + eps)))  # torch's addcdiv order: the quotient, then the scale


class DeviceAdagradStep:
    """The update of an Adagrad optimizer (torch's or :class:`ShadowAdagrad`) with no host work inside it, for a
    training step captured as a CUDA graph (:mod:`dsom.train.graphs`).

    torch's Adagrad computes each step's learning rate ``lr / (1 + (step - 1) lr_decay)`` on the host and passes it to
    its kernels as a number, which a captured graph would keep forever. Here the learning rates live in device scalars
    (one per parameter group) that :meth:`prepare` rewrites on the host before each step where they change (the plateau
    scheduler), :meth:`apply` issues the update of every parameter (one element-wise pass each, compiled where the
    optimizer's updates are; a shadowed table's bfloat16 copy written in the same pass), and :meth:`count` advances the
    step counters on the host after it ran. The state (``sum``, ``step``) stays the optimizer's, so checkpoints and the
    eager steps between graph replays (a short last batch) continue it.

    Returns from :func:`device_adagrad_problem` say which optimizers it cannot run."""

    def __init__(self, optimizer: torch.optim.Adagrad, compile: bool) -> None:
        problem = device_adagrad_problem(optimizer)
        if problem:
            raise ValueError(problem)
        self.optimizer = optimizer
        self._update = MaybeCompiled(adagrad_update, compile)
        self._shadow_update = MaybeCompiled(adagrad_shadow_update, compile)
        self._clr: list[torch.Tensor] = []
        self._clr_host: list[float] = []
        for group in optimizer.param_groups:
            device = group["params"][0].device
            self._clr.append(torch.zeros((), dtype=torch.float32, device=device))
            self._clr_host.append(math.nan)

    def prepare(self) -> None:
        """Set each group's learning rate for the coming step (host; before a replay or :meth:`apply`). With
        ``lr_decay`` (dsom never sets it) the decay follows the group's first parameter's step count, torch's
        per-parameter one where every parameter of the group gets a gradient every step."""
        for i, group in enumerate(self.optimizer.param_groups):
            step = float(self.optimizer.state[group["params"][0]]["step"]) + 1
            clr = group["lr"] / (1 + (step - 1) * group["lr_decay"])
            if clr != self._clr_host[i]:
                self._clr[i].fill_(clr)
                self._clr_host[i] = clr

    @torch.no_grad()
    def apply(self) -> None:
        """Update every parameter that has a gradient (device work only: capturable)."""
        opt = self.optimizer
        shadowed = opt._shadowed if isinstance(opt, ShadowAdagrad) else None
        for i, group in enumerate(opt.param_groups):
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = opt.state[p]
                if shadowed is not None and shadowed(group, p):
                    shadow = opt._shadow_of(p)
                    self._shadow_update(p, p.grad, state["sum"], shadow, self._clr[i], group["eps"])
                    keep_bf16_shadow(p, shadow)
                else:
                    self._update(p, p.grad, state["sum"], self._clr[i], group["eps"])

    def count(self) -> None:
        """Advance the step counter of every parameter with a gradient (host; after the step ran)."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.optimizer.state[p]["step"] += 1

    def step(self) -> None:
        """One eager step: :meth:`prepare`, :meth:`apply`, :meth:`count`."""
        self.prepare()
        self.apply()
        self.count()


def device_adagrad_problem(optimizer: torch.optim.Optimizer) -> str | None:
    """Why :class:`DeviceAdagradStep` cannot run ``optimizer``'s update (``None``: it can)."""
    if not isinstance(optimizer, torch.optim.Adagrad):
        return f"train.optimizer is {type(optimizer).__name__.lower()}, not adagrad"
    for group in optimizer.param_groups:
        if group["weight_decay"] or group["maximize"] or group.get("differentiable", False):
            return "an Adagrad group with weight decay, maximize or differentiable"
        for p in group["params"]:
            if p.grad is not None and p.grad.is_sparse:
                return "sparse gradients"
    return None
