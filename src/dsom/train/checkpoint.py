"""Checkpoints: a folder with ``model.safetensors`` + vocabulary + ``meta.json`` (no pickled modules).

Layout of a ComplEx checkpoint folder::

    model.safetensors   tensors 'entity' (E x 2d) and 'relation' (2R x 2d, reciprocals in rows R..2R-1),
                        [re | im] layout
    entities.tsv        id order: 'entity<TAB>name'
    relations.tsv       id order: 'relation<TAB>name'
    meta.json           format, model sizes, dataset name/path/fingerprint, config, epoch, metrics
    train_state.pt      (resumable checkpoints only) optimizer/scheduler/trainer state, loadable with
                        torch.load(..., weights_only=True)

Folders are written to a temporary sibling and swapped in, so an interruption never leaves a
half-written checkpoint behind.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dsom import __version__
from dsom.data.graph import KGDataset, Vocabulary
from dsom.errors import DsomError
from dsom.models.complex import ComplEx

FORMAT = "dsom-complex/1"


def _write_vocab(path: Path, vocab: Vocabulary, header: str) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        fh.write(f"{header}\tname\n")
        for i, label in enumerate(vocab.labels):
            name = vocab.name(i) if vocab.names is not None else ""
            fh.write(f"{label}\t{name.replace(chr(9), ' ').replace(chr(10), ' ')}\n")


def _read_vocab(path: Path) -> Vocabulary:
    labels, names = [], []
    with path.open(encoding="utf-8") as fh:
        next(fh, None)
        for line in fh:
            parts = line.rstrip("\n").split("\t")
            labels.append(parts[0])
            names.append(parts[1] if len(parts) > 1 else "")
    return Vocabulary(labels, names)


def save_checkpoint(directory: str | Path, model: ComplEx, dataset: KGDataset, meta: dict[str, Any],
                    train_state: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint folder atomically (write ``<dir>.tmp``, then swap)."""
    final = Path(directory)
    tmp = final.with_name(final.name + ".tmp")
    old = final.with_name(final.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {"entity": model.entity.detach().float().cpu().contiguous(),
               "relation": model.relation.detach().float().cpu().contiguous()}
    save_file(tensors, str(tmp / "model.safetensors"))
    _write_vocab(tmp / "entities.tsv", dataset.entities, "entity")
    _write_vocab(tmp / "relations.tsv", dataset.relations, "relation")
    full_meta = {
        "format": FORMAT,
        "dsom_version": __version__,
        "torch_version": torch.__version__,
        "model": {"type": "complex", "rank": model.rank, "num_entities": model.num_entities,
                  "num_relations": model.num_relations, "original_relations": dataset.num_relations},
        "dataset": {"name": dataset.name, "path": str(dataset.root) if dataset.root else None,
                    "layout": dataset.layout, "fingerprint": dataset.fingerprint()},
        **meta,
    }
    (tmp / "meta.json").write_text(json.dumps(full_meta, indent=2, default=str), encoding="utf-8")
    if train_state is not None:
        torch.save(train_state, tmp / "train_state.pt")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


@dataclass
class LoadedCheckpoint:
    model: ComplEx
    meta: dict[str, Any]
    entities: Vocabulary
    relations: Vocabulary
    path: Path

    def train_state(self) -> dict[str, Any] | None:
        p = self.path / "train_state.pt"
        return torch.load(p, weights_only=True) if p.exists() else None


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """Accept a checkpoint folder, a run directory (uses ``checkpoints/best``) or a ``model.safetensors`` file."""
    p = Path(path)
    if p.is_file() and p.name == "model.safetensors":
        p = p.parent
    if (p / "checkpoints").is_dir():
        for name in ("best", "last"):
            if (p / "checkpoints" / name / "model.safetensors").exists():
                return p / "checkpoints" / name
    if not (p / "model.safetensors").exists():
        # An interrupted swap leaves '<name>.old' behind.
        old = p.with_name(p.name + ".old")
        if (old / "model.safetensors").exists():
            return old
        raise DsomError(f"no checkpoint at {p}: expected a folder with model.safetensors and meta.json "
                        "(or a run directory with checkpoints/best)")
    return p


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    d = resolve_checkpoint_dir(path)
    try:
        meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
        tensors = load_file(str(d / "model.safetensors"))
    except (OSError, ValueError) as exc:
        raise DsomError(f"cannot read checkpoint {d}: {exc}") from None
    if meta.get("format") != FORMAT:
        raise DsomError(f"{d / 'meta.json'}: unsupported checkpoint format {meta.get('format')!r} (expected {FORMAT})")
    ent, rel = tensors["entity"], tensors["relation"]
    model = ComplEx(ent.shape[0], rel.shape[0], ent.shape[1] // 2)
    with torch.no_grad():
        model.entity.copy_(ent)
        model.relation.copy_(rel)
    model.to(device)
    return LoadedCheckpoint(model, meta, _read_vocab(d / "entities.tsv"), _read_vocab(d / "relations.tsv"), d)
