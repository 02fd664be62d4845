"""Dataset names: ``synthetic`` (generated, no files) or folders under ``$DSOM_DATA`` (DESIGN §3)."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

from dsom.data.graph import KGDataset
from dsom.data.readers import load_dataset
from dsom.data.synthetic import synthetic_from_options
from dsom.errors import DsomError

SYNTHETIC = "synthetic"

# Suggested sizes for datasets whose paper defaults would be needlessly slow; applied below user settings.
PRESETS: dict[str, dict[str, Any]] = {
    SYNTHETIC: {"model.rank": 32, "train.epochs": 24, "train.valid_every": 3, "train.batch_size": 1000,
                "modalities": ["structure", "text", "numeric", "image"], "distill.policy_hidden": 128,
                "distill.epochs": 8, "distill.variants": ["ndkd_avg"]},
}


def data_root() -> Path | None:
    root = os.environ.get("DSOM_DATA")
    return Path(root).expanduser() if root else None


def registered_names() -> list[str]:
    """``synthetic`` plus every sub-folder of ``$DSOM_DATA`` that looks like a dataset."""
    names = [SYNTHETIC]
    root = data_root()
    if root is not None and root.is_dir():
        for p in sorted(root.iterdir()):
            if p.is_dir() and any((p / f).exists() for f in ("train.tsv", "train.txt", "train2id.txt", "train")):
                names.append(p.name)
    return names


def resolve_path(name_or_path: str) -> Path:
    """A dataset folder for a registered name or a path; a clear error otherwise."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    root = data_root()
    if root is not None and (root / name_or_path).is_dir():
        return root / name_or_path
    known = registered_names()
    close = difflib.get_close_matches(name_or_path, known, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    where = f"$DSOM_DATA={root}" if root else "$DSOM_DATA is not set"
    raise DsomError(f"dataset '{name_or_path}' is neither a folder nor a registered name ({where}; known: "
                    f"{', '.join(known)}).{hint}")


def load(name_or_path: str, layout: str = "auto", synthetic: dict[str, Any] | None = None) -> KGDataset:
    """Load a dataset by registered name or path."""
    if name_or_path == SYNTHETIC:
        return synthetic_from_options(dict(synthetic or {}))
    path = resolve_path(name_or_path)
    return load_dataset(path, layout=None if layout == "auto" else layout)


def preset(name_or_path: str) -> dict[str, Any]:
    return dict(PRESETS.get(name_or_path, {}))
