"""The README's demo table comes from a demo report.json, through scripts/readme_demo_table.py."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mllm_pib import __version__
from mllm_pib.demo.config import DemoConfig
from mllm_pib.demo.report import check_readme_report, readme_table
from mllm_pib.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "readme_demo_table.py"
SPLITS = ("random", "popular", "adversarial")


def metrics(f1: dict[str, float], yes_ratio: float, chair: tuple[float, float, float]) -> dict:
    pope = {split: {"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": f1[split], "yes_ratio": yes_ratio}
            for split in SPLITS}
    return {"pope": pope, "chair": dict(zip(("chair_s", "chair_i", "recall"), chair))}


def report(config=None, threads: int = 1) -> dict:
    """A report of three seeds with hand-picked numbers."""
    seeds = [
        (metrics({"random": 0.80, "popular": 0.70, "adversarial": 0.60}, 0.70, (0.10, 0.05, 0.90)),
         metrics({"random": 0.90, "popular": 0.80, "adversarial": 0.75}, 0.55, (0.06, 0.02, 0.85))),
        (metrics({"random": 0.82, "popular": 0.72, "adversarial": 0.66}, 0.64, (0.12, 0.04, 0.92)),
         metrics({"random": 0.88, "popular": 0.84, "adversarial": 0.70}, 0.50, (0.08, 0.03, 0.90))),
        (metrics({"random": 0.84, "popular": 0.74, "adversarial": 0.63}, 0.61, (0.08, 0.06, 0.94)),
         metrics({"random": 0.86, "popular": 0.82, "adversarial": 0.72}, 0.52, (0.04, 0.01, 0.95))),
    ]
    return {
        "mllm_pib_version": __version__,
        "config": (config or DemoConfig()).model_dump(mode="json"),
        "threads": threads,
        "per_seed": [{"seed": i, "before": b, "after": a} for i, (b, a) in enumerate(seeds)],
    }


def test_each_cell_is_the_mean_with_the_seeds_range():
    table = readme_table(report())
    rows = {line.split(" | ")[0].strip("| "): line.strip("|").split(" | ")[1:] for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| |")}
    # adversarial F1: before 60, 66, 63; after 75, 70, 72; change +15, +4, +9 (percent)
    assert rows["base model"][2].strip() == "63.00 [60.00, 66.00]"
    assert rows["+ PIB"][2].strip() == "72.33 [70.00, 75.00]"
    assert rows["change"][2].strip() == "+9.33 [+4.00, +15.00]"
    # CHAIR recall: before 90, 92, 94; after 85, 90, 95
    assert rows["base model"][6].strip() == "92.00 [90.00, 94.00]"
    assert rows["change"][6].strip() == "-2.00 [-5.00, +1.00]"
    assert "`mllm-pib demo --seeds 3 --threads 1`" in table and f"mllm-pib {__version__}" in table


def test_only_the_default_demo_at_one_thread_goes_into_the_readme():
    check_readme_report(report())
    with pytest.raises(UserError, match="not of the default demo settings"):
        check_readme_report(report(config=DemoConfig.quick()))
    with pytest.raises(UserError, match="measured with 2 thread"):
        check_readme_report(report(threads=2))


def load_script(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("readme_demo_table", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{script.BEGIN}\nold table\n{script.END}\nafter\n")
    monkeypatch.setattr(script, "README", readme)
    monkeypatch.setattr(script, "KEPT_REPORT", tmp_path / "docs" / "demo-report.json")
    (tmp_path / "docs").mkdir()
    return script, readme


def test_the_script_writes_the_table_keeps_the_report_and_checks_it(tmp_path, monkeypatch, capsys):
    script, readme = load_script(tmp_path, monkeypatch)
    measured = tmp_path / "report.json"
    measured.write_text(json.dumps(report()))
    assert script.main(["--check"]) == 2  # nothing kept yet
    (tmp_path / "run.json").write_text(json.dumps({"base_model": {"cached": True}}))
    assert script.main([str(measured)]) == 2  # a cached base model may come from older code
    assert "the base model came from the cache" in capsys.readouterr().err
    assert f"{script.BEGIN}\nold table\n" in readme.read_text()
    (tmp_path / "run.json").write_text(json.dumps({"base_model": {"cached": False}}))
    assert script.main([str(measured)]) == 0
    assert readme.read_text() == f"# title\n\nbefore\n{script.BEGIN}\n{readme_table(report())}{script.END}\nafter\n"
    assert json.loads((tmp_path / "docs" / "demo-report.json").read_text()) == report()
    assert script.main(["--check"]) == 0
    readme.write_text(readme.read_text().replace("63.00", "82.99"))  # an edit by hand
    assert script.main(["--check"]) == 1
    assert "is not the one demo-report.json gives" in capsys.readouterr().err


def test_the_readme_shows_the_kept_demo_report():
    """Fails until the demo is measured: `mllm-pib demo --seeds 3` from a fresh cache, then
    `python scripts/readme_demo_table.py runs/demo/report.json`."""
    checked = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, cwd=REPO)
    assert checked.returncode == 0, checked.stderr
