import os
import pickle

import numpy as np
import pytest
import torch

from dsom.errors import DataError
from dsom.features.importers import import_features

from toy import random_graph


@pytest.fixture
def ds():
    return random_graph(num_entities=6, num_relations=1, num_triples=12, valid=2, test=2)


def test_npy_in_id_order(ds, tmp_path):
    x = np.arange(18, dtype=np.float32).reshape(6, 3)
    np.save(tmp_path / "f.npy", x)
    t = import_features(ds, tmp_path / "f.npy", "image")
    np.testing.assert_array_equal(t.features, x)
    assert t.present.all()


def test_npy_with_entity_order_and_missing_rows(ds, tmp_path):
    np.save(tmp_path / "f.npy", np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32))
    (tmp_path / "order.txt").write_text("e4\ne1\n")
    t = import_features(ds, tmp_path / "f.npy", "image", entity_order=tmp_path / "order.txt", imputation="zeros")
    np.testing.assert_array_equal(t.features[4], [1, 2])
    np.testing.assert_array_equal(t.features[1], [3, 4])
    assert t.present.tolist() == [False, True, False, False, True, False]
    assert not t.features[0].any()


def test_torch_tensor_and_dict(ds, tmp_path):
    torch.save(torch.ones(6, 4), tmp_path / "f.pt")
    assert import_features(ds, tmp_path / "f.pt", "text").features.shape == (6, 4)
    torch.save({"e2": torch.tensor([1.0, 2.0]), "e5": torch.tensor([3.0, 4.0])}, tmp_path / "g.pth")
    t = import_features(ds, tmp_path / "g.pth", "text")
    assert t.present.sum() == 2 and t.features[5].tolist() == [3.0, 4.0]


def test_mose_style_pickle_dict_is_read_safely(ds, tmp_path):
    with open(tmp_path / "f.pkl", "wb") as fh:
        pickle.dump({"e0": np.array([1.0, 2.0]), "e3": np.array([5.0, 6.0])}, fh)
    t = import_features(ds, tmp_path / "f.pkl", "image")
    assert t.features[3].tolist() == [5.0, 6.0] and t.present.sum() == 2


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_malicious_pickle_is_refused_without_running(ds, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "f.pkl", "wb") as fh:
        pickle.dump({"e0": _Evil()}, fh)
    with pytest.raises(DataError, match="--set features.allow_pickle=true"):
        import_features(ds, tmp_path / "f.pkl", "image")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("case,needle", [
    ("nan", "NaN or Inf"), ("rows", "pass an entity order"), ("dup", "appears twice"),
    ("unknown", "not in dataset"), ("corrupt", "cannot read"), ("shape", "2-D"),
])
def test_bad_files(ds, tmp_path, case, needle):
    f = tmp_path / "f.npy"
    order = None
    if case == "nan":
        x = np.zeros((6, 2), np.float32)
        x[3, 1] = np.nan
        np.save(f, x)
    elif case == "rows":
        np.save(f, np.zeros((5, 2), np.float32))
    elif case in ("dup", "unknown"):
        np.save(f, np.zeros((2, 2), np.float32))
        order = tmp_path / "o.txt"
        order.write_text("e1\ne1\n" if case == "dup" else "e1\nzzz\n")
    elif case == "corrupt":
        f.write_bytes(b"not a numpy file")
    else:
        np.save(f, np.zeros(6, np.float32))
    with pytest.raises(DataError, match=needle):
        import_features(ds, f, "image", entity_order=order)
