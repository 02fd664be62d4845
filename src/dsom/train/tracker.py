"""Result tracking: ``metrics.jsonl``, one JSON object per logged step or epoch (DESIGN §5)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class JsonlTracker:
    """Appends records to ``metrics.jsonl``; ``truncate_after`` supports resuming at an epoch boundary."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log_params(self, params: dict[str, Any]) -> None:
        self.log({"event": "params", **params})

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None, **context: Any) -> None:
        self.log({**context, **({"step": step} if step is not None else {}), **metrics})

    def log(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(_clean(record)) + "\n")

    def truncate_after(self, stage: str, epoch: int) -> None:
        """Drop records of ``stage`` with an epoch later than ``epoch`` (work redone after a resume)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by an interruption
            if rec.get("stage") == stage and isinstance(rec.get("epoch"), int) and rec["epoch"] > epoch:
                continue
            kept.append(line)
        self.path.write_text("".join(x + "\n" for x in kept), encoding="utf-8")

    def end_run(self, success: bool = True) -> None:
        self.log({"event": "end", "success": success})

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        return out
