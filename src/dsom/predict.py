"""Top-k answers for ``(head, relation, ?)`` or ``(?, relation, tail)`` queries."""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from dsom.data.csr import CSRIndex
from dsom.data.graph import Vocabulary
from dsom.errors import DataError, DsomError
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


@dataclass
class Query:
    """One line of a ``--queries`` file: ``entity`` and ``relation`` ids (``relation >= R`` = a head query)."""

    line: int
    text: str
    entity: int
    relation: int


def parse_queries(lines: Iterable[str], entities: Vocabulary, relations: Vocabulary,
                  source: str = "queries") -> Iterator[Query]:
    """Queries from TSV lines: ``head<TAB>relation`` or ``head<TAB>relation<TAB>?`` (predict tails) and
    ``?<TAB>relation<TAB>tail`` (predict heads). Blank lines and comments (``#`` not followed by an integer id such
    as ``#17``) are skipped; anything else is a :class:`DataError` naming the line."""
    num_rel = len(relations)
    for n, raw in enumerate(lines, start=1):
        line = raw.rstrip("\r\n")
        if not line.strip() or (line.startswith("#") and not line[1:].split("\t", 1)[0].isdigit()):
            continue
        parts = line.split("\t")
        if len(parts) == 2:
            parts.append("?")
        if len(parts) != 3 or (parts[0] == "?") == (parts[2] == "?"):
            raise DataError("expected 'head<TAB>relation[<TAB>?]' or '?<TAB>relation<TAB>tail' (exactly one '?')",
                            source, n)
        try:
            r = resolve_label(relations, parts[1], "relation")
            if parts[2] == "?":
                yield Query(n, line, resolve_label(entities, parts[0], "entity"), r)
            else:
                yield Query(n, line, resolve_label(entities, parts[2], "entity"), r + num_rel)
        except DsomError as exc:
            raise DataError(str(exc), source, n) from None


@torch.no_grad()
def predict_batch(scorer: Scorer, entities: Vocabulary, queries: list[Query], k: int = 10,
                  filter_index: CSRIndex | None = None, filter_known: bool = True) -> list[list[Answer]]:
    """Top-``k`` answers of many queries with one score block (the same answers as :func:`predict` per query)."""
    if not queries:
        return []
    et = torch.tensor([q.entity for q in queries])
    rt = torch.tensor([q.relation for q in queries])
    scores = scorer.score_all(et, rt, precision="fp32").float().cpu()
    known = torch.zeros_like(scores, dtype=torch.bool)
    if filter_index is not None:
        rows, cols = filter_index.pairs(et, rt)
        known[rows.cpu(), cols.cpu()] = True
    ranked = scores.masked_fill(known, float("-inf")) if filter_known else scores
    kk = min(k, scores.shape[1])
    top_vals, top_idx = torch.topk(ranked, kk, dim=1)
    out = []
    for b in range(len(queries)):
        answers = []
        for i, (v, j) in enumerate(zip(top_vals[b].tolist(), top_idx[b].tolist())):
            if v == float("-inf"):
                break
            answers.append(Answer(rank=i + 1, id=j, label=entities.labels[j], name=entities.name(j),
                                  score=float(scores[b, j]), known=bool(known[b, j])))
        out.append(answers)
    return out


def answer_lines(query: Query, answers: list[Answer], fmt: str) -> list[str]:
    """Output lines of one query: TSV (``line, query, rank, label, name, score, known``) or one JSON line."""
    if fmt == "jsonl":
        return [json.dumps({"line": query.line, "query": query.text, "answers": [a.__dict__ for a in answers]})]
    q = query.text.replace("\t", " ")
    return [f"{query.line}\t{q}\t{a.rank}\t{a.label}\t{a.name}\t{a.score:.6g}\t{int(a.known)}" for a in answers]
