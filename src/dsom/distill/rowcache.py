"""Rows computed once per key and read from then on.

Stage 2 has two things that depend only on the frozen teachers and the training triples, never on the student or the
policy: the summary policy's state of each training (entity, relation) pair
(:class:`~dsom.distill.policy.SummaryPolicy`, ``distill.summary_cache``) and the reward CEs of every teacher subset on
each rewarded training query (:class:`~dsom.distill.selectors.PolicySelector`, ``distill.reward_cache``). Both are
computed in the first epoch, which visits every key, and read afterwards: a :class:`RowCache` each.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class RowCache(nn.Module):
    """``values (slots, width)`` float32 rows and ``filled (slots,)``, which of them are stored.

    Until :meth:`seal` finds every slot filled, the owner computes its rows and :meth:`store` s them; after, it reads
    them (:meth:`serves` true, :meth:`read`) and computes nothing. Sealing reads ``filled`` on the host (one sync):
    call it after an epoch. The buffers are left out of the owner's ``state_dict`` (they are rebuilt from the
    teachers); a trainer saves them with its train state (:meth:`state`, :meth:`load_state`) so a resumed run reads
    the same rows as an uninterrupted one.
    """

    def __init__(self, slots: int, width: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        if slots < 1 or width < 1:
            raise ValueError(f"a row cache needs at least one slot and one column, got {slots} x {width}")
        # one spare row past the slots: where :meth:`store` sends the rows it is told to drop (a fixed-shape write)
        self.register_buffer("_values", torch.zeros(slots + 1, width, device=device), persistent=False)
        self.register_buffer("_filled", torch.zeros(slots + 1, dtype=torch.bool, device=device), persistent=False)
        self.sealed = False

    @property
    def values(self) -> torch.Tensor:
        """``(slots, width)``: the rows (a view: written in place by :meth:`store` and the distributed merge)."""
        return self._values[:-1]

    @property
    def filled(self) -> torch.Tensor:
        """``(slots,)`` bool: which rows are stored."""
        return self._filled[:-1]

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    def serves(self, keys: torch.Tensor | None) -> bool:
        """Whether the rows of ``keys`` are read from here (the cache is sealed; ``None``: rows without a key)."""
        return keys is not None and self.sealed

    def read(self, keys: torch.Tensor) -> torch.Tensor:
        """The stored rows ``(n, width)`` of ``keys (n,)`` (a key of ``-1`` reads the spare row: zeros, or whatever a
        dropped row left there; callers mask those rows out)."""
        return self._values[keys]

    def store(self, keys: torch.Tensor, rows: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Store ``rows (n, width)`` (cast to float32) in the slots ``keys (n,)`` and mark them filled; with ``keep (n,)``
        bool only the rows where it is true (the others go to the spare row: no host read of ``keep``, one write of
        fixed shape, as a CUDA graph needs). Two kept rows must not share a slot."""
        if keep is not None:
            keys = torch.where(keep, keys, -1)
        self._values[keys] = rows.to(self._values.dtype)
        self._filled[keys] = True

    def seal(self) -> bool:
        """Seal the cache if every slot is filled (one host sync); returns whether it is sealed."""
        if not self.sealed:
            self.sealed = bool(self.filled.all())
        return self.sealed

    def state(self) -> dict[str, torch.Tensor]:
        """The rows and their filled flags, on the CPU, for a checkpoint."""
        return {"values": self.values.cpu(), "filled": self.filled.cpu()}

    def load_state(self, saved: dict[str, Any] | None) -> bool:
        """Restore :meth:`state` (then seal if complete); a missing or differently shaped state is ignored (the rows
        are computed again). Returns whether it was restored."""
        if saved is None or tuple(saved["values"].shape) != tuple(self.values.shape):
            return False
        self.values.copy_(saved["values"])
        self.filled.copy_(saved["filled"])
        self.seal()
        return True
