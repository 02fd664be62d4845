"""`torchrun -m dsom evaluate` on CPU with gloo and 2 processes (1 thread each): the sharded filtered evaluation
gives exactly the single-process metrics; commands not distributed yet refuse to start under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dsom.cli import main

from toy import clustered_graph, write_canonical


def _torchrun(args, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "dsom", *args], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)


@pytest.mark.slow
def test_sharded_evaluation_over_two_processes_equals_one_process(tmp_path):
    d = tmp_path / "kg"
    write_canonical(clustered_graph(num_entities=70), d)
    run = tmp_path / "run"
    assert main(["run", str(d), "-o", str(run), "--rank", "6", "--epochs", "2", "--modalities", "structure,text",
                 "--set", "distill.epochs=1", "-q"]) == 0
    for target in (run, run / "checkpoints" / "teachers" / "final"):  # a student, and all teachers at once
        one, two = tmp_path / "one.json", tmp_path / "two.json"
        # a small batch and memory budget: many blocks, so each process ranks several of its own
        opts = ["--split", "test", "--batch-size", "16", "--memory-budget-mb", "1", "-q"]
        assert main(["evaluate", str(target), "--json", str(one), *opts]) == 0
        proc = _torchrun(["evaluate", str(target), "--json", str(two), *opts], tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads(two.read_text()) == json.loads(one.read_text())
        assert proc.stdout.count("filtered") == 1  # only rank 0 reports


@pytest.mark.slow
def test_a_command_not_yet_distributed_refuses_to_start_under_torchrun(tmp_path):
    proc = _torchrun(["run", "-o", str(tmp_path / "r"), "-q"], tmp_path)
    assert proc.returncode != 0
    assert "under torchrun only dsom evaluate is distributed so far" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_each_process_ranks_only_its_share_and_the_shares_add_up(monkeypatch):
    """The sharding of rank_queries, in one process: with rank r of 2 (and the all-reduce left out), each share
    fills a disjoint set of queries, both are non-empty, and their sum is the one-process result."""
    import torch

    from dsom import distributed
    from dsom.evaluate import rank_queries
    from dsom.models.complex import ComplEx

    ds = clustered_graph(num_entities=60)
    model = ComplEx(ds.num_entities, 2 * ds.num_relations, 4)
    q = ds.reciprocal(ds.test)
    fi = ds.filter_index
    full = rank_queries(model, q, fi, batch_size=8)
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "world", lambda: 2)
    monkeypatch.setattr(distributed, "sum_", lambda t: t)
    parts = []
    for r in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        parts.append(rank_queries(model, q, fi, batch_size=8))
    # the queries each process filled (a query ranked first with no tie also reads 0, so this is a subset)
    mine = [(p.greater != 0) | (p.equal != 0) for p in parts]
    assert not (mine[0] & mine[1]).any() and mine[0].any() and mine[1].any()
    assert torch.equal(parts[0].greater + parts[1].greater, full.greater)
    assert torch.equal(parts[0].equal + parts[1].equal, full.equal)
