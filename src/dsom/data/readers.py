"""Dataset readers: layout detection and loading (DESIGN §3).

Four folder layouts are understood:

``canonical``
    ``train.tsv``/``valid.tsv``/``test.tsv`` (``head<TAB>relation<TAB>tail`` string labels) plus
    ``entities.tsv`` (header ``entity<TAB>name<TAB>description``) and ``relations.tsv`` (header
    ``relation<TAB>name``). Row order of the vocabulary files is the integer id.
``mygo``
    ``train.txt``/``valid.txt``/``test.txt`` of integer ids ``h<TAB>r<TAB>t``, ``entities.txt`` and
    ``relations.txt`` with one id per line (row order = id), optionally ``entity2id.txt`` (``uri id``)
    which provides display names.
``openke``
    ``train2id.txt``/``valid2id.txt``/``test2id.txt`` with a count first line and ``h t r`` rows;
    ``entity2id.txt``/``relation2id.txt`` with a count first line and ``label<sep>id`` rows (tab or
    space separated; the id is the last field).
``kbc``
    ``train``/``valid``/``test`` (no extension) of tab-separated labels as read by kbc/MoSE. Ids come
    from ``ent_id``/``rel_id`` (``name<TAB>id``) when present, otherwise from the union of labels over
    all splits sorted as strings, exactly as kbc's ``process_datasets.py`` assigns them.

Every malformed input raises :class:`dsom.errors.DataError` naming the file and 1-based line. Duplicate
triple lines are kept as published (DB15K's valid split has duplicates). Blank lines are skipped.
Optional side files of the canonical layout (``numeric.tsv``, ``images.tsv``) are not read here; the
feature builders read them on request from ``KGDataset.root``.
"""

from __future__ import annotations

import difflib
import errno
import gc
import os
import stat
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from dsom.data.graph import SPLITS, KGDataset, Vocabulary
from dsom.errors import DataError

__all__ = ["LAYOUTS", "DataWarning", "detect_layout", "load_dataset", "read_lines", "read_text"]

#: Files each layout requires, in detection order.
LAYOUTS: dict[str, tuple[str, ...]] = {
    "canonical": ("train.tsv", "valid.tsv", "test.tsv", "entities.tsv", "relations.tsv"),
    "openke": ("train2id.txt", "valid2id.txt", "test2id.txt", "entity2id.txt", "relation2id.txt"),
    "mygo": ("train.txt", "valid.txt", "test.txt", "entities.txt", "relations.txt"),
    "kbc": ("train", "valid", "test"),
}

_SPLIT_FILES = {
    "canonical": {s: f"{s}.tsv" for s in SPLITS},
    "openke": {s: f"{s}2id.txt" for s in SPLITS},
    "mygo": {s: f"{s}.txt" for s in SPLITS},
    "kbc": {s: s for s in SPLITS},
}

_MAX_SUGGEST_LABELS = 100_000


class DataWarning(UserWarning):
    """Something in a dataset is suspicious but loadable (empty valid/test split, skipped rows)."""


# ----------------------------------------------------------------------------------------------
# Low-level text reading


def file_problem(path: Path) -> str | None:
    """None for a regular file (or a symlink to one); else what it is instead, for messages: 'missing',
    'a directory', 'a FIFO, socket or device', 'a symlink loop or broken symlink'."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "a broken symlink" if os.path.islink(path) else "missing"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symlink loop"
        return f"unreadable ({e.strerror})"
    if stat.S_ISREG(st.st_mode):
        return None
    return "a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO, socket or device, not a regular file"


def _missing_note(root: Path, name: str) -> str:
    problem = file_problem(root / name)
    return name if problem in (None, "missing") else f"{name} ({problem})"


def read_text(path: Path) -> str:
    """Read a UTF-8 file (a leading BOM is dropped); a decoding error becomes a DataError with its line.
    Only regular files are opened (a FIFO would block forever)."""
    path = Path(path)
    problem = file_problem(path)
    if problem == "missing":
        raise DataError("file not found; check the path", path)
    if problem is not None:
        raise DataError(f"cannot read file: it is {problem}; a regular file is needed", path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read file ({e.strerror}); check that it exists and is readable", path) from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); re-save the file as UTF-8",
            path, line) from e
    if text.startswith("\ufeff"):
        text = text[1:]
    return text


def read_lines(path: Path) -> list[str]:
    """Lines of a UTF-8 text file without line terminators (``\\n`` or ``\\r\\n``); line i is ``lines[i-1]``."""
    text = read_text(path)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if "\r" in text:
        lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
    return lines


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many small lists (3-4x faster parsing)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _suggest(label: str, candidates: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` when a close match exists (skipped for huge vocabularies)."""
    if len(candidates) > _MAX_SUGGEST_LABELS:
        return ""
    match = difflib.get_close_matches(label, candidates, n=1, cutoff=0.8)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _plural(what: str) -> str:
    return "entities" if what == "entity" else what + "s"


