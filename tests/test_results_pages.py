"""The results pages quote what `stage=report` makes from the committed copies of their runs' outputs, so a
number on the page comes out again on a fresh clone (no model, no data: the copies hold the predictions)."""

from __future__ import annotations

import sys

import pytest

from conftest import REPO
from neft_lab.config import compose
from neft_lab.pipeline import run

PAGES = [("table_small_cpu", "results_wmt_zhen_gemma.md"), ("table_ifeval_cpu", "results_ifeval_gemma.md")]


@pytest.mark.parametrize(("runs", "page"), PAGES, ids=[page for _, page in PAGES])
def test_a_results_page_quotes_the_report_of_its_committed_runs(tmp_path, runs, page):
    final = REPO / "benchmarks" / "results" / runs / "final"
    if not final.is_dir():
        pytest.skip(
            f"no committed runs under {final.relative_to(REPO)} yet (the page says the table has not run)"
        )
    # an interim page (the baseline's runs not finished yet) has the method rows only
    baseline = ["report.baseline=NeFT 9%"] if any(final.glob("neft9/*/metrics.json")) else []
    run(compose(["stage=report", f"report.dir={final}", f"report.out={tmp_path}", *baseline]))
    table = (tmp_path / "table.md").read_text()
    text = (REPO / "docs" / page).read_text()
    main, paired = table.split("Paired bootstrap", 1) if baseline else (table, "")
    method_rows = [
        line for line in main.splitlines() if line.startswith("| ") and not line.startswith("| method")
    ]
    assert method_rows
    for (
        row
    ) in method_rows:  # the page keeps the columns up to "trainable %" (method, lr, scores, trainable %)
        cells = row.split(" | ")
        kept = " | ".join(cells[:-4]) + " |"  # less step s, wall min, peak memory and runs
        assert kept in text, f"{page} lacks the report's row {kept!r}"
    for row in (
        line for line in paired.splitlines() if line.startswith("| ") and not line.startswith("| method")
    ):
        assert row in text, f"{page} lacks the report's paired-test row {row!r}"


@pytest.mark.parametrize(("runs", "page"), PAGES, ids=[page for _, page in PAGES])
def test_a_results_page_quotes_the_cost_and_neuron_set_tables_of_its_committed_runs(runs, page):
    table_dir = REPO / "benchmarks" / "results" / runs
    if not (table_dir / "final").is_dir():
        pytest.skip(f"no committed final runs under {table_dir.relative_to(REPO)} yet")
    sys.path.insert(0, str(REPO / "benchmarks"))
    import neuron_set_kinds
    import table_cost

    text = (REPO / "docs" / page).read_text()
    for line in table_cost.cost_table(table_dir).splitlines():
        assert line in text, f"{page} lacks benchmarks/table_cost.py's line {line!r}"
    if list((table_dir / "final").glob("*/*/neuron_set.json")):
        for line in neuron_set_kinds.kinds_table(table_dir / "final").splitlines():
            assert line in text, f"{page} lacks benchmarks/neuron_set_kinds.py's line {line!r}"
