"""The package's import layering: no cycles between its parts, and rewards never need a backend."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "pro_grpo_lightning"


def imports_by_part() -> dict[str, set[str]]:
    """{part: parts it imports}, a part being a top-level module or subpackage of the package
    (``backends``, ``rewards``, ``module``...); every import counts, also those inside functions."""
    edges: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("").parts
        part = rel[0]
        package = list(rel[:-1])  # the package a relative import starts from
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[:len(package) - node.level + 1]
                target = base + (node.module.split(".") if node.module else [])
                names = [target + [a.name] for a in node.names] if not target else [target]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pro_grpo_lightning."):
                names = [node.module.split(".")[1:]]
            elif isinstance(node, ast.Import):
                names = [a.name.split(".")[1:] for a in node.names if a.name.startswith("pro_grpo_lightning.")]
            else:
                continue
            for target in names:
                if target and target[0] != part:
                    edges.setdefault(part, set()).add(target[0])
    return edges


def test_no_import_cycle_between_parts_and_rewards_need_no_backend():
    edges = imports_by_part()
    assert "backends" not in edges.get("rewards", set()), edges.get("rewards")
    assert edges.get("steps", set()) == set()  # the pure step math imports nothing of the package
    assert edges["rewards"] == {"loading"} and edges["backends"] == {"loading", "steps"}

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in edges.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = sorted(part for part in edges if part in reachable(part))
    assert cycles == [], {p: sorted(edges[p]) for p in cycles}