def three_cells(line: str, path: object, line_no: int, fields: str) -> list[str]:
    """The three tab-separated cells of a data line; a :class:`DataError` naming the file and line otherwise
    (``fields`` names them, e.g. ``"head, relation, tail"``)."""
    cells = line.split("\t")
    if len(cells) != 3:
        raise DataError(f"expected 3 tab-separated fields ({fields}), got {len(cells)}: {line[:120]!r}", path, line_no)
    return cells


def _is_blank(line: str) -> bool:
    return not line.strip()


# ----------------------------------------------------------------------------------------------
# Layout detection


def detect_layout(path: str | os.PathLike[str]) -> str:
    """Return the layout of a dataset folder: ``canonical``, ``openke``, ``mygo`` or ``kbc``.

    Raises DataError when the folder is missing or matches no layout; the message lists the files each
    layout expects and which ones the closest layouts are missing.
    """
    root = Path(path)
    if not root.exists():
        raise DataError("dataset folder not found; pass the path of a dataset folder", root)
    if not root.is_dir():
        raise DataError("expected a dataset folder, got a file; pass the folder that holds the split files", root)
    missing = {lay: [_missing_note(root, f) for f in files if not (root / f).is_file()]
               for lay, files in LAYOUTS.items()}
    for lay in LAYOUTS:
        if not missing[lay]:
            return lay
    expected = "; ".join(f"{lay}: {', '.join(files)}" for lay, files in LAYOUTS.items())
    partial = [lay for lay in LAYOUTS if len(missing[lay]) < len(LAYOUTS[lay])]
    if partial:
        detail = "; ".join(f"{lay} is missing {', '.join(missing[lay])}" for lay in partial)
        hint = f" Closest: {detail}."
    else:
        hint = " None of these files is present."
        if (root / "upstream").is_dir():
            hint += f" (The folder has an upstream/ folder: point at one of {root / 'upstream'}/*.)"
    raise DataError(f"no known dataset layout. Expected one of [{expected}].{hint}", root)


def _check_layout(root: Path, layout: str) -> None:
    if layout not in LAYOUTS:
        raise DataError(f"unknown layout '{layout}'; choose one of {', '.join(LAYOUTS)}", root)
    if not root.is_dir():
        raise DataError("dataset folder not found; pass the path of a dataset folder", root)
    missing = [_missing_note(root, f) for f in LAYOUTS[layout] if not (root / f).is_file()]
    if missing:
        raise DataError(f"layout '{layout}' needs {', '.join(LAYOUTS[layout])}; missing: {', '.join(missing)}",
                        root)


# ----------------------------------------------------------------------------------------------
# Vocabularies


