"""The layering the package promises (issue 16, docs/architecture.md): every room imports only rooms on lower
floors (so ``data/`` never imports ``features/``: features are built from data, not the reverse), and no module of
the package imports itself back through a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "dsom"


def _imports(path: Path) -> set[str]:
    """Every ``dsom.*`` module a file imports, at the top or inside functions."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dsom"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("dsom"))
    return out


def _module(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_data_never_imports_features():
    offenders = {_module(p): sorted(m for m in _imports(p) if m.startswith("dsom.features"))
                 for p in (SRC / "data").glob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}


def test_the_checker_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from dsom.features.image import build_image\n")
    assert _imports(f) == {"dsom.features.image"}


def _top_level_imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dsom"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("dsom"))
    return out


def test_no_import_cycle_among_module_level_imports():
    graph = {_module(p): _top_level_imports(p) for p in SRC.rglob("*.py")}
    graph = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1 and not m.startswith(d + "."):  # a package importing its own submodule is fine
                cycles.append(stack[stack.index(d):] + [m, d] if d in stack else [m, d])
            elif d not in state:
                visit(d, stack + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not cycles, cycles


def test_triple_keys_product_and_dense_fallback_agree_on_equality():
    import numpy as np

    from dsom.data.graph import triple_keys

    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, (200, 3))
    b = np.concatenate([a[:50], rng.integers(0, 5, (30, 3))])
    small = triple_keys([a, b], 5, 5)
    huge = triple_keys([a, b], 3_000_000_000, 5)  # E^2 R >= 2^62: dense ids from np.unique
    assert not np.array_equal(small[0], huge[0])  # the two encodings really differ
    for ka, kb in (small, huge):
        same = (a[:, None, :] == b[None, :, :]).all(-1)  # brute force: which rows are the same triple
        assert np.array_equal(ka[:, None] == kb[None, :], same)
        assert np.array_equal(ka[:, None] == ka[None, :], (a[:, None, :] == a[None, :, :]).all(-1))


def test_cli_options_follow_the_config_schema():
    """Shortcuts and choice lists of the CLI are generated from the config schema, so they cannot drift."""
    from dsom.cli import SHORTCUTS, _overrides, build_parser
    from dsom.config import key_choices

    parser = build_parser()
    args = parser.parse_args(["run", "--rank", "12", "--epochs", "3", "--batch-size", "7", "--seed", "4",
                              "--precision", "fp32", "--tracker", "mlflow,tensorboard"])
    assert dict(_overrides(args)) == {"model.rank": 12, "train.epochs": 3, "train.batch_size": 7, "train.seed": 4,
                                      "train.precision": "fp32", "track.trackers": ["mlflow", "tensorboard"]}
    assert {key for _, key in SHORTCUTS} == {k for k, _ in _overrides(args)}
    run = parser._subparsers._group_actions[0].choices["run"]
    by_dest = {a.dest: a for a in run._actions}
    assert by_dest["precision"].choices == key_choices("train.precision")
    feats = parser._subparsers._group_actions[0].choices["features"]
    assert {a.dest: a for a in feats._actions}["text_pooling"].choices == key_choices("features.text_pooling")


#: the rooms from the bottom up: a room imports only rooms on lower floors (anywhere in a file, lazily too)
FLOORS: list[set[str]] = [
    {"errors", "numerics", "ranks", "perf", "__version__"},
    {"runlock", "distributed", "version"},
    {"config", "schema"},
    {"data", "report"},
    {"features", "models"},
    {"evaluate", "interop"},
    {"predict", "distill", "ensemble"},
    {"train"},
    {"runs"},
    {"tune", "reproduce"},
    {"cli"},
    {"__main__"},
]


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__version__"  # ``from dsom import __version__``


def test_every_room_imports_only_rooms_below_it():
    floor = {room: i for i, rooms in enumerate(FLOORS) for room in rooms}
    upward, unplaced = [], set()
    for p in SRC.rglob("*.py"):
        here = _room(_module(p))
        if here == "__version__":  # the package's own __init__
            continue
        if here not in floor:
            unplaced.add(here)
            continue
        for dep in _imports(p):
            there = _room(dep)
            if there != here and there in floor and floor[there] >= floor[here]:
                upward.append(f"{_module(p)} imports {dep}")
            elif there not in floor:
                unplaced.add(there)
    assert not unplaced, f"place these rooms in FLOORS: {sorted(unplaced)}"
    assert not upward, upward
