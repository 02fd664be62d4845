import numpy as np
import pytest

from dsom.data.modality import ModalityTable, apply_missing_rate
from dsom.errors import DataError
from dsom.features.cache import FeatureCache, digest


def _table(E=10, F=3, missing=(2,)):
    present = np.ones(E, bool)
    present[list(missing)] = False
    return ModalityTable.from_partial("numeric", np.arange(E * F, dtype=np.float32).reshape(E, F), present,
                                      seed=1, source="test")


def test_roundtrip_and_reuse(tmp_path):
    cache = FeatureCache(tmp_path)
    calls = []

    def build():
        calls.append(1)
        t = _table()
        t.columns = ["a", "b", "c"]
        return t

    key = digest(["enc", "inputs"])
    t1, hit1 = cache.get_or_build("DB15K", "numeric", key, build)
    t2, hit2 = cache.get_or_build("DB15K", "numeric", key, build)
    assert (hit1, hit2) == (False, True) and len(calls) == 1
    np.testing.assert_array_equal(t1.features, t2.features)
    np.testing.assert_array_equal(t1.present, t2.present)
    assert t2.columns == ["a", "b", "c"] and t2.source == "test"
    cache.get_or_build("DB15K", "numeric", key, build, force=True)
    assert len(calls) == 2
    assert cache.path("DB15K", "numeric", digest(["enc", "other"])) != cache.path("DB15K", "numeric", key)


def test_corrupt_entry_is_a_clear_error(tmp_path):
    cache = FeatureCache(tmp_path)
    p = cache.save("d", _table(), "k")
    p.write_bytes(b"garbage")
    with pytest.raises(DataError, match="corrupt feature cache"):
        cache.load("d", "numeric", "k")


def test_digest_is_unambiguous():
    assert digest(["ab", "c"]) != digest(["a", "bc"])


def test_missing_rate_counts_existing_missing_rows():
    t = _table(E=100, missing=range(10))
    out = apply_missing_rate(t, 0.4, seed=3)
    assert (~out.present).sum() == 40
    assert not out.present[:10].any()  # already missing stay missing
    kept = out.present
    np.testing.assert_array_equal(out.features[kept], t.features[kept])
    newly = t.present & ~out.present
    assert newly.sum() == 30 and not np.allclose(out.features[newly], t.features[newly])
    assert apply_missing_rate(t, 0.05) is t  # already above the rate: unchanged
    with pytest.raises(DataError):
        apply_missing_rate(t, 1.5)