def _read_tsv_vocab(path: Path, key: str, extra: Sequence[str]) -> tuple[list[str], dict[str, list[str] | None]]:
    """Read a canonical ``entities.tsv``/``relations.tsv``: header, then one row per id.

    Columns are found by header name; rows may omit trailing empty cells but never have more cells than
    the header. Returns labels and, for each requested extra column, its values (None if the column is
    absent or entirely empty).
    """
    lines = read_lines(path)
    if not lines:
        raise DataError(f"empty file; expected a header line '{key}<TAB>{'<TAB>'.join(extra)}' and one row per "
                        f"{key}", path, 1)
    header = lines[0].split("\t")
    if header[0].strip() != key:
        raise DataError(f"first line must be the header '{key}<TAB>{'<TAB>'.join(extra)}', got "
                        f"{lines[0][:80]!r}; add the header line", path, 1)
    ncol = len(header)
    cols = {name: header.index(name) for name in extra if name in header}
    labels: list[str] = []
    values: dict[str, list[str]] = {name: [] for name in cols}
    lineno = []
    for i, ln in enumerate(lines[1:], start=2):
        if _is_blank(ln):
            continue
        cells = ln.split("\t")
        if len(cells) > ncol:
            raise DataError(f"{len(cells)} tab-separated fields, but the header has {ncol}; "
                            "remove the extra tab characters", path, i)
        labels.append(cells[0])
        lineno.append(i)
        for name, c in cols.items():
            values[name].append(cells[c] if c < len(cells) else "")
    if not labels:
        raise DataError(f"no {key} rows after the header; list one {key} per line", path, 2)
    if len(set(labels)) != len(labels) or "" in labels:
        seen: dict[str, int] = {}
        for lab, i in zip(labels, lineno):
            if lab == "":
                raise DataError(f"empty {key} label; every row needs a label in its first field", path, i)
            if lab in seen:
                raise DataError(f"duplicate {key} label '{lab}' (first on line {seen[lab]}); "
                                f"each {key} must be listed once", path, i)
            seen[lab] = i
    out: dict[str, list[str] | None] = {name: None for name in extra}
    for name, vals in values.items():
        out[name] = vals if any(vals) else None
    return labels, out


def _read_id_list(path: Path, what: str) -> list[str]:
    """MyGO ``entities.txt``/``relations.txt``: one label (normally an integer id) per line."""
    lines = read_lines(path)
    labels = []
    lineno = []
    for i, ln in enumerate(lines, start=1):
        s = ln.strip()
        if not s:
            continue
        if "\t" in s or " " in s:
            raise DataError(f"expected one {what} id per line, got {s[:80]!r}", path, i)
        labels.append(s)
        lineno.append(i)
    if not labels:
        raise DataError(f"empty {what} list; write one {what} id per line", path, 1)
    index = {lab: k for k, lab in enumerate(labels)}
    if len(index) != len(labels):
        seen: dict[str, int] = {}
        for lab, i in zip(labels, lineno):
            if lab in seen:
                raise DataError(f"duplicate {what} id '{lab}' (first on line {seen[lab]}); list each id once",
                                path, i)
            seen[lab] = i
    return labels


def _parse_label_id(path: Path, lines: list[str], first_line: int, what: str,
                    sep: str | None) -> tuple[list[str], list[int], list[int]]:
    """Rows ``label<sep>id`` (``sep=None``: any whitespace, the id is the last field)."""
    labels: list[str] = []
    ids: list[int] = []
    linenos: list[int] = []
    for i, ln in enumerate(lines, start=first_line):
        if _is_blank(ln):
            continue
        parts = ln.rstrip().rsplit(None, 1) if sep is None else ln.rstrip("\r\n").split(sep)
        if len(parts) != 2:
            raise DataError(f"expected '{what}<separator>id' (2 fields), got {len(parts)}: {ln[:80]!r}", path, i)
        label = parts[0] if sep is not None else parts[0].strip()
        idx = parts[1].strip()
        try:
            ids.append(int(idx))
        except ValueError:
            raise DataError(f"id '{idx}' is not an integer; the last field of each row must be the {what} id",
                            path, i) from None
        labels.append(label)
        linenos.append(i)
    return labels, ids, linenos


def _order_by_id(path: Path, labels: list[str], ids: list[int], linenos: list[int], what: str) -> list[str]:
    """Labels ordered by their explicit id; ids must be exactly ``0..n-1`` and labels unique."""
    n = len(labels)
    out: list[str | None] = [None] * n
    for lab, idx, ln in zip(labels, ids, linenos):
        if not 0 <= idx < n:
            raise DataError(f"{what} id {idx} out of range: the file lists {n} {_plural(what)}, so ids must be "
                            f"0..{n - 1}", path, ln)
        if out[idx] is not None:
            raise DataError(f"{what} id {idx} is assigned twice; each id must appear once", path, ln)
        out[idx] = lab
    ordered = [x for x in out if x is not None]
    first = dict(zip(ids, linenos))
    index: dict[str, int] = {}
    for idx, lab in enumerate(ordered):
        if lab in index:
            raise DataError(f"duplicate {what} label '{lab}' (first on line {first[index[lab]]}); "
                            f"each {what} must be listed once", path, first[idx])
        if lab == "":
            raise DataError(f"empty {what} label", path, first[idx])
        index[lab] = idx
    return ordered


