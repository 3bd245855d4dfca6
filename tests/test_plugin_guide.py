"""The worked example of docs/plugins.md is a working plugin: its files, taken from the guide's
code blocks, are installed as a distribution (module + dist-info with the entry points of its
pyproject.toml, on PYTHONPATH), listed by `mllm-pib backbones` and pass the contract kit."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from mllm_pib.plugins import DISABLE_ENV

GUIDE = Path(__file__).parents[1] / "docs" / "plugins.md"
EXAMPLE = "## 6. Worked example"


def example_files() -> dict[str, str]:
    """``{path: text}`` of the worked example's code blocks whose first line names a file."""
    section = GUIDE.read_text(encoding="utf-8").split(EXAMPLE, 1)[1].split("\n## ", 1)[0]
    files = {}
    for block in re.findall(r"^```(?:python|toml)\n(.*?)^```", section, re.M | re.S):
        first = block.splitlines()[0]
        if re.fullmatch(r"# [\w/.-]+\.(py|toml)", first):
            files[first[2:]] = block
    return files


def install(files: dict[str, str], site: Path) -> dict:
    """Write the files and the dist-info that `pip install` would leave; returns the pyproject."""
    for path, text in files.items():
        (site / path).parent.mkdir(parents=True, exist_ok=True)
        (site / path).write_text(text)
    project = tomllib.loads(files["pyproject.toml"])["project"]
    info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    entries = "".join(f"{name} = {value}\n" for name, value in project["entry-points"]["mllm_pib"].items())
    (info / "entry_points.txt").write_text(f"[mllm_pib]\n{entries}")
    return project


def test_worked_example_registers_and_passes_the_contract_kit(tmp_path):
    files = example_files()
    assert set(files) == {"pyproject.toml", "mllm_pib_llava_layers/__init__.py", "mllm_pib_llava_layers/plugin.py",
                          "mllm_pib_llava_layers/backbone.py", "mllm_pib_llava_layers/tiny.py",
                          "tests/test_contract.py"}
    project = install(files, tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           DISABLE_ENV: ""}
    listed = subprocess.run([sys.executable, "-m", "mllm_pib.cli", "backbones", "--json"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    document = json.loads(listed.stdout)
    (entry,) = [b for b in document["backbones"] if b["name"] == "llava_layers"]
    assert entry["distribution"] == project["name"] and entry["version"] == project["version"]
    assert set(entry["options"]) == {"feature"} and entry["model_types"] == []
    assert not [err for err in document["errors"] if err["distribution"] == project["name"]]
    kit = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_contract.py"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert kit.returncode == 0, kit.stdout[-4000:]
    summary = kit.stdout.strip().splitlines()[-1]
    assert re.match(r"\d+ passed in ", summary), summary  # none skipped: the native forward is compared too
