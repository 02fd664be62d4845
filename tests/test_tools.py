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