def _read_openke_vocab(path: Path, what: str) -> list[str]:
    """OpenKE ``entity2id.txt``/``relation2id.txt``: count line, then ``label id`` rows."""
    lines = read_lines(path)
    count = _openke_count(path, lines)
    labels, ids, linenos = _parse_label_id(path, lines[1:], 2, what, None)
    if len(labels) != count:
        raise DataError(f"first line says {count} {_plural(what)} but the file has {len(labels)} rows; "
                        "fix the count line", path, 1)
    return _order_by_id(path, labels, ids, linenos, what)


def _read_kbc_vocab(path: Path, what: str) -> list[str]:
    """kbc ``ent_id``/``rel_id``: ``name<TAB>id`` rows."""
    lines = read_lines(path)
    labels, ids, linenos = _parse_label_id(path, lines, 1, what, "\t")
    if not labels:
        raise DataError(f"empty {what} id file; expected 'name<TAB>id' rows", path, 1)
    return _order_by_id(path, labels, ids, linenos, what)


def _openke_count(path: Path, lines: list[str]) -> int:
    if not lines:
        raise DataError("empty file; OpenKE files start with a line holding the number of rows", path, 1)
    try:
        return int(lines[0].strip())
    except ValueError:
        raise DataError(f"first line must be the number of rows (OpenKE format), got {lines[0][:80]!r}",
                        path, 1) from None


# ----------------------------------------------------------------------------------------------
# Split files


def _parse_label_triples(path: Path, lines: list[str], ent: dict[str, int], rel: dict[str, int],
                         ent_labels: Sequence[str], rel_labels: Sequence[str], ent_file: str, rel_file: str,
                         strip: bool = False) -> np.ndarray:
    """``head<TAB>relation<TAB>tail`` label rows -> ``(n, 3)`` int64 ids (first line is line 1)."""
    if strip:
        lines = [ln.strip() for ln in lines]
    try:
        rows = [ln.split("\t") for ln in lines]
        arr = np.array([(ent[h], rel[r], ent[t]) for h, r, t in rows], dtype=np.int64)
        return arr.reshape(-1, 3)
    except (KeyError, ValueError):
        pass
    # Slow path: skip blank lines, locate the first problem precisely.
    out = []
    for i, ln in enumerate(lines, start=1):
        if _is_blank(ln):
            continue
        h, r, t = three_cells(ln, path, i, "head, relation, tail")
        for label, col in ((h, "head"), (t, "tail")):
            if label not in ent:
                raise DataError(f"unknown entity '{label}' ({col}); it is not listed in {ent_file}"
                                f"{_suggest(label, ent_labels)}. Add it there or fix the label", path, i)
        if r not in rel:
            raise DataError(f"unknown relation '{r}'; it is not listed in {rel_file}{_suggest(r, rel_labels)}. "
                            "Add it there or fix the label", path, i)
        out.append((ent[h], rel[r], ent[t]))
    return np.array(out, dtype=np.int64).reshape(-1, 3)


