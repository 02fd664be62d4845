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


def write_checkpoint(directory: str | Path, tensors: dict[str, torch.Tensor], dataset: KGDataset,
                     meta: dict[str, Any], train_state: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint folder atomically (write ``<dir>.tmp``, then swap). ``meta`` must hold
    ``format`` and ``model``."""
    final = Path(directory)
    tmp = final.with_name(final.name + ".tmp")
    old = final.with_name(final.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"))
    _write_vocab(tmp / "entities.tsv", dataset.entities, "entity")
    _write_vocab(tmp / "relations.tsv", dataset.relations, "relation")
    full_meta = {
        "dsom_version": __version__,
        "torch_version": torch.__version__,
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


def save_checkpoint(directory: str | Path, model: ComplEx, dataset: KGDataset, meta: dict[str, Any],
                    train_state: dict[str, Any] | None = None) -> Path:
    """Write a ComplEx checkpoint folder (format ``dsom-complex/1``)."""
    return write_checkpoint(directory, {"entity": model.entity, "relation": model.relation}, dataset, {
        "format": FORMAT,
        "model": {"type": "complex", "rank": model.rank, "num_entities": model.num_entities,
                  "num_relations": model.num_relations, "original_relations": dataset.num_relations},
        **meta}, train_state)


@dataclass
class LoadedCheckpoint:
    """``model`` is a scorer: a :class:`ComplEx`, or for a teachers checkpoint the Teacher-Avg view of
    ``teachers`` (a :class:`~dsom.models.teachers.FrozenTeachers`)."""

    model: Any
    meta: dict[str, Any]
    entities: Vocabulary
    relations: Vocabulary
    path: Path
    teachers: Any = None

    def train_state(self) -> dict[str, Any] | None:
        p = self.path / "train_state.pt"
        return torch.load(p, weights_only=True) if p.exists() else None


RUN_CHECKPOINTS = ("student/final", "teachers/final", "best", "last")


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """Accept a checkpoint folder, a run directory (its student, else its teachers, else ``checkpoints/best``)
    or a ``model.safetensors`` file."""
    p = Path(path)
    if p.is_file() and p.name == "model.safetensors":
        p = p.parent
    if (p / "checkpoints").is_dir():
        for name in RUN_CHECKPOINTS:
            if (p / "checkpoints" / name / "model.safetensors").exists():
                return p / "checkpoints" / name
    if not (p / "model.safetensors").exists():
        # An interrupted swap leaves '<name>.old' behind.
        old = p.with_name(p.name + ".old")
        if (old / "model.safetensors").exists():
            return old
        raise DsomError(f"no checkpoint at {p}: expected a folder with model.safetensors and meta.json "
                        "(or a run directory with checkpoints/)")
    return p


def read_checkpoint(path: str | Path) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor]]:
    """``(folder, meta, tensors)`` of any checkpoint folder."""
    d = resolve_checkpoint_dir(path)
    try:
        meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
        tensors = load_file(str(d / "model.safetensors"))
    except (OSError, ValueError) as exc:
        raise DsomError(f"cannot read checkpoint {d}: {exc}") from None
    return d, meta, tensors


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Load a ComplEx (student / structural) or a materialised teachers checkpoint as a scorer."""
    from dsom.models.teachers import TEACHERS_FORMAT, FrozenTeachers

    d, meta, tensors = read_checkpoint(path)
    fmt = meta.get("format")
    teachers = None
    if fmt == FORMAT:
        ent, rel = tensors["entity"], tensors["relation"]
        model: Any = ComplEx(ent.shape[0], rel.shape[0], ent.shape[1] // 2)
        with torch.no_grad():
            model.entity.copy_(ent)
            model.relation.copy_(rel)
        model.to(device)
    elif fmt == TEACHERS_FORMAT:
        teachers = FrozenTeachers.from_tensors(tensors, meta["model"]["modalities"]).to(device)
        model = teachers.view()
    else:
        raise DsomError(f"{d / 'meta.json'}: unsupported checkpoint format {fmt!r} "
                        f"(expected {FORMAT} or {TEACHERS_FORMAT})")
    return LoadedCheckpoint(model, meta, _read_vocab(d / "entities.tsv"), _read_vocab(d / "relations.tsv"), d,
                            teachers)
