"""The GPU suite's machinery on the CPU, in seconds: per-item time limits, JSON written after every item
(into the results folder and $OUT), CPU files labelled as trials, the test report, the Markdown tables,
and the shell wrapper's install step. The GPU items themselves: `DEVICE=cpu TINY=1 bash benchmarks/gpu_suite.sh`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_suite  # noqa: E402
import gpu_tables  # noqa: E402


def fake_item(name: str, code: str, limit: float | None, results: Path) -> gpu_suite.Item:
    """An item running `code` in a fresh interpreter; it may write its JSON to the path in argv[1]."""
    out = results / f"{name}.json"
    return gpu_suite.Item(name, f"fake {name}", [sys.executable, "-c", code, str(out)], limit, result=out)


def run_suite(monkeypatch, tmp_path: Path, items: list[gpu_suite.Item], *args: str) -> tuple[int, dict]:
    monkeypatch.setattr(gpu_suite, "plan", lambda _args: items)
    results, out = tmp_path / "results", tmp_path / "out"
    argv = ["--device", "cpu", "--tiny", "--results", str(results), "--out", str(out), *args]
    code = gpu_suite.main(argv)
    return code, json.loads((results / "gpu_suite-cpu-trial.json").read_text())


def test_a_slow_item_is_stopped_at_its_limit_and_the_next_still_runs(monkeypatch, tmp_path):
    results = tmp_path / "results"
    slow = fake_item("step", "import time; print('started', flush=True); time.sleep(60)", 1.0, results)
    quick = fake_item(
        "table",
        "import json, sys; json.dump({'value': 42}, open(sys.argv[1], 'w')); print('wrote')",
        None,  # what the budget has left
        results,
    )
    started = time.perf_counter()
    code, suite = run_suite(monkeypatch, tmp_path, [slow, quick])
    assert time.perf_counter() - started < 20
    assert code == 1  # not every item is ok
    first, second = suite["items"]
    assert (first["status"], second["status"]) == ("timeout", "ok")
    assert first["seconds"] < 10 and "started" in first["output_tail"]
    assert second["result"] == {"value": 42} and "wrote" in second["output_tail"]
    # a CPU run is a trial, says so, and its files are named so
    assert suite["trial"] is True and "not a GPU measurement" in suite["note"]
    out = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"gpu_suite-cpu-trial.json", "step-cpu-trial.log", "table-cpu-trial.log", "table.json"} <= out
    assert len(out) <= 8  # what the GPU tool brings back


def test_the_process_group_is_killed(monkeypatch, tmp_path):
    """An item's children die with it: a leftover process would hold the GPU for the next item."""
    pid_file = tmp_path / "child.pid"
    code = (
        "import subprocess, sys, time; "
        f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(60)"
    )
    run_suite(monkeypatch, tmp_path, [fake_item("step", code, 1.5, tmp_path / "results")])
    pid = int(pid_file.read_text())
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    pytest.fail(f"child {pid} of a timed-out item is still running")


def test_a_spent_budget_skips_the_rest_and_says_why(monkeypatch, tmp_path):
    results = tmp_path / "results"
    items = [
        fake_item("step", "import time; time.sleep(30)", None, results),  # stopped when the budget is spent
        fake_item("table", "pass", None, results),
    ]
    monkeypatch.setattr(gpu_suite, "MIN_ITEM_S", 0.5)
    _, suite = run_suite(monkeypatch, tmp_path, items, "--budget-s", "2")
    assert [i["status"] for i in suite["items"]] == ["timeout", "skipped"]
    assert "budget" in suite["items"][1]["reason"]


def test_plan_shrinks_for_the_dry_run_and_checks_what_the_table_needs(tmp_path):
    tiny = gpu_suite.parse(["--device", "cpu", "--tiny", "--data", str(tmp_path), "--results", str(tmp_path)])
    items = {i.name: i for i in gpu_suite.plan(tiny)}
    assert items["tests"].command[items["tests"].command.index("-m", 2) + 1] == "not gpu"
    assert "--width-div" in items["step"].command and items["step"].result.name.endswith("-cpu-trial.json")
    assert "tiny" in items["table"].command and "no WMT data" in items["table"].skip
    assert items["quant"].command[-3:] == [
        "cpu",
        "--out",
        str(tmp_path / "quantized_base-tiny-cpu-trial.json"),
    ]

    cuda = gpu_suite.parse(["--device", "cuda", "--data", str(tmp_path), "--results", str(tmp_path)])
    items = {i.name: i for i in gpu_suite.plan(cuda)}
    assert "gpu" in items["tests"].command and items["tests"].result.name == "gpu_tests-cuda.json"
    assert "--width-div" not in items["step"].command and "gemma3_270m" in items["table"].command
    assert "cuda" in items["quant"].command and "gemma3_270m" in items["quant"].command
    assert items["table"].limit_s is None  # the table gets what the budget has left
    with pytest.raises(SystemExit):
        gpu_suite.parse(["--device", "cuda", "--tiny"])


def test_junit_summary_and_tables(tmp_path):
    junit = tmp_path / "j.xml"
    junit.write_text(
        '<testsuites><testsuite name="pytest" time="1.5">'
        '<testcase name="test_a[cuda]" time="0.1"/>'
        '<testcase name="test_b[cuda]" time="0.2"><failure message="update differs by 1e-2"/></testcase>'
        '<testcase name="test_c[cpu]"><skipped message="needs a CUDA GPU"/></testcase>'
        "</testsuite></testsuites>"
    )
    summary = gpu_suite.junit_summary(junit)
    assert summary["counts"] == {"passed": 1, "failed": 1, "error": 0, "skipped": 1}
    assert gpu_suite.junit_summary(tmp_path / "missing.xml")["error"]

    suite = {
        "device": "cpu",
        "trial": True,
        "note": "CPU dry run with tiny shapes: checks the suite's machinery, not a GPU measurement",
        "device_name": "x86_64",
        "torch": "2.x",
        "date_utc": "today",
        "command": "gpu_suite.py",
        "items": [
            {
                "item": "tests",
                "title": "tests",
                "status": "ok",
                "seconds": 2,
                "limit_s": 60,
                "result": summary,
            }
        ],
    }
    text = gpu_tables.render(suite)
    assert text.startswith("> **CPU dry run") and "1 passed, 1 failed" in text and "test_b[cuda]" in text


def test_shell_install_step_and_usage(tmp_path):
    env = {
        **os.environ,
        "WHEELS": str(tmp_path / "no_wheels"),
        "SITE": str(tmp_path / "site"),
        "STATE": str(tmp_path / "state"),
    }
    script = str(REPO / "benchmarks" / "gpu_suite.sh")
    done = subprocess.run(["bash", script, "install"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "no wheels carried" in done.stdout and "parts present" in done.stdout
    wrong = subprocess.run(["bash", script, "bogus"], env=env, capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and "usage" in wrong.stderr
