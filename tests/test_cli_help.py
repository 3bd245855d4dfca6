"""The command line is consistent: help shows real defaults only, every command takes --out, the
older spellings still work."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from mllm_pib.cli import build_parser, main
from test_outputs import refusal, snapshot


def parsers(parser: argparse.ArgumentParser, name: str = "mllm-pib"):
    """Every parser of the command tree, with its command line."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, child in action.choices.items():
                yield from parsers(child, f"{name} {sub}")


ALL = list(parsers(build_parser()))


def one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text)


@pytest.mark.parametrize("name, parser", ALL, ids=[name for name, _ in ALL])
def test_help_shows_each_meaningful_default_and_no_empty_one(name, parser):
    text = one_line(parser.format_help())
    for empty in ("(default: None)", "(default: False)", "(default: [])", "(default: ==SUPPRESS==)"):
        assert empty not in text
    for action in parser._actions:
        if not action.option_strings or action.default in (None, False, [], argparse.SUPPRESS):
            continue
        own = one_line(action.help or "")
        if "default" in own:  # the help says it in its own words, e.g. "(default: the config's ...)"
            continue
        assert f"{own} (default: {action.default})" in text, (name, action.dest)


def test_train_help_has_no_none_defaults_and_eval_pope_shows_its_style():
    helps = dict(ALL)
    train = one_line(helps["mllm-pib train"].format_help())
    assert "default: None" not in train
    assert "--out DIR, --output-dir DIR" in train
    assert "the earlier output of this command" in train  # --resume and --overwrite
    assert "(default: hadpo)" in one_line(helps["mllm-pib eval pope"].format_help())
    assert "(default: float16)" in one_line(helps["mllm-pib cache"].format_help())


@pytest.mark.parametrize("name", ["train", "cache", "sweep", "export", "tiny-model", "demo"])
def test_every_command_that_writes_a_folder_takes_out_and_overwrite(name):
    actions = {option for action in dict(ALL)[f"mllm-pib {name}"]._actions for option in action.option_strings}
    assert {"--out", "--overwrite"} <= actions


def test_train_takes_out_and_output_dir():
    for spelling in ("--out", "--output-dir"):
        args = build_parser().parse_args(["train", "--config", "c.yaml", spelling, "runs/x"])
        assert args.output_dir == "runs/x"


def test_tiny_model_and_export_take_out_and_the_older_trailing_folder(tmp_path, llava, pib, capsys):
    spellings = {"option": ["--out", str(tmp_path / "a")], "trailing": [str(tmp_path / "b")]}
    for argv in spellings.values():
        assert main(["tiny-model", "--backbone", "llava", "--seed", "2", *argv]) == 0
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b")
    for spelling, argv in spellings.items():
        out = Path(argv[-1].replace(str(tmp_path), str(tmp_path / "export")))
        assert main(["export", "--pib", pib, "--base", llava, *argv[:-1], str(out)]) == 0
        assert (out / "pib" / "model.safetensors").is_file() and (out / "config.json").is_file(), spelling
    error = refusal(capsys, "tiny-model", "--backbone", "llava", "--out", str(tmp_path / "c"), str(tmp_path / "d"))
    assert "the output folder is given twice, differently" in error
    assert "give the output folder: --out DIR" in refusal(capsys, "export", "--pib", pib, "--base", llava)
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()
