"""torchrun on CPU with gloo and 2 processes (1 thread each): the sharded filtered evaluation gives exactly the
single-process metrics; data-parallel training (`dsom run`: teachers, ensembles, the student with its policy) gives
the single-process weights within a stated tolerance; a killed 2-process run resumes to the uninterrupted 2-process
run; commands that are not distributed refuse to start under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from dsom.cli import main

from toy import KILL_LAUNCHER, clustered_graph, write_canonical


def _torchrun(args, tmp_path, module=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *(["-m", "dsom"] if module else []), *args], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)


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
def test_a_command_not_distributed_refuses_to_start_under_torchrun(tmp_path):
    proc = _torchrun(["tune", "-o", str(tmp_path / "r"), "-q"], tmp_path)
    assert proc.returncode != 0
    assert "under torchrun only dsom evaluate, dsom run, dsom pretrain, dsom distill are distributed" in proc.stderr
    assert not (tmp_path / "r").exists()


# The embedded synthetic graph, small: 4 teachers (structure, text, numeric, image), the RL policy with its own Adam.
# 401 train triples: the teachers train on 722 reciprocal queries (10% held out for the policy's rewards), the
# student on 802; with 267 per batch that is 3 steps per teacher epoch and 4 per student epoch, the last of them
# 1 query, so one of the two processes has an empty share there (a stand-in row with weight 0).
RUN = ["--rank", "8", "--set", "data.synthetic.num_train=401", "--set", "data.synthetic.num_entities=100",
       "--set", "data.synthetic.num_valid=120", "--set", "data.synthetic.num_test=120", "--set", "train.batch_size=267",
       "--set", "train.precision=fp32", "--set", "train.valid_every=1", "--set", "distill.variants=[]",
       "--set", "ensemble.mi_epochs=1", "--set", "distill.policy_hidden=16", "--set", "train.threads=1", "-q"]


def _weights(run: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted((run / "checkpoints").glob("*/*/model.safetensors")):
        for name, arr in load_file(str(f)).items():
            out[f"{f.parent.parent.name}/{f.parent.name}/{name}"] = arr
    return out


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _models(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())["models"]


def _compare(one: Path, two: Path, atol: float) -> float:
    """The largest weight difference between two runs (asserted below ``atol``); both ran the same steps."""
    w1, w2 = _weights(one), _weights(two)
    assert set(w1) == set(w2) and any(k.startswith("student/last/selector.policy") for k in w1)
    worst = max(float(np.abs(w1[k] - w2[k]).max()) for k in w1)
    assert worst <= atol, worst
    # the policy sampled the same actions: the per-epoch histograms (global counts, logged once, by rank 0) agree
    r1, r2 = _records(one), _records(two)
    assert len(r1) == len(r2)  # one writer: no record twice
    actions = [(a["actions"], b["actions"]) for a, b in zip(r1, r2) if "actions" in a]
    assert actions and all(a == b for a, b in actions)
    return worst


@pytest.mark.slow
def test_two_processes_train_the_weights_of_one_process_exactly_up_to_rounding(tmp_path):
    """With SGD (no per-coordinate normalisation that would magnify rounding), one epoch per stage: 3 teacher steps,
    4 student steps and their policy updates. Measured: largest difference 1.5e-8 over every table and policy
    weight (fp32 rounding of the gradient sums); the metrics of every model, ensembles included, are equal."""
    args = [*RUN, "--epochs", "1", "--set", "distill.epochs=1", "--set", "train.optimizer=sgd",
            "--set", "distill.policy_optimizer=shared"]
    assert main(["run", "-o", str(tmp_path / "one"), *args]) == 0
    proc = _torchrun(["run", "-o", str(tmp_path / "two"), *args], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run directory:") == 1  # rank 0 alone reports
    _compare(tmp_path / "one", tmp_path / "two", atol=1e-6)
    assert _models(tmp_path / "two") == _models(tmp_path / "one")




@pytest.mark.slow
def test_two_processes_with_the_default_optimizers_and_a_killed_run_resumes(tmp_path):
    """Adagrad and the policy's Adam, two epochs per stage after one pass of policy pre-training (sharded like a
    training epoch). Against one process: within 1e-3 (measured: 1.2e-4 on
    weights up to 1.1; both optimizers' first steps divide a gradient by its own magnitude, so the rounding of a
    near-zero gradient coordinate moves a weight by up to lr). A 2-process run killed (SIGKILL, both processes)
    in the student's second epoch, after its first epoch's checkpoint, resumes with ``torchrun ... --resume`` to
    exactly the weights and metrics of the uninterrupted 2-process run."""
    args = [*RUN, "--epochs", "2", "--set", "distill.epochs=2", "--set", "distill.policy_pretrain_epochs=1"]
    assert main(["run", "-o", str(tmp_path / "one"), *args]) == 0
    proc = _torchrun(["run", "-o", str(tmp_path / "two"), *args], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _compare(tmp_path / "one", tmp_path / "two", atol=1e-3)
    # each process filled its shares' rows of the summary-state and reward caches; merged after the first epoch,
    # rank 0's checkpoint holds every row of both, as one process's does (distributed.merge_filled)
    import torch

    for run in ("one", "two"):
        extra = torch.load(tmp_path / run / "checkpoints" / "student" / "last" / "train_state.pt",
                           weights_only=False)["extra"]
        assert bool(extra["summary_cache"]["filled"].all()) and bool(extra["reward_cache"]["filled"].all()), run

    launcher = tmp_path / "launch.py"
    launcher.write_text(KILL_LAUNCHER)
    killed = tmp_path / "killed"
    proc = _torchrun([str(launcher), "distill", "2", "0", "run", "-o", str(killed), *args], tmp_path, module=False)
    assert proc.returncode != 0
    assert not (killed / "results.json").exists() and (killed / "checkpoints" / "student" / "last").exists()
    proc = _torchrun(["run", "-o", str(killed), "--resume", "-q"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    w2, wk = _weights(tmp_path / "two"), _weights(killed)
    assert set(wk) == set(w2) and all(np.array_equal(wk[k], w2[k]) for k in w2)
    assert _models(killed) == _models(tmp_path / "two")
    epochs = [(r["stage"], r["epoch"]) for r in _records(killed) if "epoch" in r and "step" not in r]
    assert len(epochs) == len(set(epochs)) == 5, epochs  # the redone epoch is logged once


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


def test_the_policy_samples_like_multinomial_and_a_share_samples_its_rows_of_the_batch():
    """sample_actions is torch.multinomial's one-sample algorithm (equal draws from equal generators), and a share
    ``[a, b)`` of a batch, drawing the whole batch's noise, gets exactly the actions of those rows."""
    import torch

    from dsom.distill.selectors import sample_actions

    for B, A, seed in [(7, 3, 0), (1000, 15, 1), (33, 7, 2)]:
        probs = torch.rand(B, A, generator=torch.Generator().manual_seed(seed)).softmax(-1)
        full = sample_actions(probs, torch.Generator().manual_seed(seed))
        assert torch.equal(full, torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed)).squeeze(1))
        for a, b in [(0, B // 2), (B // 2, B), (B - 1, B)]:
            part = sample_actions(probs[a:b], torch.Generator().manual_seed(seed), (a, b, B))
            assert torch.equal(part, full[a:b])


def test_a_cache_merged_over_two_processes_holds_every_row_any_of_them_filled(monkeypatch):
    """``distributed.merge_filled`` with the all-reduce simulated: process A filled rows 0 and 1, B rows 1 and 2 (row 1
    with a value that differs by rounding); merged, each process holds A's row 0, B's row 2, their mean on row 1 and an
    unfilled zero row 3."""
    import torch

    from dsom import distributed

    a = torch.tensor([[1.0, 2.0], [3.0, 4.0], [9.0, 9.0], [7.0, 7.0]])  # rows 2, 3: stale values, not filled here
    b = torch.tensor([[5.0, 5.0], [3.0, 4.5], [6.0, 8.0], [7.0, 7.0]])
    fa, fb = torch.tensor([True, True, False, False]), torch.tensor([False, True, True, False])
    others = {"A": (b, fb), "B": (a, fa)}
    for me, (values, filled) in {"A": (a.clone(), fa.clone()), "B": (b.clone(), fb.clone())}.items():
        ov, of = others[me]

        def fake_sum(t, ov=ov, of=of):  # the other process's contribution to the one all-reduce
            return t.add_(torch.cat([of.float().unsqueeze(1), ov * of.unsqueeze(1)], 1))

        monkeypatch.setattr(distributed, "active", lambda: True)
        monkeypatch.setattr(distributed, "sum_", fake_sum)
        distributed.merge_filled(values, filled)
        assert filled.tolist() == [True, True, True, False]
        torch.testing.assert_close(values, torch.tensor([[1.0, 2.0], [3.0, 4.25], [6.0, 8.0], [0.0, 0.0]]))
    monkeypatch.setattr(distributed, "active", lambda: False)  # alone: untouched
    values, filled = a.clone(), fa.clone()
    distributed.merge_filled(values, filled)
    assert torch.equal(values, a) and torch.equal(filled, fa)
