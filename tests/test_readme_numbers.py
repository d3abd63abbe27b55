"""Numbers that reproduce: the README's measured tables are rendered from results/, every results
file says what made it, and no measured number of the README is held by no results file."""

from __future__ import annotations

import json

import pytest

from dg_lightning.eval.readme_numbers import (
    BLOCK,
    TABLES,
    main,
    named_results_files,
    render,
    unsourced_numbers,
)
from tests.conftest import ROOT

README = ROOT / "README.md"
RESULTS = ROOT / "results"


def test_readme_tables_are_rendered_from_the_results_files():
    text = README.read_text()
    names = [m.group(2) for m in BLOCK.finditer(text)]
    assert {"demo", "bench-pacs-resnet18", "bench-pacs-methods", "identifiability"} <= set(names)
    assert render(text, RESULTS) == text, "a README table differs from its results file: run `make readme-numbers`"


def test_every_results_file_records_command_commit_and_machine():
    files = sorted(RESULTS.rglob("*.json"))
    assert len(files) >= 10
    for path in files:
        record = json.loads(path.read_text())
        missing = [k for k in ("command", "commit", "machine") if not record.get(k)]
        assert not missing, f"{path.relative_to(ROOT)} lacks {missing}"


def test_the_readme_quotes_no_number_that_no_results_file_holds():
    assert unsourced_numbers(README.read_text(), RESULTS) == []


def test_the_number_check_can_fail():
    text = README.read_text()
    section = "## Measured results\n"
    assert section in text

    def check(extra: str) -> list[str]:
        return unsourced_numbers(text.replace(section, section + extra + "\n"), RESULTS)

    assert check("Wall time 12.34 min.") == ["12.34: Wall time 12.34 min."]
    assert check("Run `python x.py --lr 12.34` first.") == []  # code: a command, not a number
    assert check("Up 9.883 points. <!-- derived: 9.883 = 62.8 - 52.917 -->") == \
        ["declaration 9.883 = 62.8 - 52.917: operand(s) ['52.917'] held by no results file",
         "9.883: Up 9.883 points."]
    assert check("Up 29.4 points. <!-- derived: 29.4 = 62.8 - 33.3 -->")[0].startswith(
        "declaration 29.4 = 62.8 - 33.3: the expression gives 29.50")
    assert check("Chance 33.3 %. <!-- constant: 33.3 = 100 / 3 -->") == []
    # outside the section, only a marked region is checked
    assert unsourced_numbers(text + "\nIt took 12.34 s.\n", RESULTS) == []
    assert unsourced_numbers(text + "\n<!-- measured -->It took 12.34 s.<!-- /measured -->\n", RESULTS) == \
        ["12.34: It took 12.34 s."]


def test_a_lodo_table_is_the_mean_and_standard_error_over_seeds(tmp_path):
    """The demo renderer on a results file written here: 0.5 and 0.7 -> 60.0 ± 10.0 (se = 0.1414 / √2)."""
    runs = [{"domain": d, "seed": s, "selection": sel, "acc": acc}
            for sel in ("training-domain validation", "oracle")
            for d, accs in (("cartoon", (0.5, 0.7)), ("sketch", (0.2, 0.2)))
            for s, acc in enumerate(accs)]
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "demo_results.json").write_text(json.dumps(
        {"command": "make demo", "commit": "abc1234", "machine": "a test", "wall_seconds": 90.0, "runs": runs}))
    out = TABLES["demo"](tmp_path)
    lines = out.splitlines()
    assert lines[0] == "| Selection | cartoon | sketch | Avg |"
    # Avg per seed: (0.5 + 0.2) / 2 = 0.35, (0.7 + 0.2) / 2 = 0.45 -> 40.0 ± 5.0
    assert lines[2] == "| training-domain validation | 60.0 ± 10.0 | 20.0 ± 0.0 | 40.0 ± 5.0 |"
    assert lines[-1] == "Wall time 1.5 min on a test, commit `abc1234` (`results/cpu/demo_results.json`)."


def test_make_readme_numbers_rewrites_a_stale_block_and_check_says_so(tmp_path, capsys):
    readme = tmp_path / "README.md"
    good = render(README.read_text(), RESULTS)
    readme.write_text(good.replace("| 33.3 ± 1.5 |", "| 99.9 ± 1.5 |", 1))
    assert main(["--readme", str(readme), "--results", str(RESULTS), "--check"]) == 1
    assert "bench-pacs-resnet18" in capsys.readouterr().out
    assert main(["--readme", str(readme), "--results", str(RESULTS)]) == 0
    assert readme.read_text() == good
    assert main(["--readme", str(readme), "--results", str(RESULTS), "--check"]) == 0


def test_an_unknown_block_name_is_an_error():
    with pytest.raises(KeyError, match="results:nope has no renderer"):
        render("<!-- results:nope -->\n<!-- /results -->\n", RESULTS)


def test_results_paths_in_the_readme_exist():
    """Every ``results/...`` file the README names is there (a renamed file breaks the link), except
    in a pending region (a run not made yet)."""
    names = named_results_files(README.read_text())
    assert "results/cpu/bench_seg.md" in names and "results/cpu/identifiability_old_loss.json" in names
    for name in names:
        assert (ROOT / name).exists(), name


def test_a_pending_region_names_files_to_come_but_may_hold_no_number():
    """A pending table (cells ``pending``/``TODO``) may name a results file that does not exist yet;
    a number typed into it is unsourced, inside the Measured results section or not."""
    table = ("<!-- pending -->\nfrom `results/cpu/bench_new.{json,md}`:\n\n| method | img/s |\n|---|---:|\n"
             "| ERM | CELL |\n<!-- /pending -->\n")
    assert named_results_files(table.replace("CELL", "pending")) == []
    assert named_results_files(table.replace("<!-- pending -->", "").replace("CELL", "pending")) == \
        ["results/cpu/bench_new.json", "results/cpu/bench_new.md"]
    text = README.read_text()
    assert unsourced_numbers(text + "\n## Usage\n" + table.replace("CELL", "pending"), RESULTS) == []
    assert unsourced_numbers(text + "\n## Usage\n" + table.replace("CELL", "12.34"), RESULTS) == ["12.34: | ERM | 12.34 |"]
    section = "## Measured results\n"
    assert unsourced_numbers(text.replace(section, section + table.replace("CELL", "12.34")), RESULTS) == \
        ["12.34: | ERM | 12.34 |"]
