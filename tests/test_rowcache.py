"""RowCache: rows stored per key, read once sealed; its state round-trips through a checkpoint."""

from __future__ import annotations

import pytest
import torch

from dsom.distill.rowcache import RowCache


def test_row_cache_stores_reads_and_seals_only_when_every_slot_is_filled():
    cache = RowCache(4, 3)
    rows = torch.arange(12, dtype=torch.float64).reshape(4, 3)
    assert not cache.serves(torch.tensor([0])) and not cache.seal()
    cache.store(torch.tensor([2, 0]), rows[[2, 0]])
    assert cache.values.dtype == torch.float32 and cache.filled.tolist() == [True, False, True, False]
    assert not cache.seal() and not cache.serves(torch.tensor([0]))  # slots 1 and 3 never stored
    cache.store(torch.tensor([3, 1]), rows[[3, 1]])
    assert cache.seal() and cache.serves(torch.tensor([1])) and not cache.serves(None)
    torch.testing.assert_close(cache.read(torch.tensor([3, 3, 1])), rows[[3, 3, 1]].float())


def test_row_cache_state_round_trips_and_a_mismatched_state_is_ignored():
    cache = RowCache(3, 2)
    cache.store(torch.tensor([0, 1, 2]), torch.randn(3, 2))
    saved = cache.state()
    fresh = RowCache(3, 2)
    assert fresh.load_state(saved) and fresh.sealed
    torch.testing.assert_close(fresh.values, cache.values, rtol=0, atol=0)
    other = RowCache(4, 2)
    assert not other.load_state(saved) and not other.load_state(None) and not bool(other.filled.any())
    partial = RowCache(3, 2)
    partial.store(torch.tensor([1]), torch.ones(1, 2))
    restored = RowCache(3, 2)
    assert restored.load_state(partial.state()) and not restored.sealed  # restored, but not complete


def test_row_cache_is_left_out_of_its_owners_state_dict_and_rejects_an_empty_shape():
    owner = torch.nn.Module()
    owner.cache = RowCache(2, 2)
    assert owner.state_dict() == {} and len(list(owner.buffers())) == 2
    with pytest.raises(ValueError, match="at least one slot"):
        RowCache(0, 2)


def test_rows_not_kept_go_to_the_spare_row_and_never_reach_a_slot():
    """``store(keys, rows, keep)``: one write of fixed shape (a CUDA graph's), the rows outside ``keep`` dropped even
    where their key names a real slot or is -1 (a query without a slot); the state keeps exactly the slots."""
    cache = RowCache(3, 2)
    keys = torch.tensor([1, -1, 0, 2])
    rows = torch.arange(8, dtype=torch.float32).reshape(4, 2)
    keep = torch.tensor([True, False, False, True])
    cache.store(keys, rows, keep)
    assert cache.filled.tolist() == [False, True, True]
    torch.testing.assert_close(cache.values, torch.tensor([[0.0, 0.0], [0.0, 1.0], [6.0, 7.0]]))
    assert cache.state()["values"].shape == (3, 2) and cache.state()["filled"].shape == (3,)
    cache.store(torch.tensor([0]), torch.tensor([[9.0, 9.0]]))
    assert cache.seal()
    # a key of -1 reads the spare row (what a masked reader then multiplies by nothing); the slots read their rows
    torch.testing.assert_close(cache.read(torch.tensor([0, 2]))[1], torch.tensor([6.0, 7.0]))
    assert cache.read(torch.tensor([-1])).shape == (1, 2)
