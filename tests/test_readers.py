"""Dataset readers: layout detection, the four layouts, validation errors and the real benchmarks."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from dsom.data.graph import SPLITS
from dsom.data.readers import LAYOUTS, DataWarning, detect_layout, load_dataset
from dsom.errors import DataError

# A tiny graph: "e9" occurs only in test, "rare" relation only in valid (ids must still come from the
# vocabulary files). Entity order is deliberately not sorted, so kbc's sorted ids differ.
ENTITIES = [("m/b", "Bee", "an insect"), ("m/a", "Ay", ""), ("m/c", "", "see"), ("ü/d", "Dé", "unicode"),
            ("e9", "Nine", "")]
RELATIONS = [("likes", "likes"), ("hates", ""), ("rare", "rare one")]
TRAIN = [("m/b", "likes", "m/a"), ("m/a", "hates", "m/c"), ("ü/d", "likes", "m/b"), ("m/c", "likes", "m/a")]
VALID = [("m/b", "rare", "m/c"), ("m/b", "rare", "m/c")]  # a duplicate line, kept
TEST = [("e9", "likes", "m/a"), ("m/a", "hates", "ü/d")]
SPLIT_ROWS = {"train": TRAIN, "valid": VALID, "test": TEST}


def _write(path: Path, lines: list[str], newline: str = "\n") -> None:
    path.write_bytes("".join(ln + newline for ln in lines).encode("utf-8"))


def write_canonical(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    _write(root / "entities.tsv", ["entity\tname\tdescription"] + ["\t".join(e) for e in ENTITIES])
    _write(root / "relations.tsv", ["relation\tname"] + ["\t".join(r) for r in RELATIONS])
    for s, rows in SPLIT_ROWS.items():
        _write(root / f"{s}.tsv", ["\t".join(t) for t in rows])
    return root


def _ids(rows: list[tuple[str, str, str]]) -> list[tuple[int, int, int]]:
    e = {x[0]: i for i, x in enumerate(ENTITIES)}
    r = {x[0]: i for i, x in enumerate(RELATIONS)}
    return [(e[h], r[rel], e[t]) for h, rel, t in rows]


def write_mygo(root: Path, names: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    _write(root / "entities.txt", [str(i) for i in range(len(ENTITIES))])
    _write(root / "relations.txt", [str(i) for i in range(len(RELATIONS))])
    if names:
        _write(root / "entity2id.txt", [f"{e[0]} {i}" for i, e in enumerate(ENTITIES)])
    for s, rows in SPLIT_ROWS.items():
        _write(root / f"{s}.txt", [f"{h}\t{r}\t{t}" for h, r, t in _ids(rows)])
    return root


def write_openke(root: Path, sep: str = " ", newline: str = "\n", shuffle: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    ents = [f"<{e[0]}>{sep}{i}" for i, e in enumerate(ENTITIES)]
    if shuffle:  # the id column, not the row order, decides
        ents = ents[::-1]
    _write(root / "entity2id.txt", [str(len(ENTITIES))] + ents, newline)
    _write(root / "relation2id.txt", [str(len(RELATIONS))] + [f"{r[0]}{sep}{i}" for i, r in enumerate(RELATIONS)],
           newline)
    for s, rows in SPLIT_ROWS.items():
        _write(root / f"{s}2id.txt", [str(len(rows))] + [f"{h} {t} {r}" for h, r, t in _ids(rows)], newline)
    return root


def write_kbc(root: Path, id_files: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for s, rows in SPLIT_ROWS.items():
        _write(root / s, ["\t".join(t) for t in rows])
    if id_files:
        _write(root / "ent_id", [f"{e[0]}\t{i}" for i, e in enumerate(ENTITIES)])
        _write(root / "rel_id", [f"{r[0]}\t{i}" for i, r in enumerate(RELATIONS)])
    return root


def _label_triples(ds, split: str) -> list[tuple[str, str, str]]:
    e, r = ds.entities.labels, ds.relations.labels
    return [(e[h], r[x], e[t]) for h, x, t in ds.splits[split].tolist()]


def _assert_error(exc: pytest.ExceptionInfo, fname: str, line: int | None) -> None:
    msg = str(exc.value)
    assert fname in msg, msg
    if line is not None:
        assert re.search(rf"{re.escape(fname)}:{line}\b", msg), msg
        assert exc.value.line == line


# ---------------------------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("layout,writer", [("canonical", write_canonical), ("mygo", write_mygo),
                                           ("openke", write_openke), ("kbc", write_kbc)])
def test_detect_layout(tmp_path, layout, writer):
    assert detect_layout(writer(tmp_path / layout)) == layout


def test_all_layouts_give_the_same_triples(tmp_path):
    expected = {s: np.array(_ids(rows), dtype=np.int64).reshape(-1, 3) for s, rows in SPLIT_ROWS.items()}
    folders = [write_canonical(tmp_path / "c"), write_mygo(tmp_path / "m"), write_mygo(tmp_path / "m2", names=False),
               write_openke(tmp_path / "o"), write_openke(tmp_path / "o2", sep="\t", newline="\r\n", shuffle=True),
               write_kbc(tmp_path / "k")]
    for folder in folders:
        ds = load_dataset(folder)
        assert ds.num_entities == 5 and ds.num_relations == 3, folder
        for s in SPLITS:
            assert ds.splits[s].dtype == np.int64
            np.testing.assert_array_equal(ds.splits[s], expected[s], err_msg=str(folder))


def test_canonical_vocabulary_and_text(tmp_path):
    ds = load_dataset(write_canonical(tmp_path / "d"), name="tiny")
    assert ds.name == "tiny" and ds.layout == "canonical" and ds.root == tmp_path / "d"
    assert ds.entities.labels == [e[0] for e in ENTITIES]
    assert ds.entities.names == [e[1] for e in ENTITIES]
    assert ds.entities.descriptions == [e[2] for e in ENTITIES]
    assert ds.entities.name(2) == "m/c"  # empty name falls back to the label
    assert ds.relations.names == ["likes", "", "rare one"]
    # E comes from entities.tsv even though e9 (id 4) never occurs in train.
    assert ds.train.max() < 4 and ds.num_entities == 5
    assert len(ds.valid) == 2  # duplicate line kept
    assert load_dataset(tmp_path / "d").name == "d"


def test_canonical_without_text_columns(tmp_path):
    root = write_canonical(tmp_path / "d")
    _write(root / "entities.tsv", ["entity\tname\tdescription"] + [f"{e[0]}\t\t" for e in ENTITIES])
    _write(root / "relations.tsv", ["relation"] + [r[0] for r in RELATIONS])
    ds = load_dataset(root)
    assert ds.entities.names is None and ds.entities.descriptions is None and ds.relations.names is None


def test_mygo_names_and_openke_labels(tmp_path):
    ds = load_dataset(write_mygo(tmp_path / "m"))
    assert ds.entities.labels == ["0", "1", "2", "3", "4"]
    assert ds.entities.names == [e[0] for e in ENTITIES]
    ds = load_dataset(write_openke(tmp_path / "o", shuffle=True))
    assert ds.entities.labels == [f"<{e[0]}>" for e in ENTITIES]


def test_mygo_non_identity_ids(tmp_path):
    root = write_mygo(tmp_path / "m", names=False)
    # entities.txt lists ids in another order: row order decides the internal id.
    _write(root / "entities.txt", ["4", "3", "2", "1", "0"])
    ds = load_dataset(root)
    np.testing.assert_array_equal(ds.train[:, [0, 2]], 4 - np.array(_ids(TRAIN))[:, [0, 2]])


def test_kbc_sorted_vocabulary(tmp_path):
    ds = load_dataset(write_kbc(tmp_path / "k", id_files=False))
    used = sorted({x for rows in SPLIT_ROWS.values() for t in rows for x in (t[0], t[2])})
    assert ds.entities.labels == used  # union over splits, sorted as strings, like kbc
    assert ds.relations.labels == sorted({t[1] for rows in SPLIT_ROWS.values() for t in rows})
    for s in SPLITS:
        assert _label_triples(ds, s) == SPLIT_ROWS[s]


def test_blank_lines_crlf_and_bom(tmp_path):
    root = write_canonical(tmp_path / "d")
    _write(root / "train.tsv", ["\t".join(t) for t in TRAIN[:2]] + [""] + ["\t".join(t) for t in TRAIN[2:]] + [""],
           "\r\n")
    (root / "test.tsv").write_bytes(b"\xef\xbb\xbf" + (root / "test.tsv").read_bytes())
    ds = load_dataset(root)
    assert _label_triples(ds, "train") == TRAIN and _label_triples(ds, "test") == TEST


def test_empty_valid_warns_empty_train_fails(tmp_path):
    root = write_canonical(tmp_path / "d")
    _write(root / "valid.tsv", [])
    with pytest.warns(DataWarning, match="valid"):
        ds = load_dataset(root)
    assert ds.valid.shape == (0, 3)
    _write(root / "train.tsv", [])
    with pytest.raises(DataError, match="train split is empty") as exc:
        load_dataset(root)
    _assert_error(exc, "train.tsv", None)


# ---------------------------------------------------------------------------------------------- detection errors


def test_detect_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        detect_layout(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="folder"):
        detect_layout(tmp_path / "file")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as exc:
        detect_layout(empty)
    for files in LAYOUTS.values():
        for f in files:
            assert f in str(exc.value)
    root = write_canonical(tmp_path / "partial")
    (root / "relations.tsv").unlink()
    with pytest.raises(DataError, match=r"canonical is missing relations\.tsv"):
        detect_layout(root)
    with pytest.raises(DataError, match="missing: train.txt, valid.txt, test.txt, entities.txt"):
        load_dataset(write_canonical(tmp_path / "c"), layout="mygo")
    with pytest.raises(DataError, match="unknown layout"):
        load_dataset(tmp_path / "c", layout="csv")


# ---------------------------------------------------------------------------------------------- malformed input


def _canon(tmp_path: Path) -> Path:
    return write_canonical(tmp_path / "d")


def _set_line(path: Path, line: int, text: str) -> None:
    lines = path.read_text(encoding="utf-8").split("\n")
    lines[line - 1] = text
    path.write_text("\n".join(lines), encoding="utf-8")


CANONICAL_CASES = [
    # (file, 1-based line, replacement, expected message fragment)
    ("train.tsv", 2, "m/a\thates", "expected 3 tab-separated fields"),
    ("train.tsv", 3, "m/a\tlikes\tm/c\textra", "got 4"),
    ("valid.tsv", 1, "m/bb\trare\tm/c", "did you mean 'm/b'"),
    ("test.tsv", 2, "m/a\thate\tü/d", "unknown relation 'hate'"),
    ("test.tsv", 2, "m/a\thates\tnobody", "unknown entity 'nobody'"),
    ("entities.tsv", 4, "m/b\tdup\t", "duplicate entity label 'm/b' (first on line 2)"),
    ("entities.tsv", 1, "label\tname\tdescription", "header"),
    ("entities.tsv", 3, "m/a\tAy\t\textra", "4 tab-separated fields"),
    ("entities.tsv", 3, "\tAy\t", "empty entity label"),
    ("relations.tsv", 3, "likes\tagain", "duplicate relation label"),
]


@pytest.mark.parametrize("fname,line,text,fragment", CANONICAL_CASES)
def test_canonical_malformed(tmp_path, fname, line, text, fragment):
    root = _canon(tmp_path)
    _set_line(root / fname, line, text)
    with pytest.raises(DataError, match=re.escape(fragment)) as exc:
        load_dataset(root)
    _assert_error(exc, fname, line)


def test_bad_encoding_reports_line(tmp_path):
    root = _canon(tmp_path)
    data = (root / "test.tsv").read_bytes().split(b"\n")
    data[1] = b"m/a\thates\t\xff\xfe"
    (root / "test.tsv").write_bytes(b"\n".join(data))
    with pytest.raises(DataError, match="UTF-8") as exc:
        load_dataset(root)
    _assert_error(exc, "test.tsv", 2)


MYGO_CASES = [
    ("train.txt", 2, "1\tx\t2", "non-integer id"),
    ("train.txt", 3, "1\t1", "expected 3 integer fields 'h r t', got 2"),
    ("valid.txt", 1, "0\t1\t5", "entity id 5 is not in entities.txt"),
    ("test.txt", 2, "0\t3\t1", "relation id 3 is not in relations.txt"),
    ("test.txt", 1, "-1\t0\t1", "entity id -1"),
    ("entities.txt", 3, "0", "duplicate entity id '0' (first on line 1)"),
    ("entity2id.txt", 2, "m/a 7", "entity id 7 is not listed"),
]


@pytest.mark.parametrize("fname,line,text,fragment", MYGO_CASES)
def test_mygo_malformed(tmp_path, fname, line, text, fragment):
    root = write_mygo(tmp_path / "m")
    _set_line(root / fname, line, text)
    with pytest.raises(DataError, match=re.escape(fragment)) as exc:
        load_dataset(root)
    _assert_error(exc, fname, line)


OPENKE_CASES = [
    ("train2id.txt", 1, "5", "first line says 5 triples but the file has 4"),
    ("train2id.txt", 1, "four", "number of rows"),
    ("train2id.txt", 3, "1 2 9", "relation id 9 is not in relation2id.txt"),
    ("valid2id.txt", 2, "0 7 2", "entity id 7"),
    ("test2id.txt", 3, "1 3 1.5", "non-integer id"),
    ("entity2id.txt", 1, "6", "first line says 6 entities but the file has 5 rows"),
    ("entity2id.txt", 3, "<m/a> 9", "entity id 9 out of range"),
    ("entity2id.txt", 3, "<m/a> 0", "entity id 0 is assigned twice"),
    ("entity2id.txt", 3, "<m/b> 1", "duplicate entity label '<m/b>' (first on line 2)"),
    ("relation2id.txt", 2, "likes x", "not an integer"),
]


@pytest.mark.parametrize("fname,line,text,fragment", OPENKE_CASES)
def test_openke_malformed(tmp_path, fname, line, text, fragment):
    root = write_openke(tmp_path / "o")
    _set_line(root / fname, line, text)
    with pytest.raises(DataError, match=re.escape(fragment)) as exc:
        load_dataset(root)
    _assert_error(exc, fname, line)


KBC_CASES = [
    ("train", 2, "m/a\thates", "expected 3 tab-separated fields"),
    ("ent_id", 2, "m/a\t0", "entity id 0 is assigned twice"),
    ("valid", 1, "m/b\trare\tzzz", "unknown entity 'zzz'"),
]


@pytest.mark.parametrize("fname,line,text,fragment", KBC_CASES)
def test_kbc_malformed(tmp_path, fname, line, text, fragment):
    root = write_kbc(tmp_path / "k")
    _set_line(root / fname, line, text)
    with pytest.raises(DataError, match=re.escape(fragment)) as exc:
        load_dataset(root)
    _assert_error(exc, fname, line)


def test_kbc_without_ids_bad_line(tmp_path):
    root = write_kbc(tmp_path / "k", id_files=False)
    _set_line(root / "test", 2, "a\tb")
    with pytest.raises(DataError, match="expected 3") as exc:
        load_dataset(root)
    _assert_error(exc, "test", 2)


# ---------------------------------------------------------------------------------------------- real data


def _real(shared_data: Path, rel: str) -> Path:
    p = shared_data / rel
    if not p.is_dir():
        pytest.skip(f"{p} not present")
    return p


def test_db15k_three_layouts_identical(shared_data):
    sets = [load_dataset(_real(shared_data, p)) for p in ("DB15K", "DB15K/upstream/mygo", "DB15K/upstream/adamf")]
    assert [d.layout for d in sets] == ["canonical", "mygo", "openke"]
    for ds in sets:
        assert ds.name == "DB15K"
        assert (ds.num_entities, ds.num_relations) == (12842, 279)
        assert [len(ds.splits[s]) for s in SPLITS] == [79222, 9904, 9902]
        for s in SPLITS:
            np.testing.assert_array_equal(ds.splits[s], sets[0].splits[s])
    c = sets[0]
    assert c.entities.names is not None and all(c.entities.names)
    assert sum(1 for d in c.entities.descriptions if d) == 11670


@pytest.mark.parametrize("name,upstream,sizes", [
    ("MKG-W", "mygo", (15000, 169, 34196, 4276, 4274)),
    ("MKG-Y", "adamf", (15000, 28, 21310, 2665, 2663)),
    ("WN18", "openke", (40943, 18, 141442, 5000, 5000)),
    ("FB15K-237", "openke", (14541, 237, 272115, 17535, 20466)),
])
def test_real_upstream_matches_canonical(shared_data, name, upstream, sizes):
    a = load_dataset(_real(shared_data, name))
    b = load_dataset(_real(shared_data, f"{name}/upstream/{upstream}"))
    for ds in (a, b):
        assert (ds.num_entities, ds.num_relations, *(len(ds.splits[s]) for s in SPLITS)) == sizes
    for s in SPLITS:
        np.testing.assert_array_equal(a.splits[s], b.splits[s])
