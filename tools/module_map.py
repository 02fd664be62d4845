"""Print the package's module map (lines per file, per room) and its longest functions.

    python tools/module_map.py [SRC_DIR] [--top N]

Used for the architecture issue's before/after comparison: run it on two checkouts and compare.
"""

from __future__ import annotations

import argparse
import ast
from collections import defaultdict
from pathlib import Path


def functions(path: Path) -> list[tuple[int, str]]:
    """(length in lines, qualified name) of every function and method in one file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: list[tuple[int, str]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append((child.end_lineno - child.lineno + 1, f"{prefix}{child.name}"))
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")

    visit(tree, "")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", nargs="?", default=str(Path(__file__).resolve().parents[1] / "src" / "dsom"))
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args()
    src = Path(args.src)
    rooms: dict[str, list[tuple[str, int]]] = defaultdict(list)
    longest: list[tuple[int, str]] = []
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src)
        room = rel.parts[0] if len(rel.parts) > 1 else "(top level)"
        lines = len(path.read_text(encoding="utf-8").splitlines())
        rooms[room].append((str(rel), lines))
        longest += [(n, f"{rel}:{name}") for n, name in functions(path)]
    total = 0
    for room, files in sorted(rooms.items()):
        size = sum(n for _, n in files)
        total += size
        print(f"{room}: {size} lines in {len(files)} files")
        for name, n in sorted(files, key=lambda x: -x[1]):
            print(f"    {n:5d}  {name}")
    print(f"total: {total} lines, {sum(len(f) for f in rooms.values())} files")
    print("longest functions (lines, file:name):")
    for n, name in sorted(longest, reverse=True)[: args.top]:
        print(f"    {n:5d}  {name}")


if __name__ == "__main__":
    main()
