"""Numeric literal modality: parsing, per-attribute min-max normalisation, imputation, errors, DB15K."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from dsom.data.graph import KGDataset, Vocabulary
from dsom.data.modality import ModalityTable
from dsom.data.readers import DataWarning, load_dataset
from dsom.errors import DataError
from dsom.features.numeric import build_numeric, read_numeric

LABELS = ["a", "b", "c", "d", "e"]

FACTS = """entity\tattribute\tvalue
a\theight\t10
b\theight\t30
c\theight\t20
c\theight\t40
a\tyear\t1990.5
b\tyear\t1990.5
d\tweight\t-2.5
"""


def _ds(root: Path | None = None) -> KGDataset:
    triples = np.array([[0, 0, 1], [1, 0, 2], [2, 0, 3], [3, 0, 4]])
    return KGDataset("toy", Vocabulary(LABELS), Vocabulary(["r"]), {"train": triples}, root=root)


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "numeric.tsv"
    p.write_text(text, encoding="utf-8")
    return p


def test_values_by_hand(tmp_path):
    p = _write(tmp_path, FACTS)
    table = build_numeric(_ds(tmp_path), imputation="zeros")
    assert isinstance(table, ModalityTable) and table.name == "numeric"
    assert table.columns == ["height", "weight", "year"]  # sorted attribute names
    # height: a=10, b=30, c=mean(20, 40)=30 -> min 10, max 30 -> a 0, b 1, c 1.
    # weight: only d -> constant attribute -> 1.0.  year: a, b equal -> constant -> 1.0.
    expected = np.array([
        [0.0, 0.0, 1.0],  # a
        [1.0, 0.0, 1.0],  # b
        [1.0, 0.0, 0.0],  # c: no year -> 0 fill
        [0.0, 1.0, 0.0],  # d
        [0.0, 0.0, 0.0],  # e: no facts -> imputed (zeros here)
    ], dtype=np.float32)
    np.testing.assert_allclose(table.features, expected)
    np.testing.assert_array_equal(table.present, [True, True, True, True, False])
    assert str(p) in table.source
    # The same file given explicitly, for a dataset without a folder.
    np.testing.assert_allclose(build_numeric(_ds(), path=p, imputation="zeros").features, expected)


def test_min_max_spread(tmp_path):
    _write(tmp_path, "entity\tattribute\tvalue\na\tx\t-1\nb\tx\t3\nc\tx\t0\nd\tx\t1e0\n")
    table = build_numeric(_ds(tmp_path), imputation="zeros")
    np.testing.assert_allclose(table.features[:, 0], [0.0, 1.0, 0.25, 0.5, 0.0])


def test_imputation_and_seed(tmp_path):
    _write(tmp_path, FACTS)
    t1 = build_numeric(_ds(tmp_path), seed=3)
    t2 = build_numeric(_ds(tmp_path), seed=3)
    t3 = build_numeric(_ds(tmp_path), seed=4)
    np.testing.assert_array_equal(t1.features, t2.features)
    assert not np.array_equal(t1.features[4], t3.features[4])  # entity e is imputed from N(0, 1)
    np.testing.assert_array_equal(t1.features[:4], t3.features[:4])
    mean = build_numeric(_ds(tmp_path), imputation="mean")
    np.testing.assert_allclose(mean.features[4], mean.features[:4].mean(axis=0), rtol=1e-6)


def test_min_count(tmp_path):
    _write(tmp_path, FACTS)
    table = build_numeric(_ds(tmp_path), min_count=2, imputation="zeros")
    assert table.columns == ["height", "year"]
    np.testing.assert_array_equal(table.present, [True, True, True, False, False])  # d only had weight
    with pytest.raises(DataError, match="min_count=4"):
        build_numeric(_ds(tmp_path), min_count=4)


def test_unknown_entities_warn_and_skip(tmp_path):
    _write(tmp_path, FACTS + "zz\theight\t1000\nzz\tyear\t1\nyy\tspeed\t3\n")
    with pytest.warns(DataWarning, match=r"skipped 3 rows .* \(2 distinct labels"):
        table = build_numeric(_ds(tmp_path), imputation="zeros")
    assert table.columns == ["height", "weight", "year"]  # 'speed' only had an unknown entity
    assert table.features[0, 0] == 0.0 and table.features[1, 0] == 1.0  # 1000 did not enter the range
    facts = read_numeric(tmp_path / "numeric.tsv", {lab: i for i, lab in enumerate(LABELS)})
    assert facts.rows == 10 and facts.unknown_rows == 3 and facts.unknown_entities == ["zz", "yy"]
    assert facts.num_entities == 4


@pytest.mark.parametrize("text,line,fragment", [
    ("entity\tattribute\tvalue\na\tx\t1\nb\tx\tabc\n", 3, "'abc' is not a decimal number"),
    ("entity\tattribute\tvalue\na\tx\t1\nb\tx\tnan\n", 3, "not finite"),
    ("entity\tattribute\tvalue\na\tx\t1\nb\tx\n", 3, "expected 3 tab-separated fields"),
    ("entity\tattribute\tvalue\na\tx\t1\t2\n", 2, "got 4"),
    ("entity\tattribute\tvalue\na\t\t1\n", 2, "empty attribute name"),
    ("a\tx\t1\n", 1, "header"),
    ("", 1, "empty file"),
])
def test_malformed(tmp_path, text, line, fragment):
    _write(tmp_path, text)
    with pytest.raises(DataError, match=re.escape(fragment)) as exc:
        build_numeric(_ds(tmp_path))
    assert re.search(rf"numeric\.tsv:{line}\b", str(exc.value)), str(exc.value)


def test_bad_encoding(tmp_path):
    (tmp_path / "numeric.tsv").write_bytes(b"entity\tattribute\tvalue\na\tx\t1\n\xe9\tx\t2\n")
    with pytest.raises(DataError, match=r"numeric\.tsv:3: not valid UTF-8"):
        build_numeric(_ds(tmp_path))


def test_blank_lines_and_crlf(tmp_path):
    (tmp_path / "numeric.tsv").write_bytes(FACTS.replace("\n", "\r\n").replace("d\t", "\r\nd\t").encode())
    table = build_numeric(_ds(tmp_path), imputation="zeros")
    assert table.columns == ["height", "weight", "year"] and table.present.sum() == 4


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="numeric.tsv not found"):
        build_numeric(_ds(tmp_path))
    with pytest.raises(DataError, match="has no folder"):
        build_numeric(_ds(None))


def test_db15k_numeric(shared_data):
    root = shared_data / "DB15K"
    if not (root / "numeric.tsv").is_file():
        pytest.skip(f"{root / 'numeric.tsv'} not present")
    ds = load_dataset(root)
    table = build_numeric(ds)
    n_attr = len({ln.split("\t")[1] for ln in (root / "numeric.tsv").read_text().splitlines()[1:]})
    assert table.features.shape == (12842, n_attr) and len(table.columns) == n_attr
    assert int(table.present.sum()) == 11241
    real = table.features[table.present]
    assert real.min() == 0.0 and real.max() == 1.0
    assert (table.features.max(axis=0) >= 1.0).all()  # every column reaches 1 somewhere
