"""Top-k answers for ``(head, relation, ?)`` or ``(?, relation, tail)`` queries."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch

from dsom.data.csr import CSRIndex
from dsom.data.graph import Vocabulary
from dsom.errors import DsomError
from dsom.evaluate import Scorer


@dataclass
class Answer:
    rank: int
    id: int
    label: str
    name: str
    score: float
    known: bool


def resolve_label(vocab: Vocabulary, text: str, kind: str) -> int:
    """Id of an entity/relation given by label, unique display name, or integer id ``#17``."""
    if text in vocab.index:
        return vocab.index[text]
    if text.startswith("#") and text[1:].isdigit() and int(text[1:]) < len(vocab):
        return int(text[1:])
    if vocab.names is not None:
        hits = [i for i, n in enumerate(vocab.names) if n == text]
        if len(hits) == 1:
            return hits[0]
        lowered = [i for i, n in enumerate(vocab.names) if n and n.lower() == text.lower()]
        if len(lowered) == 1:
            return lowered[0]
        if len(hits) > 1 or len(lowered) > 1:
            many = hits or lowered
            labels = ", ".join(vocab.labels[i] for i in many[:5])
            raise DsomError(f"{kind} name '{text}' is ambiguous ({len(many)} matches: {labels}); pass the label")
    pool = list(vocab.labels) + [n for n in (vocab.names or []) if n]
    close = difflib.get_close_matches(text, pool, n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(repr(c) for c in close)}" if close else ""
    raise DsomError(f"unknown {kind} '{text}'{hint}")


@torch.no_grad()
def predict(scorer: Scorer, entities: Vocabulary, relations: Vocabulary, relation: str, head: str | None = None,
            tail: str | None = None, k: int = 10, filter_index: CSRIndex | None = None,
            filter_known: bool = True) -> list[Answer]:
    """Top-``k`` answers with labels, names and fp32 scores.

    Give ``head`` for tail prediction or ``tail`` for head prediction (through the reciprocal relation).
    With ``filter_known`` and a ``filter_index``, entities already known as answers are left out.
    """
    if (head is None) == (tail is None):
        raise DsomError("give exactly one of --head (predict tails) or --tail (predict heads)")
    num_rel = len(relations)
    r = resolve_label(relations, relation, "relation")
    if head is not None:
        e = resolve_label(entities, head, "entity")
    else:
        e = resolve_label(entities, tail, "entity")  # type: ignore[arg-type]
        r += num_rel
    et, rt = torch.tensor([e]), torch.tensor([r])
    scores = scorer.score_all(et, rt, precision="fp32")[0].float().cpu()
    known = torch.zeros_like(scores, dtype=torch.bool)
    if filter_index is not None:
        _, cols = filter_index.pairs(et, rt)
        known[cols.cpu()] = True
    ranked = scores.masked_fill(known, float("-inf")) if filter_known else scores
    k = min(k, int((~torch.isinf(ranked)).sum()))
    top = torch.topk(ranked, k)
    return [Answer(rank=i + 1, id=int(j), label=entities.labels[int(j)], name=entities.name(int(j)),
                   score=float(scores[int(j)]), known=bool(known[int(j)]))
            for i, j in enumerate(top.indices)]
