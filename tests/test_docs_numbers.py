"""benchmarks.docs_numbers: every marked number in the docs equals what the stored results give, and
an edited number fails the check."""

import shutil

import pytest

from benchmarks import docs_numbers
from benchmarks.docs_numbers import DOCS, MARK, ROOT, SCANNED, main, render, unmarked


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


def test_no_result_number_in_the_docs_is_left_unmarked():
    """Every decimal, percentage, ratio, size, time or interval in README.md, docs/evidence.md and
    docs/benchmarks.md is marked (so regenerated from docs/results), in code, or a setting the short
    ``SETTINGS`` list names; the failure lists file:line."""
    left = [f"{d}:{line}: {tok}" for d in SCANNED for line, tok in unmarked((ROOT / d).read_text())]
    assert not left, "result numbers without a marker (mark them: benchmarks/docs_numbers.py):\n" + "\n".join(left)


def test_the_scan_finds_a_planted_number_and_passes_what_is_not_a_result():
    text = "\n".join([
        "# Results",                                                    # 1
        "Pro-GRPO is 1.37x faster and reaches 0.912 in 4.2 s.",         # 2: three results
        "It saves 12.5 GiB (31 %), gain +0.004 [-0.001, +0.009].",      # 3: size, percentage, interval
        "The interval starts at 66 [60, 70] rollouts.",                 # 4: an integer before an interval
        "Marked: <!--#json:x-->0.5<!--/--> and `0.25` in code, guidance 4.5, lr 1e-3, 80 % power.",  # 5
        "```bash", "python -m x --bound 0.05 --budget-s 3.5", "```",   # 6-8: a code block
        "A 24 GB card, T = 10 steps, 360 s budget, arXiv 2512.15347.",  # 9: settings
        "The log-ratio was -2.7e-4 at step 8.",                         # 10: an exponent
    ])
    found = unmarked(text)
    assert found == [(2, "1.37x"), (2, "0.912"), (2, "4.2 s"), (3, "12.5 GiB"), (3, "31 %"), (3, "+0.004"),
                     (3, "-0.001"), (3, "+0.009"), (4, "66"), (10, "-2.7e-4")], found
    # planted in a real doc: found, with its line, and nothing else changes
    text = (ROOT / "docs/benchmarks.md").read_text()
    lines = text.splitlines()
    lines.insert(3, "The tiny decoder saves 3.9x the time.")
    before = [(i + (i > 3), tok) for i, tok in unmarked(text)]
    assert sorted(unmarked("\n".join(lines))) == sorted(before + [(4, "3.9x")])


def test_stored_table_kinds_by_hand(tmp_path, monkeypatch):
    """mdtable / mdcell / mdcol / json / txt on a small results folder written here."""
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "t.md").write_text(
        "`cmd`\n\n| arm | x | y |\n|---|---|---|\n| a | 0.5 (0.4-0.6) | +1.25 [+1.0, +1.5] |\n| b | 12.5% | -0.75 |\n"
        "\n| k | v |\n|---|---|\n| c | 3 |\n")
    (tmp_path / "b" / "u.md").write_text("| arm | x | y |\n|---|---|---|\n| d | 7 | 8 |\n")
    (tmp_path / "b" / "r.json").write_text('{"flops": [2.5e12, 1e9]}')
    (tmp_path / "b" / "o.txt").write_text("| a | row | 1.5 | 2.25\n")
    monkeypatch.setattr(docs_numbers, "RESULTS", tmp_path)
    docs_numbers._md_table.cache_clear()
    docs_numbers._json.cache_clear()
    v = docs_numbers.value
    try:
        assert v("mdtable:b/t.md|0,2|1") == "\n| arm | y |\n|---|---|\n| b | -0.75 |\n\n"
        assert v("mdtable:b/t.md#2") == "\n| k | v |\n|---|---|\n| c | 3 |\n\n"
        assert v("mdtable:b/t.md+b/u.md||0,2").splitlines()[3:5] == ["| a | 0.5 (0.4-0.6) | +1.25 [+1.0, +1.5] |",
                                                                    "| d | 7 | 8 |"]
        assert v("mdcell:b/t.md|b|1") == "12.5%" and v("mdcell:b/t.md|0|1|2") == "0.6"  # "0.4-0.6": no minus
        assert v("mdcell:b/t.md|a|2|0@1") == "+1.2" and v("mdcell:b/t.md|a|2|1@.2f") == "1.00"
        assert v("mdcol:b/t.md|2|min") == "-0.75" and v("mdcol:b/t.md|2|max|0") == "+1.25"
        assert v("json:b/r.json|flops|0@.1f/1e12") == "2.5" and v("json:b/r.json|flops|1@.0e") == "1e+09"
        assert v("txt:b/o.txt|| a | row ||1") == "2.25"
    finally:
        docs_numbers._md_table.cache_clear()
        docs_numbers._json.cache_clear()
