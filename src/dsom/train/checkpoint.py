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

from dsom import __version__, distributed
from dsom.data.graph import KGDataset, Vocabulary
from dsom.errors import DsomError
from dsom.models.complex import ComplEx
from dsom.models.teachers import TEACHERS_FORMAT, FrozenTeachers

FORMAT = "dsom-complex/1"


def _write_vocab(path: Path, vocab: Vocabulary, header: str) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        fh.write(f"{header}\tname\n")
        for i, label in enumerate(vocab.labels):
            name = vocab.name(i) if vocab.names is not None else ""
            fh.write(f"{label}\t{name.replace(chr(9), ' ').replace(chr(10), ' ')}\n")


def _read_vocab(path: Path) -> Vocabulary:
    labels, names = [], []
    try:
        with path.open(encoding="utf-8") as fh:
            next(fh, None)
            for line in fh:
                parts = line.rstrip("\n").split("\t")
                labels.append(parts[0])
                names.append(parts[1] if len(parts) > 1 else "")
        return Vocabulary(labels, names)
    except (OSError, UnicodeDecodeError) as exc:
        raise DsomError(f"{path}: cannot read the checkpoint's vocabulary ({_first_line(exc)})") from None
    except ValueError as exc:  # e.g. a label listed twice
        raise DsomError(f"{path}: invalid checkpoint vocabulary ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def load_train_state(path: Path) -> dict[str, Any]:
    """``train_state.pt`` (tensors and plain containers only), or a one-line :class:`DsomError` naming it."""
    try:
        state = torch.load(path, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated, corrupt or pickled-object files all mean a bad file
        # torch's weights_only message suggests weights_only=False, which would run code from the file: not advice
        # to pass on for a file dsom wrote with tensors and plain containers only
        why = ("it holds objects other than tensors and plain containers, or is corrupt" if "eights" in str(exc)
               and "only" in str(exc) else _first_line(exc))
        raise DsomError(f"{path}: cannot read the training state ({why}); remove that checkpoint folder to redo the "
                        "stage, or start over with --force") from None
    if not isinstance(state, dict) or not {"optimizer", "trainer"} <= set(state):
        raise DsomError(f"{path}: not a dsom training state (expected a mapping with 'optimizer' and 'trainer'); "
                        "remove that checkpoint folder to redo the stage, or start over with --force")
    return state


def write_checkpoint(directory: str | Path, tensors: dict[str, torch.Tensor], dataset: KGDataset,
                     meta: dict[str, Any], train_state: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint folder atomically (write ``<dir>.tmp``, then swap). ``meta`` must hold
    ``format`` and ``model``. Under torchrun only rank 0 writes (the others return the path it writes)."""
    final = Path(directory)
    if not distributed.is_main():
        return final
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
        return load_train_state(p) if p.exists() else None


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
    except (OSError, ValueError) as exc:
        raise DsomError(f"{d / 'meta.json'}: cannot read checkpoint metadata ({_first_line(exc)})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model", {}), dict) \
            or not isinstance(meta.get("dataset", {}), dict) or not isinstance(meta.get("config", {}), dict):
        raise DsomError(f"{d / 'meta.json'}: not dsom checkpoint metadata (expected a JSON object with 'format', "
                        "'model', 'dataset' and 'config' objects)")
    try:
        tensors = load_file(str(d / "model.safetensors"))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for truncated/corrupt files
        raise DsomError(f"{d / 'model.safetensors'}: cannot read the weights ({_first_line(exc)}); the file is "
                        "truncated or not a safetensors file") from None
    bad = [k for k, v in tensors.items() if not v.is_floating_point()]
    if bad:
        raise DsomError(f"{d / 'model.safetensors'}: tensor '{bad[0]}' is {tensors[bad[0]].dtype}, expected floats")
    return d, meta, tensors


def _check_shapes(d: Path, tensors: dict[str, torch.Tensor], need: dict[str, int], entities: int,
                  relations: int) -> None:
    """``need``: tensor name -> number of dimensions; rows must match the vocabularies (E entities, 2R relations)."""
    f = d / "model.safetensors"
    missing = [k for k in need if k not in tensors]
    if missing:
        raise DsomError(f"{f}: tensor '{missing[0]}' is missing (has {', '.join(sorted(tensors)) or 'none'})")
    shapes = {k: tuple(tensors[k].shape) for k in need}
    for k, nd in need.items():
        if len(shapes[k]) != nd:
            raise DsomError(f"{f}: tensor '{k}' has shape {shapes[k]}, expected {nd} dimensions")
    ent, rel = shapes[list(need)[0]], shapes[list(need)[1]]
    if ent[-2] != entities or rel[-2] != 2 * relations:
        raise DsomError(f"{f}: tensors '{list(need)[0]}' {ent} and '{list(need)[1]}' {rel} do not match the "
                        f"vocabularies ({entities} entities in entities.tsv, {relations} relations in relations.tsv "
                        "plus their reciprocals)")
    if ent[-1] != rel[-1] or ent[-1] % 2 or ent[-1] == 0 or ent[:-2] != rel[:-2]:
        raise DsomError(f"{f}: tensors '{list(need)[0]}' {ent} and '{list(need)[1]}' {rel} are not one ComplEx "
                        "model (equal, even widths needed)")


def check_vocabulary(meta: dict[str, Any], dataset: KGDataset, where: object, hint: str) -> None:
    """A one-line :class:`DsomError` when a checkpoint's recorded vocabulary fingerprint is not ``dataset``'s."""
    fp = meta.get("dataset", {}).get("fingerprint") if isinstance(meta.get("dataset"), dict) else None
    if fp is not None and fp != dataset.fingerprint():
        theirs = fp.get("entities") if isinstance(fp, dict) else fp
        raise DsomError(f"{where}: trained on a different vocabulary than dataset '{dataset.name}' (entities "
                        f"{theirs} vs {dataset.fingerprint()['entities']}); {hint}")


def check_teachers(d: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                   entities: Vocabulary | None = None, relations: Vocabulary | None = None) -> list[str]:
    """The modalities of a materialised teachers checkpoint after checking its tensors against its meta.json and
    vocabularies; a one-line :class:`DsomError` naming the file otherwise."""
    modalities = meta.get("model", {}).get("modalities")
    if not isinstance(modalities, list) or not modalities or not all(isinstance(m, str) for m in modalities):
        raise DsomError(f"{d / 'meta.json'}: model.modalities must be a non-empty list of names, got {modalities!r}")
    entities = entities if entities is not None else _read_vocab(d / "entities.tsv")
    relations = relations if relations is not None else _read_vocab(d / "relations.tsv")
    _check_shapes(d, tensors, {"tables": 3, "relations": 3}, len(entities), len(relations))
    if tensors["tables"].shape[0] != len(modalities):
        raise DsomError(f"{d / 'model.safetensors'}: {tensors['tables'].shape[0]} teacher tables for "
                        f"{len(modalities)} modalities in meta.json")
    return modalities


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Load a ComplEx (student / structural) or a materialised teachers checkpoint as a scorer."""
    d, meta, tensors = read_checkpoint(path)
    fmt = meta.get("format")
    teachers = None
    entities, relations = _read_vocab(d / "entities.tsv"), _read_vocab(d / "relations.tsv")
    if fmt == FORMAT:
        _check_shapes(d, tensors, {"entity": 2, "relation": 2}, len(entities), len(relations))
        ent, rel = tensors["entity"], tensors["relation"]
        model: Any = ComplEx(ent.shape[0], rel.shape[0], ent.shape[1] // 2)
        with torch.no_grad():
            model.entity.copy_(ent)
            model.relation.copy_(rel)
        model.to(device)
    elif fmt == TEACHERS_FORMAT:
        modalities = check_teachers(d, meta, tensors, entities, relations)
        teachers = FrozenTeachers.from_tensors(tensors, modalities).to(device)
        model = teachers.view()
    else:
        raise DsomError(f"{d / 'meta.json'}: unsupported checkpoint format {fmt!r} "
                        f"(expected {FORMAT} or {TEACHERS_FORMAT})")
    return LoadedCheckpoint(model, meta, entities, relations, d, teachers)
