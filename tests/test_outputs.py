"""Output folders: no command deletes or overwrites what it did not write (train, cache, sweep,
export, tiny-model, demo); --resume continues, --overwrite replaces what the command wrote."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mllm_pib.cli import main
from mllm_pib.errors import UserError
from mllm_pib.outputs import MARKER, OutputKind, claim
from test_hardening import cli_error
from test_training import write_config

KIND = OutputKind(command="thing", what="thing", writes=("result.json", "shard-*"), done="result.json", resumable=True)
OTHER = OutputKind(command="other", what="other thing", writes=("x",), done="x")


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refusal(capsys, *argv: str) -> str:
    """The one-line error of a command that must refuse."""
    error = cli_error(capsys, *argv)
    assert "\n" not in error
    return error


@pytest.fixture
def notes(tmp_path) -> Path:
    """A folder no command wrote: a user's notes."""
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "notes.txt").write_text("my results, do not lose")
    return folder


@pytest.fixture
def checkpoint_copy(tmp_path, pib) -> Path:
    return Path(shutil.copytree(pib, tmp_path / "pib-copy"))


@pytest.fixture(scope="module")
def config(tmp_path_factory, llava, hadpo_dir) -> Path:
    """A training config on the 26 yes/no pairs alone (the commands' output is what matters)."""
    pope = {"format": "pope", "path": str(hadpo_dir / "hadpo/pope_data.json"), "images": str(hadpo_dir / "VG")}
    return write_config(tmp_path_factory.mktemp("outputs"), "llava", llava, hadpo_dir, data=[pope])


# ---------------------------------------------------------------------------- the mechanism


@pytest.mark.parametrize("flags", [{}, {"resume": True}, {"overwrite": True}])
def test_a_folder_no_command_wrote_is_refused_whatever_the_flags(notes, flags):
    with pytest.raises(UserError, match=r"notes: the folder is not empty and was not written by `mllm-pib thing`"):
        claim(notes, KIND, **flags)
    assert snapshot(notes) == {"notes.txt": b"my results, do not lose"}


def test_another_commands_output_is_refused_even_with_overwrite(tmp_path):
    claim(tmp_path / "out", OTHER).prepare()
    (tmp_path / "out" / "x").write_text("1")
    with pytest.raises(UserError, match=r"holds the output of `mllm-pib other`, not of `mllm-pib thing`"):
        claim(tmp_path / "out", KIND, overwrite=True)
    assert (tmp_path / "out" / "x").read_text() == "1"


def test_an_earlier_output_needs_resume_or_overwrite_and_overwrite_deletes_only_what_it_wrote(tmp_path):
    out = claim(tmp_path / "out", KIND).prepare()
    for name in ("result.json", "shard-1", "notes.txt"):  # the last one added by the user
        (out / name).write_text(name)
    with pytest.raises(UserError, match=r"holds a finished thing of an earlier `mllm-pib thing`; give --resume"):
        claim(out, KIND)
    resumed = claim(out, KIND, resume=True)
    assert resumed.mode == "resume" and resumed.prepare() == out and len(snapshot(out)) == 4
    claim(out, KIND, overwrite=True).prepare()
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "notes.txt"]
    assert json.loads((out / MARKER).read_text())["written_by"] == "mllm-pib thing"


def test_a_folder_holding_only_the_marker_is_new_and_resume_needs_something(tmp_path):
    claim(tmp_path / "out", KIND).prepare()
    assert claim(tmp_path / "out", KIND).mode == "new"
    with pytest.raises(UserError, match="no earlier `mllm-pib thing` output to resume"):
        claim(tmp_path / "out", KIND, resume=True)
    with pytest.raises(UserError, match="either --resume or --overwrite"):
        claim(tmp_path / "new", KIND, resume=True, overwrite=True)


def test_a_staged_output_appears_whole_or_not_at_all(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), claim(out, KIND).staged() as staging:
        (staging / "result.json").write_text("half")
        raise RuntimeError("crash while writing")
    assert list(tmp_path.iterdir()) == []  # neither the output nor the staging folder
    with claim(out, KIND).staged() as staging:
        (staging / "shard-1").write_text("a")
        (staging / "shard-2").write_text("b")
        (staging / "result.json").write_text("first")
    (out / "notes.txt").write_text("user")
    assert json.loads((out / MARKER).read_text())["writes"] == ["result.json", "shard-1", "shard-2"]
    with claim(out, KIND, overwrite=True).staged() as staging:
        (staging / "shard-1").write_text("c")
        (staging / "result.json").write_text("second")
    assert snapshot(out) == {MARKER: (out / MARKER).read_bytes(), "notes.txt": b"user", "result.json": b"second",
                             "shard-1": b"c"}  # shard-2 of the earlier output is gone, the notes stay
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# ---------------------------------------------------------------------------- per command


@pytest.mark.parametrize("target", ["notes", "checkpoint_copy"])
def test_cache_never_deletes_a_folder_it_did_not_write(target, request, config, capsys):
    folder = request.getfixturevalue(target)
    before = snapshot(folder)
    for flags in ([], ["--overwrite"]):
        error = refusal(capsys, "cache", "--config", str(config), "--out", str(folder), *flags)
        assert f"{folder}: the folder is not empty and was not written by `mllm-pib cache`" in error
    assert snapshot(folder) == before


