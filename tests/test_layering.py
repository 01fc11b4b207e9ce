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
    # where networks come from (networks.py: pretrained, random or empty) is shared by both
    seam = {"loading", "networks", "offline_tokenizers"}
    # ... and errors.py, the package's error classes, which imports nothing (a reward's RewardError)
    assert edges["rewards"] == seam | {"errors"}
    assert edges["backends"] == seam | {"steps", "architectures", "compiling"}
    assert edges.get("compiling", set()) == set()  # the compiled-denoiser wrapper is torch only
    assert edges.get("errors", set()) == set()
    assert edges["networks"] == {"loading", "architectures", "offline_tokenizers"}

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


# ---- no code reaches into objects it did not create ---------------------------------------------------
PACKAGE_AND_BENCHMARKS = [*sorted(ROOT.rglob("*.py")), *sorted((ROOT.parent / "benchmarks").rglob("*.py"))]

#: Framework objects whose public, documented attributes are the way to drive them (each with why).
#: Everything else a module did not create, it changes through methods, never by assignment.
ALLOWED_WRITES = {
    ("pro_grpo_lightning/module.py", "self.trainer.should_stop"): "Lightning's documented way to stop fit",
    ("benchmarks/learning_runs.py", "trainer.should_stop"): "Lightning's documented way to stop fit",
    ("pro_grpo_lightning/checkpointing.py", "strategy.checkpoint_io"): "Lightning's public Strategy setter",
    ("pro_grpo_lightning/cli.py", "cb.dirpath"): "ModelCheckpoint's public dirpath, before any save",
    ("pro_grpo_lightning/cli.py", "trainer.callbacks"): "Lightning's callback list: its default bar replaced",
    ("pro_grpo_lightning/logs.py", "bar.total"): "tqdm's documented counters of Lightning's bar",
    ("pro_grpo_lightning/logs.py", "bar.initial"): "tqdm's documented counters of Lightning's bar",
    ("pro_grpo_lightning/logs.py", "bar.n"): "tqdm's documented counters of Lightning's bar",
}


def _created_names(scope: ast.AST) -> set[str]:
    """Names a function (or module) binds to something it makes itself: a call's result, a literal,
    a comprehension, or ``with make() as name``. Parameters and loop variables are not among them."""
    made = (ast.Call, ast.Dict, ast.List, ast.Set, ast.Tuple, ast.Constant, ast.ListComp, ast.DictComp,
            ast.SetComp, ast.GeneratorExp, ast.JoinedStr)
    names: set[str] = set()
    body = scope.body if isinstance(scope, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef)) else []
    for node in (n for stmt in body for n in ast.walk(stmt)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and node is not scope:
            continue
        if isinstance(node, ast.Assign) and isinstance(node.value, made):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.value, made) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.withitem) and isinstance(node.context_expr, ast.Call) \
                and isinstance(node.optional_vars, ast.Name):
            names.add(node.optional_vars.id)
    return names


def _owner(target: ast.expr) -> ast.expr | None:
    """The object whose attribute an assignment target writes (``a.b[i].c = ...`` -> ``a.b[i]``)."""
    while isinstance(target, ast.Subscript):
        target = target.value
    return target.value if isinstance(target, ast.Attribute) else None


def _is_self(node: ast.expr) -> bool:
    if isinstance(node, ast.Name):
        return node.id in ("self", "cls")
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"


def reaching_in(source: str, path: str) -> list[str]:
    """Every place in ``source`` that assigns (or deletes) an attribute of an object the code did
    not create (not ``self``, not a name it bound to a new object), sets one with ``setattr``, or
    calls an underscore method of another object, as ``path:line: code``."""
    tree = ast.parse(source)
    found: list[str] = []
    scopes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))]
    for scope in scopes:
        created = _created_names(scope)
        nodes = [n for stmt in scope.body for n in ast.walk(stmt)]
        inner = {id(n) for f in nodes if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and f is not scope
                 for n in ast.walk(f) if n is not f}
        for node in (n for n in nodes if id(n) not in inner):
            targets: list[ast.expr] = []
            if isinstance(node, ast.Assign):
                targets = [t for tt in node.targets for t in (tt.elts if isinstance(tt, ast.Tuple) else [tt])]
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                targets = [node.target]
            elif isinstance(node, ast.Delete):
                targets = node.targets
            for t in targets:
                owner = _owner(t)
                if owner is None or _is_self(owner) or (isinstance(owner, ast.Name) and owner.id in created):
                    continue
                text = ast.unparse(t if not isinstance(t, ast.Subscript) else _strip(t))
                if (path, text) not in ALLOWED_WRITES:
                    found.append(f"{path}:{node.lineno}: writes {text}")
            if isinstance(node, ast.Call):
                f = node.func
                if isinstance(f, ast.Name) and f.id in ("setattr", "delattr") and node.args \
                        and not _is_self(node.args[0]):
                    found.append(f"{path}:{node.lineno}: {f.id}({ast.unparse(node.args[0])}, ...)")
                if isinstance(f, ast.Attribute) and f.attr.startswith("_") and not f.attr.startswith("__") \
                        and not _is_self(f.value):
                    found.append(f"{path}:{node.lineno}: calls {ast.unparse(f)}")
    return sorted(set(found))


def _strip(target: ast.expr) -> ast.expr:
    while isinstance(target, ast.Subscript):
        target = target.value
    return target


def test_no_module_reaches_into_objects_it_did_not_create():
    """The package and the benchmarks change other objects only through their public methods: no
    replaced methods (``backend.load_components = ...``), no private state written, no underscore
    method of another object called. A seam that is missing is made public instead."""
    root = ROOT.parent
    found = [hit for path in PACKAGE_AND_BENCHMARKS
             for hit in reaching_in(path.read_text(), path.relative_to(root).as_posix())]
    assert found == [], "\n".join(found)


def test_the_reach_in_check_fails_on_planted_examples():
    planted = '''
def plan(backend, reward, net):
    backend.load_components = lambda: {}          # a replaced method
    reward._load()                                # another object's private method
    net._modules["blocks"] = None                 # private state, through a subscript
    setattr(backend, "attach_lora", print)
    del backend.attach_lora
    backend.decode_chunk += 1


class Fine:
    def __init__(self):
        self.x = 1                                # its own state
        box = Box()
        box.value = 2                             # an object it made
        self._helper()
        super()._helper()
'''
    hits = reaching_in(planted, "planted.py")
    assert [h.split(": ", 1)[1] for h in hits] == [
        "writes backend.load_components", "calls reward._load", "writes net._modules",
        "setattr(backend, ...)", "writes backend.attach_lora", "writes backend.decode_chunk"], hits


def test_readme_layout_names_every_module():
    """The README's layout gives every module and subpackage of the package its job."""
    layout = (ROOT.parent / "README.md").read_text(encoding="utf-8").split("## Layout", 1)[1]
    names = [f"{p.name}/" if p.is_dir() else p.name for p in sorted(ROOT.iterdir())
             if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and not p.name.startswith("__"))]
    missing = [n for n in names if f"`{n}" not in layout]
    assert missing == [], missing
