"""tools/: the seed table's means, sample standard deviations and differences against a direct computation."""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(folder: Path, mrr: dict[str, float]) -> None:
    folder.mkdir(parents=True)
    models = {m: {"valid": {"realistic": {"mrr": v, "hits@10": 2 * v}}} for m, v in mrr.items()}
    (folder / "results.json").write_text(json.dumps({"models": models}))


def test_seed_table_prints_each_groups_mean_std_and_the_difference(tmp_path, capsys):
    a = {"s1": 0.30, "s2": 0.32, "s3": 0.31}
    b = {"s1": 0.33, "s2": 0.35, "s3": 0.34}
    for group, vals in (("old", a), ("new", b)):
        for seed, v in vals.items():
            _run(tmp_path / group / f"DS-{seed}", {"teacher/text": v, "student": v / 2})
    tool = _tool("seed_table")
    assert tool.main([f"old={tmp_path}/old/DS-*", f"new={tmp_path}/new/DS-*"]) == 0
    out = capsys.readouterr().out.splitlines()
    text = next(line for line in out if line.startswith("teacher/text"))
    mean_a, sd_a = statistics.mean(a.values()), statistics.stdev(a.values())
    assert f"old: {mean_a:.4f} ± {sd_a:.4f} (0.3000, 0.3200, 0.3100)" in text
    assert f"new - old: {statistics.mean(b.values()) - mean_a:+.4f}" in text
    student = next(line for line in out if line.startswith("student"))
    assert f"new: {statistics.mean(b.values()) / 2:.4f}" in student
    with pytest.raises(SystemExit, match="no run"):
        tool.main([f"old={tmp_path}/nothing-*"])


def test_dev_split_holds_out_a_seeded_slice_of_train_that_dsom_reads_as_valid(tmp_path):
    from dsom.data.registry import load

    from toy import clustered_graph, write_canonical

    src = tmp_path / "src"
    write_canonical(clustered_graph(num_entities=60), src)
    tool = _tool("dev_split")
    train = src.joinpath("train.tsv").read_text().splitlines()
    assert tool.main([str(src), str(tmp_path / "a"), "--triples", "25", "--seed", "3"]) == (len(train) - 25, 25)
    held = (tmp_path / "a" / "valid.tsv").read_text().splitlines()
    kept = (tmp_path / "a" / "train.tsv").read_text().splitlines()
    assert len(held) == 25 and sorted(held + kept) == sorted(train) and not set(held) & set(kept)
    assert (tmp_path / "a" / "test.tsv").read_text() == (src / "test.tsv").read_text()  # linked as it is
    tool.main([str(src), str(tmp_path / "b"), "--triples", "25", "--seed", "3"])
    tool.main([str(src), str(tmp_path / "c"), "--triples", "25", "--seed", "4"])
    assert (tmp_path / "b" / "valid.tsv").read_text() == "\n".join(held) + "\n"  # a seed is a split
    assert (tmp_path / "c" / "valid.tsv").read_text() != "\n".join(held) + "\n"
    ds = load(str(tmp_path / "a"))
    assert len(ds.valid) == 25 and len(ds.train) == len(kept)
    with pytest.raises(SystemExit, match="not empty"):
        tool.main([str(src), str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="between 1 and"):
        tool.main([str(src), str(tmp_path / "d"), "--triples", str(len(train))])