def test_cache_rerun_needs_overwrite_which_keeps_other_files(config, tmp_path, capsys):
    out = tmp_path / "cache"
    assert main(["cache", "--config", str(config), "--out", str(out), "--dtype", "float32"]) == 0
    (out / "notes.txt").write_text("user")
    first = snapshot(out)
    error = refusal(capsys, "cache", "--config", str(config), "--out", str(out))
    assert "holds a finished feature cache of an earlier `mllm-pib cache`; give --overwrite" in error
    assert snapshot(out) == first
    assert main(["cache", "--config", str(config), "--out", str(out), "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "user"
    assert json.loads((out / "manifest.json").read_text())["dtype"] == "float16"


def test_tiny_model_never_overwrites_a_pib_checkpoint(checkpoint_copy, capsys):
    before = snapshot(checkpoint_copy)
    for argv in (["--out", str(checkpoint_copy)], [str(checkpoint_copy)], [str(checkpoint_copy), "--overwrite"]):
        error = refusal(capsys, "tiny-model", "--backbone", "llava", *argv)
        assert "was not written by `mllm-pib tiny-model`" in error
    assert snapshot(checkpoint_copy) == before


def test_tiny_model_rerun_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert main(["tiny-model", "--backbone", "llava", "--out", str(out)]) == 0
    first = snapshot(out)
    assert "config.json" in first and "model.safetensors" in first
    error = refusal(capsys, "tiny-model", "--backbone", "llava", "--seed", "1", "--out", str(out))
    assert "holds a finished tiny model of an earlier `mllm-pib tiny-model`; give --overwrite" in error
    assert snapshot(out) == first
    assert main(["tiny-model", "--backbone", "llava", "--seed", "1", "--out", str(out), "--overwrite"]) == 0
    assert snapshot(out)["model.safetensors"] != first["model.safetensors"]  # other seed, other weights


def test_export_refuses_other_folders_and_replaces_its_own_with_overwrite(pib, llava, notes, tmp_path, capsys):
    error = refusal(capsys, "export", "--pib", pib, "--base", llava, "--out", str(notes), "--overwrite")
    assert "was not written by `mllm-pib export`" in error
    out = tmp_path / "exported"
    assert main(["export", "--pib", pib, "--base", llava, "--out", str(out)]) == 0
    first = snapshot(out)
    error = refusal(capsys, "export", "--pib", pib, "--base", llava, str(out))
    assert "holds a finished exported model of an earlier `mllm-pib export`; give --overwrite" in error
    (out / "notes.txt").write_text("user")
    assert main(["export", "--pib", pib, "--base", llava, str(out), "--overwrite"]) == 0
    again = snapshot(out)
    assert again.pop("notes.txt") == b"user"
    assert again.keys() == first.keys()
    assert again["pib/model.safetensors"] == first["pib/model.safetensors"]


@pytest.fixture(scope="module")
def finished_run(config, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    assert main(["train", "--config", str(config), "--set", "training.max_steps=2", "--set", "training.save_steps=1",
                 "--out", str(out)]) == 0
    return out


def test_train_into_a_finished_run_refuses_unless_resume_or_overwrite(finished_run, config, tmp_path, capsys):
    before = snapshot(finished_run)
    error = refusal(capsys, "train", "--config", str(config), "--out", str(finished_run))
    assert f"{finished_run}: holds a finished training run of an earlier `mllm-pib train`" in error
    assert "give --resume to continue it or --overwrite to replace it" in error
    assert snapshot(finished_run) == before  # not retrained over

    run = Path(shutil.copytree(finished_run, tmp_path / "copy"))
    (run / "notes.txt").write_text("user")
    assert main(["train", "--config", str(config), "--set", "training.max_steps=1", "--set", "training.save_steps=100",
                 "--out", str(run), "--overwrite"]) == 0
    assert (run / "notes.txt").read_text() == "user"
    assert not (run / "checkpoint-2").exists()  # the earlier run's checkpoints went with it
    history = json.loads((run / "log_history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == [1]


def test_train_never_writes_into_a_folder_it_did_not_write(notes, config, capsys):
    for flags in ([], ["--resume"], ["--overwrite"]):
        error = refusal(capsys, "train", "--config", str(config), "--out", str(notes), *flags)
        assert "was not written by `mllm-pib train`" in error
    assert snapshot(notes) == {"notes.txt": b"my results, do not lose"}


def test_sweep_refuses_a_rerun_and_resume_keeps_finished_runs(config, notes, tmp_path, capsys):
    sweep = ["sweep", "--config", str(config), "--grid", "learning_rate=1e-3", "--set", "training.max_steps=2",
             "--set", "training.save_steps=100", "--json"]
    assert "was not written by `mllm-pib sweep`" in refusal(capsys, *sweep, "--out", str(notes), "--overwrite")
    out = tmp_path / "sweep"
    assert main([*sweep, "--out", str(out)]) == 0
    results = json.loads(capsys.readouterr().out)
    first = snapshot(out)
    error = refusal(capsys, *sweep, "--out", str(out))
    assert "holds a finished sweep of an earlier `mllm-pib sweep`; give --resume to continue it or --overwrite" in error
    assert main([*sweep, "--out", str(out), "--resume"]) == 0
    assert json.loads(capsys.readouterr().out) == results
    again = snapshot(out)
    assert {k: v for k, v in again.items() if not k.startswith("results")} == \
        {k: v for k, v in first.items() if not k.startswith("results")}  # the finished run was not trained again


def test_demo_never_writes_into_a_folder_it_did_not_write(notes, capsys):
    error = refusal(capsys, "demo", "--quick", "--out", str(notes), "--overwrite")
    assert "was not written by `mllm-pib demo`" in error
    assert snapshot(notes) == {"notes.txt": b"my results, do not lose"}
