"""The README's "Layout" names every module and subpackage of the package (none left out as they are added)."""

from __future__ import annotations

import re

from tests.cli_runs import ROOT


def test_readme_layout_names_every_module_of_the_package():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = readme[readme.index("\n## Layout"):]
    layout = layout[:layout.index("\n## ", 1)] if "\n## " in layout[1:] else layout
    named = set(re.findall(r"`([\w/.]+)`", layout))
    package = ROOT / "pro_grpo_lightning"
    entries = {p.name + ("/" if p.is_dir() else "") for p in package.iterdir()
               if not p.name.startswith((".", "__pycache__")) and (p.is_dir() or p.suffix == ".py")}
    entries.discard("__init__.py")  # the package itself
    missing = sorted(e for e in entries if e.rstrip("/") not in named and not any(n.startswith(e) for n in named))
    assert not missing, f"README 'Layout' does not name: {missing}"
    plan = {f"{p.name}" for p in (package / "plan").glob("*.py")}
    assert not sorted(plan - named), sorted(plan - named)
