"""The plugin registry, against real distributions written into a temporary site directory.

Each test distribution is what pip would leave behind: a package module plus a
``NAME-VERSION.dist-info`` with ``METADATA`` and ``entry_points.txt``; putting the directory on
the path makes ``importlib.metadata`` find it exactly like an installed plugin. Plugins that
happen to be installed in the environment are blocked through ``MLLM_PIB_DISABLE_PLUGINS`` so
the expected results do not depend on them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path
from textwrap import dedent

import pytest

from mllm_pib.errors import UserError
from mllm_pib.plugins import (
    DISABLE_ENV,
    ENTRY_POINT_GROUP,
    get_backbone,
    list_backbones,
    load_registry,
    reset_registry,
    resolve_backbone,
)

# entry points installed in the environment, blocked so that only the test plugins count
INSTALLED_ENTRY_POINTS = sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
# padded with spaces and an empty item: the variable is a loose comma-separated list
DISABLE_VALUE = " , ".join([*INSTALLED_ENTRY_POINTS, "pibtest_blocked", ""])

GOOD_PLUGIN = '''
import json

from mllm_pib import BackboneSpec, hookimpl


def load(model_path, **options):
    return ("loaded", model_path, options)


def write_tiny(out_dir, seed=0, **options):
    with open(f"{out_dir}/tiny.json", "w") as f:
        json.dump({"seed": seed, "options": options}, f)


@hookimpl
def mllm_pib_register_backbones():
    return [
        BackboneSpec(name="pibtest-beta", description="Beta test backbone", load=load),
        BackboneSpec(
            name="pibtest-alpha",
            description="Alpha test backbone",
            load=load,
            options={"feature": "which vision features the block reads", "layer": "decoder layer"},
            write_tiny=write_tiny,
            model_types=("pibtest_alpha", "pibtest_alpha_v2"),
            tiny_options={"corpus": "tokenizer texts"},
        ),
    ]
'''

BROKEN_IMPORT_PLUGIN = '''
import pibtest_missing_dependency
'''

RAISING_HOOK_PLUGIN = '''
from mllm_pib import hookimpl


@hookimpl
def mllm_pib_register_backbones():
    raise RuntimeError("hook exploded")
'''

BLOCKED_PLUGIN = '''
raise RuntimeError("a blocked plugin must never be imported")
'''

NOT_A_SPEC_PLUGIN = '''
from mllm_pib import hookimpl


@hookimpl
def mllm_pib_register_backbones():
    return [{"name": "pibtest-dict", "load": print}]
'''

BAD_MODEL_TYPES_PLUGIN = '''
from mllm_pib import BackboneSpec, hookimpl


@hookimpl
def mllm_pib_register_backbones():
    return [BackboneSpec(name="pibtest-bad-types", description="one string", load=print, model_types="llava")]
'''

MISSPELT_HOOK_PLUGIN = '''
from mllm_pib import BackboneSpec, hookimpl


@hookimpl
def mllm_pib_register_backbone():
    return [BackboneSpec(name="pibtest-misspelt", description="never registered", load=print)]
'''


def claiming_plugin(*names: str) -> str:
    specs = ", ".join(
        f"BackboneSpec(name={name!r}, description='claims {name}', load=print)" for name in names
    )
    return dedent(
        f'''
        from mllm_pib import BackboneSpec, hookimpl


        @hookimpl
        def mllm_pib_register_backbones():
            return [{specs}]
        '''
    )


def write_distribution(site: Path, name: str, version: str, module: str, source: str) -> None:
    """Install distribution ``name`` with one module that is also its entry point (named alike)."""
    (site / f"{module}.py").write_text(dedent(source))
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{module} = {module}\n")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site = tmp_path_factory.mktemp("site")
    write_distribution(site, "pibtest-good", "1.0", "pibtest_good", GOOD_PLUGIN)
    write_distribution(site, "pibtest-broken", "0.1", "pibtest_broken", BROKEN_IMPORT_PLUGIN)
    write_distribution(site, "pibtest-raises", "2.3", "pibtest_raises", RAISING_HOOK_PLUGIN)
    write_distribution(site, "pibtest-blocked", "1.0", "pibtest_blocked", BLOCKED_PLUGIN)
    write_distribution(site, "pibtest-not-a-spec", "1.0", "pibtest_not_a_spec", NOT_A_SPEC_PLUGIN)
    write_distribution(site, "pibtest-misspelt", "1.0", "pibtest_misspelt", MISSPELT_HOOK_PLUGIN)
    write_distribution(site, "pibtest-bad-types", "1.0", "pibtest_bad_types", BAD_MODEL_TYPES_PLUGIN)
    both = claiming_plugin("pibtest-shared", "pibtest-only-a")
    write_distribution(site, "pibtest-dup-a", "1.0", "pibtest_dup_a", both)
    write_distribution(site, "pibtest-dup-b", "4.2", "pibtest_dup_b", claiming_plugin("pibtest-shared"))
    return site


def run_cli(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), DISABLE_ENV: DISABLE_VALUE}
    return subprocess.run(
        [sys.executable, "-m", "mllm_pib.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def registry_env(site: Path, monkeypatch: pytest.MonkeyPatch):
    """The test plugins visible to this process, with a fresh registry before and after."""
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv(DISABLE_ENV, DISABLE_VALUE)
    reset_registry()
    yield
    reset_registry()


def test_backbones_json_isolates_broken_plugins(site: Path) -> None:
    result = run_cli(site, "backbones", "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    feature_help = {"feature": "which vision features the block reads", "layer": "decoder layer"}
    assert document["backbones"] == [
        {"name": "pibtest-alpha", "distribution": "pibtest-good", "version": "1.0",
         "description": "Alpha test backbone", "options": feature_help, "tiny_options": {"corpus": "tokenizer texts"},
         "model_types": ["pibtest_alpha", "pibtest_alpha_v2"]},
        {"name": "pibtest-beta", "distribution": "pibtest-good", "version": "1.0",
         "description": "Beta test backbone", "options": {}, "tiny_options": {}, "model_types": []},
        {"name": "pibtest-only-a", "distribution": "pibtest-dup-a", "version": "1.0",
         "description": "claims pibtest-only-a", "options": {}, "tiny_options": {}, "model_types": []},
    ]
    errors = {(err["distribution"], err["entry_point"]): err["error"] for err in document["errors"]}
    assert set(errors) == {
        ("pibtest-broken", "pibtest_broken"),
        ("pibtest-raises", "pibtest_raises"),
        ("pibtest-not-a-spec", "pibtest_not_a_spec"),
        ("pibtest-misspelt", "pibtest_misspelt"),
        ("pibtest-bad-types", "pibtest_bad_types"),
        ("pibtest-dup-a", "pibtest_dup_a"),
        ("pibtest-dup-b", "pibtest_dup_b"),
    }
    assert "ModuleNotFoundError" in errors["pibtest-broken", "pibtest_broken"]
    assert "pibtest_missing_dependency" in errors["pibtest-broken", "pibtest_broken"]
    assert "RuntimeError: hook exploded" in errors["pibtest-raises", "pibtest_raises"]
    assert "item 0 is a dict" in errors["pibtest-not-a-spec", "pibtest_not_a_spec"]
    assert "mllm_pib_register_backbone'" in errors["pibtest-misspelt", "pibtest_misspelt"]
    assert "model_types 'llava', expected a tuple of names" in errors["pibtest-bad-types", "pibtest_bad_types"]
    assert "'pibtest-shared'" in errors["pibtest-dup-a", "pibtest_dup_a"]
    assert "pibtest-dup-b" in errors["pibtest-dup-a", "pibtest_dup_a"]
    assert "pibtest-dup-a" in errors["pibtest-dup-b", "pibtest_dup_b"]
    blocked = [ref for ref in document["blocked"] if ref["distribution"].startswith("pibtest")]
    assert blocked == [{"distribution": "pibtest-blocked", "entry_point": "pibtest_blocked"}]


def test_backbones_table_warns_on_stderr(site: Path) -> None:
    result = run_cli(site, "backbones")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "DISTRIBUTION", "VERSION", "DESCRIPTION"]
    alpha = next(i for i, line in enumerate(lines) if line.startswith("pibtest-alpha "))
    assert lines[alpha].split() == ["pibtest-alpha", "pibtest-good", "1.0", "Alpha", "test", "backbone"]
    assert lines[alpha + 1 : alpha + 5] == [
        "    model types: pibtest_alpha, pibtest_alpha_v2",
        "    feature: which vision features the block reads",
        "    layer: decoder layer",
        "    corpus (tiny models): tokenizer texts",
    ]
    # every row's columns start at the header's offsets
    for line in lines[alpha], lines[alpha + 5]:
        assert line.index("pibtest-good") == lines[0].index("DISTRIBUTION")
    broken = ("pibtest-broken", "pibtest-raises", "pibtest-not-a-spec", "pibtest-misspelt", "pibtest-bad-types",
              "pibtest-dup-b")
    for name in broken:
        assert name not in result.stdout
        assert name in result.stderr
    assert result.stderr.startswith("warning: 7 plugin problem(s)")
    prefix = "note: blocked by MLLM_PIB_DISABLE_PLUGINS: "
    note = next(line for line in result.stderr.splitlines() if line.startswith(prefix))
    assert "distribution 'pibtest-blocked' 1.0 (entry point 'pibtest_blocked')" in note


@pytest.mark.usefixtures("registry_env")
def test_get_backbone_attaches_distribution_and_checks_options(tmp_path: Path) -> None:
    alpha = get_backbone("pibtest-alpha")
    assert (alpha.name, alpha.distribution, alpha.version, alpha.entry_point) == (
        "pibtest-alpha", "pibtest-good", "1.0", "pibtest_good",
    )
    assert alpha.spec.description == "Alpha test backbone"
    assert alpha.load("ckpt", feature="clip") == ("loaded", "ckpt", {"feature": "clip"})
    with pytest.raises(UserError, match=r"no option 'colour'; its options are: feature, layer"):
        alpha.load("ckpt", colour="red")
    # a tiny-model option shapes write_tiny only: loading refuses it in one line, naming where it belongs
    with pytest.raises(UserError, match=r"'pibtest-alpha': 'corpus' only shapes a tiny model when it is written"):
        alpha.load("ckpt", corpus="a b c")
    alpha.write_tiny(str(tmp_path), seed=3, layer=2, corpus="a b c")
    assert json.loads((tmp_path / "tiny.json").read_text()) == {"seed": 3, "options": {"layer": 2, "corpus": "a b c"}}
    beta = get_backbone("pibtest-beta")
    with pytest.raises(UserError, match=r"no option 'feature'; its options are: none"):
        beta.load("ckpt", feature="clip")
    no_tiny = r"'pibtest-beta' \(distribution 'pibtest-good' 1.0 .*has no write_tiny"
    with pytest.raises(UserError, match=no_tiny):
        beta.write_tiny(str(tmp_path))
    assert [entry.name for entry in list_backbones()] == ["pibtest-alpha", "pibtest-beta", "pibtest-only-a"]


@pytest.mark.usefixtures("registry_env")
def test_unknown_backbone_suggests_close_names() -> None:
    with pytest.raises(UserError) as info:
        get_backbone("pibtest-alpah")
    message = str(info.value)
    assert "unknown backbone 'pibtest-alpah'. Did you mean 'pibtest-alpha'" in message
    assert "Available backbones: pibtest-alpha, pibtest-beta, pibtest-only-a." in message
    # the user learns that a broken plugin might have been the one they wanted
    assert "pibtest-broken" in message and "pibtest_blocked" in message


@pytest.mark.usefixtures("registry_env")
def test_duplicate_backbone_name_names_both_distributions() -> None:
    with pytest.raises(UserError) as info:
        get_backbone("pibtest-shared")
    message = str(info.value)
    assert "registered by more than one plugin" in message
    assert "distribution 'pibtest-dup-a' 1.0" in message
    assert "distribution 'pibtest-dup-b' 4.2" in message
    assert get_backbone("pibtest-only-a").distribution == "pibtest-dup-a"


@pytest.mark.usefixtures("registry_env")
def test_registry_is_cached_until_reset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = load_registry()
    assert load_registry() is first
    monkeypatch.syspath_prepend(str(tmp_path))
    write_distribution(tmp_path, "pibtest-late", "1.0", "pibtest_late", claiming_plugin("pibtest-late"))
    assert "pibtest-late" not in load_registry().backbones
    reset_registry()
    assert load_registry().get("pibtest-late").distribution == "pibtest-late"
    # plugins that loaded cleanly stay registered with pluggy; broken ones are unregistered
    manager = load_registry().plugin_manager
    registered = {name for name, plugin in manager.list_name_plugin() if plugin is not None}
    assert manager.is_blocked("pibtest_blocked")
    assert registered == {"pibtest_good", "pibtest_dup_a", "pibtest_dup_b", "pibtest_late"}


def test_help_does_not_import_torch() -> None:
    probe = dedent(
        """
        import contextlib, io, json, sys
        import mllm_pib
        mllm_pib.hookimpl  # a lazy export that needs no torch
        from mllm_pib.cli import main
        for argv in (["--help"], ["backbones", "--help"]):
            with contextlib.redirect_stdout(io.StringIO()) as out:
                try:
                    main(argv)
                except SystemExit:
                    pass
        heavy = sorted({"torch", "transformers"} & set(sys.modules))
        print(json.dumps({"heavy": heavy, "help": out.getvalue()}))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    report = json.loads(result.stdout)
    assert report["heavy"] == []
    assert "--json" in report["help"]


@pytest.mark.usefixtures("registry_env")
def test_model_type_lookup(tmp_path: Path) -> None:
    registry = load_registry()
    assert registry.for_model_type("pibtest_alpha_v2").name == "pibtest-alpha"
    with pytest.raises(UserError) as info:
        registry.for_model_type("llava", where="m/config.json")
    assert str(info.value).startswith(
        "m/config.json: model_type 'llava' is registered by no backbone (registered model types: "
        "pibtest_alpha (pibtest-alpha), pibtest_alpha_v2 (pibtest-alpha)); name the backbone with --backbone NAME"
    )
    (tmp_path / "config.json").write_text('{"model_type": "pibtest_alpha"}')
    assert resolve_backbone(str(tmp_path)) == "pibtest-alpha"
    assert resolve_backbone(str(tmp_path), "pibtest-beta") == "pibtest-beta"
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(UserError, match=r"config.json: not a JSON object"):
        resolve_backbone(str(tmp_path))