def _parse_int_triples(path: Path, lines: list[str], first_line: int, order: tuple[int, int, int],
                       num_entities: int, num_relations: int, ent_lut: np.ndarray | None,
                       rel_lut: np.ndarray | None, ent_file: str, rel_file: str) -> np.ndarray:
    """Whitespace-separated integer rows -> ``(n, 3)`` int64 ``[h, r, t]``.

    ``order`` gives the columns of h, r and t (MyGO ``(0, 1, 2)``, OpenKE ``(0, 2, 1)``). A ``*_lut``
    maps the integers written in the file to row ids (-1: not in the vocabulary file); None = identity.
    """
    fmt = ("h", "r", "t")
    fmt = " ".join(fmt[order.index(c)] for c in range(3))
    raw = None
    try:
        raw = np.array([ln.split() for ln in lines], dtype=np.int64)
        if lines and (raw.ndim != 2 or raw.shape[1] != 3):
            raw = None
    except ValueError:
        raw = None
    if raw is not None:
        raw = raw.reshape(-1, 3)
        linenos = np.arange(first_line, first_line + len(lines))
    else:
        # Slow path: skip blank lines, locate the first problem precisely.
        rows, nums = [], []
        for i, ln in enumerate(lines, start=first_line):
            cells = ln.split()
            if not cells:
                continue
            if len(cells) != 3:
                raise DataError(f"expected 3 integer fields '{fmt}', got {len(cells)}: {ln[:120]!r}", path, i)
            try:
                rows.append([int(c) for c in cells])
            except ValueError:
                raise DataError(f"non-integer id in {ln[:120]!r}; this layout stores integer ids '{fmt}'",
                                path, i) from None
            nums.append(i)
        raw = np.array(rows, dtype=np.int64).reshape(-1, 3)
        linenos = np.array(nums, dtype=np.int64)
    out = raw[:, list(order)]
    for col, n, lut, what, vfile in ((0, num_entities, ent_lut, "entity", ent_file),
                                     (1, num_relations, rel_lut, "relation", rel_file),
                                     (2, num_entities, ent_lut, "entity", ent_file)):
        v = out[:, col]
        if lut is None:
            bad = (v < 0) | (v >= n)
        else:
            inside = (v >= 0) & (v < len(lut))
            mapped = np.full(len(v), -1, dtype=np.int64)
            mapped[inside] = lut[v[inside]]
            bad = mapped < 0
            out[:, col] = mapped
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise DataError(f"{what} id {int(v[k])} is not in {vfile} ({n} {_plural(what)}, ids 0..{n - 1}); "
                            "fix the id or add it to the vocabulary file", path, int(linenos[k]))
    return out


def _finish_split(path: Path, split: str, arr: np.ndarray) -> np.ndarray:
    if len(arr) == 0:
        if split == "train":
            raise DataError("the train split is empty; it must hold at least one triple", path)
        warnings.warn(f"{path}: the {split} split is empty", DataWarning, stacklevel=3)
    return arr


# ----------------------------------------------------------------------------------------------
# Per-layout loaders


def _load_canonical(root: Path) -> tuple[Vocabulary, Vocabulary, dict[str, np.ndarray]]:
    ent_labels, ecols = _read_tsv_vocab(root / "entities.tsv", "entity", ("name", "description"))
    rel_labels, rcols = _read_tsv_vocab(root / "relations.tsv", "relation", ("name",))
    ents = Vocabulary(ent_labels, names=ecols["name"], descriptions=ecols["description"])
    rels = Vocabulary(rel_labels, names=rcols["name"])
    splits = {}
    for s in SPLITS:
        p = root / f"{s}.tsv"
        arr = _parse_label_triples(p, read_lines(p), ents.index, rels.index, ent_labels, rel_labels,
                                   "entities.tsv", "relations.tsv")
        splits[s] = _finish_split(p, s, arr)
    return ents, rels, splits


def _int_lut(labels: list[str]) -> np.ndarray | None:
    """Map integer labels (as written in the triples) to row ids; None when label i is ``str(i)``
    for every row (identity) or when labels are not integers (then the triples hold row ids)."""
    try:
        vals = np.array([int(x) for x in labels], dtype=np.int64)
    except ValueError:
        return None
    if np.array_equal(vals, np.arange(len(vals))):
        return None
    if vals.min() < 0:
        return None
    lut = np.full(int(vals.max()) + 1, -1, dtype=np.int64)
    lut[vals] = np.arange(len(vals))
    return lut


def _load_mygo(root: Path) -> tuple[Vocabulary, Vocabulary, dict[str, np.ndarray]]:
    ent_labels = _read_id_list(root / "entities.txt", "entity")
    rel_labels = _read_id_list(root / "relations.txt", "relation")
    ent_lut, rel_lut = _int_lut(ent_labels), _int_lut(rel_labels)
    names = None
    p = root / "entity2id.txt"
    if p.is_file():
        lines = read_lines(p)
        labs, ids, linenos = _parse_label_id(p, lines, 1, "entity", None)
        names = [""] * len(ent_labels)
        for lab, idx, ln in zip(labs, ids, linenos):
            if ent_lut is None:
                row = idx if 0 <= idx < len(ent_labels) else -1
            else:
                row = int(ent_lut[idx]) if 0 <= idx < len(ent_lut) else -1
            if row < 0:
                raise DataError(f"entity id {idx} is not listed in entities.txt; fix the id", p, ln)
            names[row] = lab
    ents = Vocabulary(ent_labels, names=names)
    rels = Vocabulary(rel_labels)
    splits = {}
    for s in SPLITS:
        p = root / f"{s}.txt"
        arr = _parse_int_triples(p, read_lines(p), 1, (0, 1, 2), len(ents), len(rels), ent_lut, rel_lut,
                                 "entities.txt", "relations.txt")
        splits[s] = _finish_split(p, s, arr)
    return ents, rels, splits


