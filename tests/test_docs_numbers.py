"""benchmarks.docs_numbers: every marked number in the docs equals what the stored results give, and
an edited number fails the check."""

import shutil

import pytest

from benchmarks import docs_numbers
from benchmarks.docs_numbers import DOCS, MARK, ROOT, main, render


def test_every_marked_number_in_the_docs_matches_the_stored_results(capsys):
    assert main(["--check"]) == 0, capsys.readouterr().out
    counts = {d: len(MARK.findall((ROOT / d).read_text())) for d in DOCS}
    assert counts["docs/evidence.md"] >= 50 and counts["README.md"] >= 4, counts


def test_an_edited_number_fails_the_check_and_the_command_restores_it(tmp_path, capsys):
    doc = tmp_path / "evidence.md"
    shutil.copy(ROOT / "docs/evidence.md", doc)
    text = doc.read_text()
    m = next(MARK.finditer(text))
    key, good = m.group(1), m.group(2)
    bad = good.replace(good[-2], "9" if good[-2] != "9" else "8", 1) if good[-2].isdigit() else good + "1"
    assert bad != good
    doc.write_text(text[:m.start(2)] + bad + text[m.end(2):])
    assert main(["--check", str(doc)]) == 1
    assert key in capsys.readouterr().out
    assert main([str(doc)]) == 0 and doc.read_text() == text  # regenerated
    with pytest.raises(KeyError, match="unknown number key"):
        render("<!--#nosuch:thing-->1<!--/-->")


def test_value_kinds_by_hand():
    # the summary line parser and the CI formatter
    assert docs_numbers.ci({"mean": 0.01, "lo": -0.02, "hi": 0.04}, 2) == "+0.01 [-0.02, +0.04]"
    assert docs_numbers.value("summary:proxy_quality/summary.txt|pruning/audit_expanded_reward_std@3") == \
        "0.132 [0.114, 0.151]"
