"""Dataset statistics and validation report (``dsom data info``, DESIGN §2).

:func:`dataset_info` returns a JSON-friendly dict; :func:`format_info` renders it as plain text. Everything
is vectorised with numpy: a triple ``(h, r, t)`` is encoded as the int64 key ``(h * R + r) * E + t`` (or,
when that could overflow, as a dense id from ``np.unique`` over rows).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dsom.data.graph import SPLITS, KGDataset, triple_keys
from dsom.data.sidefiles import read_images_tsv, read_numeric
from dsom.errors import DataError

__all__ = ["dataset_info", "format_info"]

_LIST_LIMIT = 20


def _triple_keys(ds: KGDataset) -> dict[str, np.ndarray]:
    """One int64 key per triple line, equal keys = equal triples, comparable across splits."""
    return dict(zip(SPLITS, triple_keys([ds.splits[s] for s in SPLITS], ds.num_entities, ds.num_relations)))


def _pair_keys(a: np.ndarray, num_e: int, reverse: bool = False) -> np.ndarray:
    return a[:, 2] * num_e + a[:, 0] if reverse else a[:, 0] * num_e + a[:, 2]


def _split_stats(keys: np.ndarray) -> dict[str, int]:
    uniq, counts = np.unique(keys, return_counts=True)
    return {"lines": int(len(keys)), "distinct": int(len(uniq)), "duplicate_lines": int(len(keys) - len(uniq)),
            "max_repeats": int(counts.max()) if len(counts) else 0}


def _neighbour_stats(ds: KGDataset) -> dict[str, Any]:
    """|N(e, r')| over the 2·|train| reciprocal training queries (each query counted once per line, as in
    SPEC §1.1), plus the same over distinct (e, r') keys."""
    if len(ds.train) == 0:
        return {"queries": 0}
    idx = ds.neighbour_index
    keys = idx.keys.cpu().numpy()
    sizes = np.diff(idx.offsets.cpu().numpy())
    q = ds.queries("train")
    per = sizes[np.searchsorted(keys, q[:, 0] * idx.num_relations + q[:, 1])]
    return {
        "queries": int(len(per)),
        "mean": float(per.mean()),
        "median": float(np.median(per)),
        "max": int(per.max()),
        "frac_gt1": float((per > 1).mean()),
        "distinct_queries": int(len(sizes)),
        "distinct_mean": float(sizes.mean()),
        "distinct_median": float(np.median(sizes)),
        "distinct_frac_gt1": float((sizes > 1).mean()),
    }


def _numeric_info(ds: KGDataset, path: Path) -> dict[str, Any]:

    facts = read_numeric(path, ds.entities.index)
    return {"path": str(path), "rows": facts.rows, "entities": facts.num_entities,
            "attributes": len(facts.attributes), "unknown_rows": facts.unknown_rows,
            "unknown_entities": len(facts.unknown_entities)}


def _images_info(ds: KGDataset, path: Path) -> dict[str, Any]:

    images = read_images_tsv(ds, path, warn=False)
    listed = [p for ps in images.paths.values() for p in ps]
    return {"path": str(path), "rows": len(listed) + images.unknown_rows, "entities": len(images.paths),
            "unknown_rows": images.unknown_rows, "missing_files": sum(not p.is_file() for p in listed)}


def dataset_info(ds: KGDataset) -> dict[str, Any]:
    """Statistics and consistency checks of a dataset, as a JSON-friendly dict.

    Keys: ``name``, ``layout``, ``root``, ``entities``, ``relations``, ``splits`` (lines, distinct, duplicate
    lines, max repeats), ``overlaps`` (distinct triples shared between splits), ``unseen`` (entities and
    relations absent from train and the valid/test triples that use them), ``pair_leakage`` (valid/test
    triples whose entity pair is linked in train), ``neighbours`` (|N(e, r')| statistics), ``text``
    (available names/descriptions), ``files`` (numeric.tsv / images.tsv summaries) and ``warnings``.
    """
    keys = _triple_keys(ds)
    splits = {s: _split_stats(keys[s]) for s in SPLITS}
    overlaps = _overlaps({s: np.unique(keys[s]) for s in SPLITS})
    unseen = _unseen(ds)
    pair_leak = _pair_leakage(ds)
    files, warn = _side_files(ds)
    warn += _warnings(ds, splits, overlaps, unseen, pair_leak, files)
    return {
        "name": ds.name,
        "layout": ds.layout,
        "root": str(ds.root) if ds.root is not None else None,
        "entities": ds.num_entities,
        "relations": ds.num_relations,
        "splits": splits,
        "overlaps": overlaps,
        "unseen": unseen,
        "pair_leakage": pair_leak,
        "neighbours": _neighbour_stats(ds),
        "text": _text_counts(ds),
        "files": files,
        "warnings": warn,
    }


def _overlaps(uniq: dict[str, np.ndarray]) -> dict[str, int]:
    """Distinct triples shared between splits, and those only in valid (or only in test), from sorted unique keys."""
    def shared(a: str, b: str) -> int:
        return int(len(np.intersect1d(uniq[a], uniq[b], assume_unique=True)))

    overlaps = {"valid&train": shared("valid", "train"), "test&train": shared("test", "train"),
                "valid&test": shared("valid", "test")}
    for s, other in (("valid", "test"), ("test", "valid")):
        only = np.setdiff1d(np.setdiff1d(uniq[s], uniq["train"], assume_unique=True), uniq[other], assume_unique=True)
        overlaps[f"{s}_only"] = int(len(only))
    return overlaps


def _unseen(ds: KGDataset) -> dict[str, Any]:
    """Entities and relations seen in train, and the valid/test triples that use unseen ones."""
    num_e, num_r, train = ds.num_entities, ds.num_relations, ds.train
    seen_e = np.zeros(num_e, dtype=bool)
    seen_e[train[:, 0]] = True
    seen_e[train[:, 2]] = True
    seen_r = np.zeros(num_r, dtype=bool)
    seen_r[train[:, 1]] = True
    used_e = seen_e.copy()
    for s in ("valid", "test"):
        used_e[ds.splits[s][:, 0]] = True
        used_e[ds.splits[s][:, 2]] = True
    unseen_r_ids = np.flatnonzero(~seen_r)
    unseen: dict[str, Any] = {
        "entities_in_train": int(seen_e.sum()),
        "entities_unseen_in_train": int(num_e - seen_e.sum()),
        "entities_in_no_split": int(num_e - used_e.sum()),
        "relations_in_train": int(seen_r.sum()),
        "relations_unseen_in_train": int(len(unseen_r_ids)),
        "unseen_relations": ([{"id": int(i), "label": ds.relations.labels[i]} for i in unseen_r_ids]
                             if len(unseen_r_ids) <= _LIST_LIMIT else None),
    }
    for s in ("valid", "test"):
        a = ds.splits[s]
        bad_e = ~seen_e[a[:, 0]] | ~seen_e[a[:, 2]]
        unseen[s] = {"triples_with_unseen_entity": int(bad_e.sum()),
                     "triples_with_unseen_relation": int((~seen_r[a[:, 1]]).sum())}
    return unseen


def _pair_leakage(ds: KGDataset) -> dict[str, dict[str, float]]:
    """Fractions of valid/test triples whose entity pair is already linked in train, either way round
    (inverse-relation leakage, WN18/FB15K style)."""
    num_e = ds.num_entities
    tr_pairs = np.unique(_pair_keys(ds.train, num_e))
    out: dict[str, dict[str, float]] = {}
    for s in ("valid", "test"):
        a = ds.splits[s]
        n = max(len(a), 1)
        rev = np.isin(_pair_keys(a, num_e, reverse=True), tr_pairs)
        same = np.isin(_pair_keys(a, num_e), tr_pairs)
        out[s] = {"reversed_pair_in_train": float(rev.sum() / n), "same_pair_in_train": float(same.sum() / n)}
    return out


def _text_counts(ds: KGDataset) -> dict[str, int]:
    """How many entity names, entity descriptions and relation names are non-empty."""
    def count(values: list[str] | None) -> int:
        return sum(1 for x in values if x) if values is not None else 0

    return {"entity_names": count(ds.entities.names), "entity_descriptions": count(ds.entities.descriptions),
            "relation_names": count(ds.relations.names)}


def _side_files(ds: KGDataset) -> tuple[dict[str, Any], list[str]]:
    """Summaries of ``numeric.tsv`` and ``images.tsv`` in the dataset folder, and a warning per malformed one."""
    files: dict[str, Any] = {"numeric": None, "images": None}
    warn: list[str] = []
    if ds.root is not None:
        root = Path(ds.root)
        for key, fname, fn in (("numeric", "numeric.tsv", _numeric_info), ("images", "images.tsv", _images_info)):
            p = root / fname
            if p.is_file():
                try:
                    files[key] = fn(ds, p)
                except DataError as e:
                    files[key] = {"path": str(p), "error": str(e)}
                    warn.append(f"{fname} is malformed: {e}")
    return files, warn


def _warnings(ds: KGDataset, splits: dict[str, Any], overlaps: dict[str, int], unseen: dict[str, Any],
              pair_leak: dict[str, Any], files: dict[str, Any]) -> list[str]:
    """The human-readable warnings about splits, overlaps, unseen ids, leakage and side files."""
    warn: list[str] = []
    for s in SPLITS:
        st = splits[s]
        if st["lines"] == 0:
            warn.append(f"the {s} split is empty.")
        elif st["duplicate_lines"]:
            warn.append(f"{s} has {st['duplicate_lines']:,} duplicate lines: {st['lines']:,} lines but only "
                        f"{st['distinct']:,} distinct triples (one triple repeated up to {st['max_repeats']} times).")
    if overlaps["valid&test"]:
        warn.append(f"valid shares {overlaps['valid&test']:,} distinct triples with test: anything trained or tuned "
                    "on valid (meta-learners, policies, early stopping) sees test triples; use "
                    "--set data.valid=clean to drop them (and valid triples repeated from train) and say so in any "
                    "result.")
    if overlaps["valid&train"]:
        d = splits["valid"]["distinct"]
        warn.append(f"{overlaps['valid&train']:,} of {d:,} distinct valid triples ({overlaps['valid&train'] / d:.1%}) "
                    "also occur in train: validation metrics partly measure fit to training triples"
                    + (" and are a poor early-stopping signal." if overlaps["valid&train"] > 0.1 * d else "."))
    if overlaps["test&train"]:
        warn.append(f"{overlaps['test&train']:,} distinct test triples also occur in train (test leakage).")
    if unseen["relations_unseen_in_train"]:
        ids = ", ".join(str(x["id"]) for x in unseen["unseen_relations"] or [])
        n_ur = unseen["relations_unseen_in_train"]
        warn.append(f"{n_ur} relation{'s never occur' if n_ur > 1 else ' never occurs'} in train"
                    + (f" (ids {ids})" if ids else "")
                    + f"; {unseen['test']['triples_with_unseen_relation']} test triples use one: structural models "
                    "cannot learn them.")
    if unseen["entities_unseen_in_train"]:
        nt = max(len(ds.test), 1)
        k = unseen["test"]["triples_with_unseen_entity"]
        warn.append(f"{unseen['entities_unseen_in_train']:,} entities do not occur in train; {k:,} test triples "
                    f"({k / nt:.1%}) involve one (only feature modalities can score them).")
    if pair_leak["test"]["reversed_pair_in_train"] >= 0.5:
        warn.append(f"{pair_leak['test']['reversed_pair_in_train']:.1%} of test triples (h, r, t) have (t, ·, h) in "
                    "train: inverse-relation leakage, test scores will be high for that reason.")
    for key in ("numeric", "images"):
        f = files[key]
        if f and f.get("unknown_rows"):
            warn.append(f"{Path(f['path']).name}: {f['unknown_rows']:,} rows name an entity not in the vocabulary "
                        "(skipped).")
        if f and f.get("missing_files"):
            warn.append(f"images.tsv: {f['missing_files']:,} image files are missing.")

    return warn


def format_info(info: dict[str, Any]) -> str:
    """Render :func:`dataset_info` output as a plain-text report."""
    e, r = info["entities"], info["relations"]
    sp, ov, un, nb = info["splits"], info["overlaps"], info["unseen"], info["neighbours"]
    out = [f"Dataset {info['name']}  (layout: {info['layout']}{', ' + info['root'] if info.get('root') else ''})",
           f"  entities   {e:>9,}",
           f"  relations  {r:>9,}  (2R = {2 * r:,} with reciprocals)",
           "",
           "Splits          lines   distinct  duplicates  max repeats"]
    for s in SPLITS:
        st = sp[s]
        out.append(f"  {s:<7} {st['lines']:>11,} {st['distinct']:>10,} {st['duplicate_lines']:>11,} "
                   f"{st['max_repeats']:>12,}")
    out += ["",
            "Overlaps (distinct triples)",
            f"  valid ∩ train  {ov['valid&train']:>9,}",
            f"  test ∩ train   {ov['test&train']:>9,}",
            f"  valid ∩ test   {ov['valid&test']:>9,}",
            f"  valid only     {ov['valid_only']:>9,}   (in neither train nor test)",
            f"  test only      {ov['test_only']:>9,}   (in neither train nor valid)",
            "",
            "Coverage by train",
            f"  entities in train   {un['entities_in_train']:>9,} of {e:,}  "
            f"({un['entities_unseen_in_train']:,} unseen in train, {un['entities_in_no_split']:,} in no split)",
            f"  relations in train  {un['relations_in_train']:>9,} of {r:,}  "
            f"({un['relations_unseen_in_train']:,} unseen in train)"]
    if un["unseen_relations"]:
        rels = ", ".join(f"{x['id']} ({x['label']})" for x in un["unseen_relations"])
        out.append(f"  unseen relations: {rels}")
    for s in ("valid", "test"):
        out.append(f"  {s:<5} triples with an unseen entity {un[s]['triples_with_unseen_entity']:>7,}, "
                   f"with an unseen relation {un[s]['triples_with_unseen_relation']:>6,}")
    pl = info["pair_leakage"]
    out += ["", "Entity pairs already linked in train (fraction of triples)"]
    for s in ("valid", "test"):
        out.append(f"  {s:<5} reversed (t, ·, h) {pl[s]['reversed_pair_in_train']:>6.1%}   "
                   f"same direction (h, ·, t) {pl[s]['same_pair_in_train']:>6.1%}")
    out += ["", "Neighbour sets |N(e, r')| over reciprocal train queries (NDKD)"]
    if nb.get("queries"):
        out.append(f"  per query ({nb['queries']:,}): mean {nb['mean']:.1f}, median {nb['median']:g}, "
                   f"max {nb['max']:,}, |N| > 1 for {nb['frac_gt1']:.1%}")
        out.append(f"  per distinct (e, r') ({nb['distinct_queries']:,}): mean {nb['distinct_mean']:.2f}, "
                   f"median {nb['distinct_median']:g}, |N| > 1 for {nb['distinct_frac_gt1']:.1%}")
    else:
        out.append("  (no training triples)")
    tx = info["text"]
    out += ["", "Text",
            f"  entity names {tx['entity_names']:,} of {e:,}, descriptions {tx['entity_descriptions']:,} of {e:,}, "
            f"relation names {tx['relation_names']:,} of {r:,}"]
    files = info["files"]
    out += ["", "Side files"]
    nf = files.get("numeric")
    if nf is None:
        out.append("  numeric.tsv  absent")
    elif "error" in nf:
        out.append(f"  numeric.tsv  malformed: {nf['error']}")
    else:
        out.append(f"  numeric.tsv  {nf['rows']:,} facts, {nf['entities']:,} entities, {nf['attributes']:,} "
                   f"attributes, {nf['unknown_rows']:,} rows with unknown entities")
    im = files.get("images")
    if im is None:
        out.append("  images.tsv   absent")
    elif "error" in im:
        out.append(f"  images.tsv   malformed: {im['error']}")
    else:
        out.append(f"  images.tsv   {im['rows']:,} images of {im['entities']:,} entities, "
                   f"{im['missing_files']:,} missing files, {im['unknown_rows']:,} rows with unknown entities")
    out += ["", "Warnings"]
    out += [f"  ! {w}" for w in info["warnings"]] or ["  none"]
    return "\n".join(out)