def _load_openke(root: Path) -> tuple[Vocabulary, Vocabulary, dict[str, np.ndarray]]:
    ents = Vocabulary(_read_openke_vocab(root / "entity2id.txt", "entity"))
    rels = Vocabulary(_read_openke_vocab(root / "relation2id.txt", "relation"))
    splits = {}
    for s in SPLITS:
        p = root / f"{s}2id.txt"
        lines = read_lines(p)
        count = _openke_count(p, lines)
        arr = _parse_int_triples(p, lines[1:], 2, (0, 2, 1), len(ents), len(rels), None, None,
                                 "entity2id.txt", "relation2id.txt")
        if len(arr) != count:
            raise DataError(f"first line says {count} triples but the file has {len(arr)}; fix the count line",
                            p, 1)
        splits[s] = _finish_split(p, s, arr)
    return ents, rels, splits


def _load_kbc(root: Path) -> tuple[Vocabulary, Vocabulary, dict[str, np.ndarray]]:
    lines = {s: [ln.strip() for ln in read_lines(root / s)] for s in SPLITS}
    ent_file = "ent_id" if (root / "ent_id").is_file() else "the splits"
    rel_file = "rel_id" if (root / "rel_id").is_file() else "the splits"
    if ent_file == "ent_id":
        ent_labels = _read_kbc_vocab(root / "ent_id", "entity")
    if rel_file == "rel_id":
        rel_labels = _read_kbc_vocab(root / "rel_id", "relation")
    if ent_file != "ent_id" or rel_file != "rel_id":
        # kbc: vocabularies are the union over all splits, ids by sorting the names as strings.
        es: set[str] = set()
        rs: set[str] = set()
        for s in SPLITS:
            p = root / s
            for i, ln in enumerate(lines[s], start=1):
                if not ln:
                    continue
                cells = ln.split("\t")
                if len(cells) != 3:
                    raise DataError(f"expected 3 tab-separated fields (head, relation, tail), got {len(cells)}: "
                                    f"{ln[:120]!r}", p, i)
                es.add(cells[0])
                es.add(cells[2])
                rs.add(cells[1])
        if ent_file != "ent_id":
            ent_labels = sorted(es)
        if rel_file != "rel_id":
            rel_labels = sorted(rs)
    ents, rels = Vocabulary(ent_labels), Vocabulary(rel_labels)
    splits = {}
    for s in SPLITS:
        p = root / s
        arr = _parse_label_triples(p, lines[s], ents.index, rels.index, ent_labels, rel_labels, ent_file,
                                   rel_file)
        splits[s] = _finish_split(p, s, arr)
    return ents, rels, splits


_LOADERS: dict[str, Callable[[Path], tuple[Vocabulary, Vocabulary, dict[str, np.ndarray]]]] = {
    "canonical": _load_canonical,
    "mygo": _load_mygo,
    "openke": _load_openke,
    "kbc": _load_kbc,
}


def _default_name(root: Path) -> str:
    root = root.resolve()
    if root.parent.name == "upstream" and root.parent.parent.name:
        return root.parent.parent.name
    return root.name


def load_dataset(path: str | os.PathLike[str], name: str | None = None, layout: str | None = None) -> KGDataset:
    """Load a dataset folder into a :class:`KGDataset`.

    Args:
        path: the dataset folder.
        name: dataset name (default: the folder name; for ``X/upstream/<fmt>`` it is ``X``).
        layout: force a layout instead of detecting it (see :data:`LAYOUTS`).

    Entity and relation ids follow the vocabulary files (row order, or the explicit id column of OpenKE
    and kbc id files), never the largest id seen in train. Raises DataError on malformed input.
    """
    root = Path(path)
    if layout is None:
        layout = detect_layout(root)
    else:
        _check_layout(root, layout)
    with gc_paused():
        ents, rels, splits = _LOADERS[layout](root)
    return KGDataset(name=name or _default_name(root), entities=ents, relations=rels, splits=splits, root=root,
                     layout=layout)
