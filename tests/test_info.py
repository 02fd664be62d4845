"""dataset_info / format_info on a hand-built graph and on the real benchmarks (SPEC §1.1 figures)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dsom.data.graph import KGDataset, Vocabulary
from dsom.data.info import dataset_info, format_info
from dsom.data.readers import load_dataset


def _tiny() -> KGDataset:
    # 6 entities (4 and 5 unseen in train, 5 in no split), 3 relations (relation 2 unseen in train).
    train = [(0, 0, 1), (1, 0, 2), (0, 0, 2), (2, 1, 3), (3, 1, 0)]
    valid = [(0, 0, 1), (0, 0, 1), (0, 0, 1), (1, 1, 4), (3, 1, 2)]  # 3 copies (also in train), one unseen entity
    test = [(1, 1, 4), (4, 2, 0), (2, 0, 3), (1, 0, 0)]  # shares (1,1,4) with valid; unseen relation 2; (1,0,0) reverses train (0,0,1)
    ents = Vocabulary([f"e{i}" for i in range(6)], names=["a", "", "c", "", "", ""])
    rels = Vocabulary(["r0", "r1", "r2"])
    return KGDataset("tiny", ents, rels, {"train": np.array(train), "valid": np.array(valid), "test": np.array(test)})


def test_tiny_counts():
    info = dataset_info(_tiny())
    assert info["entities"] == 6 and info["relations"] == 3
    assert info["splits"]["valid"] == {"lines": 5, "distinct": 3, "duplicate_lines": 2, "max_repeats": 3}
    assert info["splits"]["train"]["duplicate_lines"] == 0
    assert info["overlaps"] == {"valid&train": 1, "test&train": 0, "valid&test": 1, "valid_only": 1, "test_only": 3}
    un = info["unseen"]
    assert un["entities_in_train"] == 4 and un["entities_unseen_in_train"] == 2 and un["entities_in_no_split"] == 1
    assert un["relations_in_train"] == 2 and un["relations_unseen_in_train"] == 1
    assert un["unseen_relations"] == [{"id": 2, "label": "r2"}]
    assert un["valid"] == {"triples_with_unseen_entity": 1, "triples_with_unseen_relation": 0}
    assert un["test"] == {"triples_with_unseen_entity": 2, "triples_with_unseen_relation": 1}
    assert info["pair_leakage"]["test"]["reversed_pair_in_train"] == pytest.approx(1 / 4)
    assert info["text"] == {"entity_names": 2, "entity_descriptions": 0, "relation_names": 0}
    assert info["files"] == {"numeric": None, "images": None}


def test_tiny_neighbours():
    nb = dataset_info(_tiny())["neighbours"]
    # Reciprocal train queries: (0,r0)->{1,2} twice, (1,r0)->{2}, (2,r1)->{3}, (3,r1)->{0},
    # inverse (1,r0')->{0}, (2,r0')->{1,0} twice, (3,r1')->{2}, (0,r1')->{3}.
    per = [2, 1, 2, 1, 1, 1, 2, 2, 1, 1]
    assert nb["queries"] == 10
    assert nb["mean"] == pytest.approx(np.mean(per)) and nb["median"] == np.median(per) and nb["max"] == 2
    assert nb["frac_gt1"] == pytest.approx(0.4)
    assert nb["distinct_queries"] == 8


def test_tiny_warnings_and_report():
    info = dataset_info(_tiny())
    text = "\n".join(info["warnings"])
    assert "valid has 2 duplicate lines" in text
    assert "valid shares 1 distinct triples with test" in text
    assert "1 relation never occurs in train (ids 2)" in text
    report = format_info(info)
    for fragment in ("Dataset tiny", "valid ∩ test", "unseen relations: 2 (r2)", "Warnings", "numeric.tsv  absent"):
        assert fragment in report


def _canonical_with_side_files(root: Path) -> Path:
    root.mkdir()
    (root / "entities.tsv").write_text("entity\tname\tdescription\na\tA\tfirst\nb\tB\t\nc\t\t\n")
    (root / "relations.tsv").write_text("relation\tname\nr\tR\n")
    (root / "train.tsv").write_text("a\tr\tb\nb\tr\tc\n")
    (root / "valid.tsv").write_text("a\tr\tc\n")
    (root / "test.tsv").write_text("c\tr\ta\n")
    (root / "numeric.tsv").write_text("entity\tattribute\tvalue\na\tx\t1\na\ty\t2\nb\tx\t3\nzz\tx\t4\n")
    (root / "images").mkdir()
    (root / "images" / "a.jpg").write_bytes(b"\xff\xd8")
    (root / "images.tsv").write_text("entity\tpath\na\timages/a.jpg\nb\timages/missing.jpg\n")
    return root


def test_side_files(tmp_path):
    ds = load_dataset(_canonical_with_side_files(tmp_path / "d"))
    info = dataset_info(ds)
    num = info["files"]["numeric"]
    assert (num["rows"], num["entities"], num["attributes"], num["unknown_rows"]) == (4, 2, 2, 1)
    img = info["files"]["images"]
    assert (img["rows"], img["entities"], img["missing_files"], img["unknown_rows"]) == (2, 2, 1, 0)
    assert info["text"] == {"entity_names": 2, "entity_descriptions": 1, "relation_names": 1}
    text = "\n".join(info["warnings"])
    assert "numeric.tsv: 1 rows name an entity not in the vocabulary" in text
    assert "1 image files are missing" in text
    assert "numeric.tsv  4 facts, 2 entities, 2 attributes" in format_info(info)


def test_malformed_side_file_is_a_warning(tmp_path):
    root = _canonical_with_side_files(tmp_path / "d")
    (root / "numeric.tsv").write_text("entity\tattribute\tvalue\na\tx\tabc\n")
    info = dataset_info(load_dataset(root))
    assert "error" in info["files"]["numeric"]
    assert any("numeric.tsv is malformed" in w and "numeric.tsv:2" in w for w in info["warnings"])


# ---------------------------------------------------------------------------------------------- real data


def _load(shared_data: Path, name: str) -> KGDataset:
    if not (shared_data / name).is_dir():
        pytest.skip(f"{shared_data / name} not present")
    return load_dataset(shared_data / name)


def test_db15k_info(shared_data):
    info = dataset_info(_load(shared_data, "DB15K"))
    assert info["splits"]["valid"]["distinct"] == 7481
    assert info["splits"]["valid"]["duplicate_lines"] == 9904 - 7481
    assert info["splits"]["test"]["duplicate_lines"] == 0
    ov = info["overlaps"]
    assert (ov["valid&train"], ov["valid&test"], ov["test&train"], ov["valid_only"]) == (6584, 824, 0, 73)
    un = info["unseen"]
    assert un["entities_in_train"] == 12785
    assert un["relations_unseen_in_train"] == 6
    assert [x["id"] for x in un["unseen_relations"]] == [40, 124, 171, 194, 272, 274]
    assert un["test"]["triples_with_unseen_entity"] == 77
    assert un["test"]["triples_with_unseen_relation"] == 7
    nb = info["neighbours"]
    assert round(nb["mean"]) == 332 and nb["median"] == 3 and nb["max"] == 6777
    assert nb["frac_gt1"] == pytest.approx(0.657, abs=5e-4)
    assert info["files"]["numeric"]["rows"] == 27367 and info["files"]["numeric"]["entities"] == 11241
    assert info["text"]["entity_descriptions"] == 11670
    text = "\n".join(info["warnings"])
    assert "valid has 2,423 duplicate lines" in text
    assert "valid shares 824 distinct triples with test" in text
    assert "6,584 of 7,481 distinct valid triples" in text
    report = format_info(info)
    assert "valid ∩ test         824" in report


@pytest.mark.parametrize("name,in_train,test_unseen,nb_stats", [
    ("MKG-W", 14509, 306, (202, 2, 3533)),
    ("MKG-Y", 14388, 388, (3.7, 2, 76)),
])
def test_mkg_info(shared_data, name, in_train, test_unseen, nb_stats):
    info = dataset_info(_load(shared_data, name))
    assert info["unseen"]["entities_in_train"] == in_train
    assert info["unseen"]["test"]["triples_with_unseen_entity"] == test_unseen
    nb = info["neighbours"]
    assert nb["mean"] == pytest.approx(nb_stats[0], abs=0.5) and nb["median"] == nb_stats[1]
    assert nb["max"] == nb_stats[2]


def test_mkgw_relation_only_in_valid(shared_data):
    un = dataset_info(_load(shared_data, "MKG-W"))["unseen"]
    assert [x["id"] for x in un["unseen_relations"]] == [168]
    assert un["valid"]["triples_with_unseen_relation"] == 1 and un["test"]["triples_with_unseen_relation"] == 0


def test_wn18_inverse_leakage_warning(shared_data):
    info = dataset_info(_load(shared_data, "WN18"))
    assert info["pair_leakage"]["test"]["reversed_pair_in_train"] > 0.9
    assert any("inverse-relation leakage" in w for w in info["warnings"])
