"""PyKEEN interchange: a dsom ComplEx (a student, or one teacher's materialised table) as a PyKEEN ``ComplEx`` and
back. Needs the ``[pykeen]`` extra.

dsom answers ``(h, r, ?)`` with relation ``r`` and ``(?, r, t)`` with a learned reciprocal relation ``r + R`` scored
from ``t``. PyKEEN expresses exactly this with inverse triples (``create_inverse_triples=True``): relation ``r`` is
its row ``2r`` and the inverse its row ``2r + 1`` (``DefaultRelationInverter``). Complex embeddings are stored as
``[re, im]`` halves in dsom and interleaved ``(re, im)`` pairs in PyKEEN.

An export folder has PyKEEN's own layout (what ``pipeline_result.save_to_directory`` writes): ``trained_model.pkl``
(``torch.load(..., weights_only=False)``; PyKEEN pickles the whole module) and ``training_triples/``
(``TriplesFactory.from_path_binary``), plus ``dsom_export.json`` saying what was exported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsom.data.graph import Vocabulary
from dsom.errors import DsomError
from dsom.models.complex import ComplEx


def _require_pykeen() -> Any:
    try:
        import pykeen  # noqa: F401
    except ImportError as exc:
        raise DsomError("PyKEEN interchange needs the [pykeen] extra: pip install 'dsom[pykeen]'") from exc
    import pykeen.models
    import pykeen.triples

    return pykeen


def interleave(x: torch.Tensor) -> torch.Tensor:
    """``(n, 2d)`` ``[re | im]`` -> ``(n, 2d)`` ``re0, im0, re1, im1, ...`` (PyKEEN's complex storage)."""
    d = x.shape[1] // 2
    return torch.stack([x[:, :d], x[:, d:]], dim=-1).reshape(x.shape[0], 2 * d)


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`interleave`."""
    pairs = x.reshape(x.shape[0], -1, 2)
    return torch.cat([pairs[..., 0], pairs[..., 1]], dim=1)


def to_pykeen(model: ComplEx, entities: Vocabulary, relations: Vocabulary, train: np.ndarray) -> tuple[Any, Any]:
    """A PyKEEN ``ComplEx`` (with inverse triples) that scores exactly like ``model``, and its triples factory."""
    pykeen = _require_pykeen()
    R = len(relations)
    if model.num_relations != 2 * R:
        raise DsomError(f"model has {model.num_relations} relation rows, expected 2 x {R} (reciprocal relations)")
    tf = pykeen.triples.TriplesFactory(
        mapped_triples=torch.as_tensor(train, dtype=torch.long),
        entity_to_id={label: i for i, label in enumerate(entities.labels)},
        relation_to_id={label: i for i, label in enumerate(relations.labels)}, create_inverse_triples=True)
    pk = pykeen.models.ComplEx(triples_factory=tf, embedding_dim=model.rank, random_seed=0)
    rel = torch.empty(2 * R, 2 * model.rank)
    with torch.no_grad():
        rel[0::2] = model.relation[:R].detach().float().cpu()
        rel[1::2] = model.relation[R:].detach().float().cpu()
        pk.entity_representations[0]._embeddings.weight.copy_(interleave(model.entity.detach().float().cpu()))
        pk.relation_representations[0]._embeddings.weight.copy_(interleave(rel))
    return pk, tf


def from_pykeen(pk: Any) -> ComplEx:
    """A dsom ``ComplEx`` from a PyKEEN ``ComplEx``. Trained with inverse triples, its inverse relations become the
    reciprocal ones; without, each reciprocal relation is the conjugate of its relation (the same scores)."""
    pykeen = _require_pykeen()
    if not isinstance(pk, pykeen.models.ComplEx):
        raise DsomError(f"expected a PyKEEN ComplEx model, got {type(pk).__name__}")
    ent = deinterleave(pk.entity_representations[0]._embeddings.weight.detach().float().cpu())
    rel = deinterleave(pk.relation_representations[0]._embeddings.weight.detach().float().cpu())
    d = ent.shape[1] // 2
    if getattr(pk, "use_inverse_triples", False):
        forward, inverse = rel[0::2], rel[1::2]
    else:  # Re<h, r, conj(t)> = Re<t, conj(r), conj(h)>: the reciprocal of r is its conjugate
        forward, inverse = rel, torch.cat([rel[:, :d], -rel[:, d:]], dim=1)
    model = ComplEx(ent.shape[0], 2 * forward.shape[0], d)
    with torch.no_grad():
        model.entity.copy_(ent)
        model.relation.copy_(torch.cat([forward, inverse]))
    return model


def export_pykeen(model: ComplEx, entities: Vocabulary, relations: Vocabulary, train: np.ndarray, out: str | Path,
                  source: dict[str, Any]) -> Path:
    """Write ``out/trained_model.pkl``, ``out/training_triples/`` and ``out/dsom_export.json``."""
    pk, tf = to_pykeen(model, entities, relations, train)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(pk, out / "trained_model.pkl")
    tf.to_path_binary(out / "training_triples")
    (out / "dsom_export.json").write_text(json.dumps({
        **source, "pykeen_model": "ComplEx", "embedding_dim": model.rank, "create_inverse_triples": True,
        "load": "torch.load('trained_model.pkl', weights_only=False); "
                "TriplesFactory.from_path_binary('training_triples')"}, indent=2), encoding="utf-8")
    return out


def load_pykeen(folder: str | Path) -> tuple[Any, Any]:
    """A PyKEEN model folder (``trained_model.pkl`` and, if present, ``training_triples/``)."""
    pykeen = _require_pykeen()
    folder = Path(folder)
    if not (folder / "trained_model.pkl").is_file():
        raise DsomError(f"{folder}: no trained_model.pkl (a folder written by PyKEEN's save_to_directory)")
    pk = torch.load(folder / "trained_model.pkl", weights_only=False, map_location="cpu")
    tf = None
    if (folder / "training_triples").is_dir():
        tf = pykeen.triples.TriplesFactory.from_path_binary(folder / "training_triples")
    return pk, tf


def align_to(model: ComplEx, tf: Any, entities: Vocabulary, relations: Vocabulary) -> ComplEx:
    """Reorder the rows of an imported model from the PyKEEN factory's ids to the dataset's (labels must match)."""
    if tf is None:
        if model.num_entities != len(entities) or model.num_relations != 2 * len(relations):
            raise DsomError(f"the PyKEEN model has {model.num_entities} entities and {model.num_relations // 2} "
                            f"relations, the dataset {len(entities)} and {len(relations)}; without training_triples/ "
                            "the ids cannot be matched by label")
        return model
    missing = [x for x in entities.labels if x not in tf.entity_to_id][:3]
    missing += [x for x in relations.labels if x not in tf.relation_to_id][:3]
    if missing:
        raise DsomError(f"labels of the dataset not in the PyKEEN model's mapping (e.g. {', '.join(missing)}); "
                        "import it with the dataset it was trained on")
    e_idx = torch.tensor([tf.entity_to_id[x] for x in entities.labels])
    r_idx = torch.tensor([tf.relation_to_id[x] for x in relations.labels])
    R = model.num_relations // 2
    out = ComplEx(len(entities), 2 * len(relations), model.rank)
    with torch.no_grad():
        out.entity.copy_(model.entity[e_idx])
        out.relation.copy_(torch.cat([model.relation[:R][r_idx], model.relation[R:][r_idx]]))
    return out


__all__ = ["align_to", "deinterleave", "export_pykeen", "from_pykeen", "interleave", "load_pykeen", "to_pykeen"]
