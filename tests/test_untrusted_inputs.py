"""Untrusted inputs: image paths confined to their image root (training data and POPE), text that
is not UTF-8 (configs, data records), pickled base weights, and the enforced image size limit."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from mllm_pib.cli import main
from mllm_pib.data.images import ImageError, ImageResolver, open_image
from mllm_pib.data.records import BadRecordBudget, read_desc_data, read_generic
from test_hardening import cli_error, png_header
from test_safe_resume import Payload
from test_training import write_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tree(tmp_path):
    """``root/`` with an image and two symlinks (to an image inside, to one outside), and
    ``secret.png`` beside the root."""
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (12, 8), (0, 90, 0)).save(root / "sub" / "in.png")
    Image.new("RGB", (12, 8), (200, 0, 0)).save(tmp_path / "secret.png")
    (root / "inner_link.png").symlink_to(root / "sub" / "in.png")
    (root / "outer_link.png").symlink_to(tmp_path / "secret.png")
    return tmp_path


def generic_lines(images: list[str]) -> str:
    return "".join(json.dumps({"image": image, "prompt": "What is it?", "chosen": "A square.",
                               "rejected": f"A star {i}."}) + "\n" for i, image in enumerate(images))


ESCAPING = ["../secret.png", "{tmp}/secret.png", "outer_link.png", "sub/../../secret.png"]


def test_image_paths_leading_outside_the_root_are_counted_skips(tree):
    escaping = [name.format(tmp=tree) for name in ESCAPING]
    (tree / "data.jsonl").write_text(generic_lines(["sub/in.png", "inner_link.png", *escaping]))
    budget = BadRecordBudget(10)
    pairs = list(read_generic(tree / "data.jsonl", ImageResolver(tree / "root"), budget))
    assert [p.image for p in pairs] == [tree / "root/sub/in.png"] * 2  # the inner link resolves inside
    assert [(index, reason.split(":")[0]) for _, index, reason in budget.skipped] == [
        (2, "image outside the image root"), (3, "image outside the image root"),
        (4, "image outside the image root"), (5, "image outside the image root")]
    assert all(f"field 'image': {name!r} leads to {tree / 'secret.png'}, outside the image root {tree / 'root'}" in reason
               for (_, _, reason), name in zip(budget.skipped, escaping))

    allowed = list(read_generic(tree / "data.jsonl", ImageResolver(tree / "root", allow_outside=True), BadRecordBudget(0)))
    assert len(allowed) == 6
    assert all(open_image(pair.image).getpixel((0, 0)) == (200, 0, 0) for pair in allowed[2:])  # the secret


def test_visual_genome_urls_and_ids_cannot_leave_the_root(tree):
    root = tree / "root"
    urls = [{"image_id": 1, "url": "https://x/VG_100K/../../secret.png"}, {"image_id": 2, "url": "https://x/sub/in.png"}]
    (root / "image_data.json").write_text(json.dumps(urls))
    data = [{"image_id": i, "chosen": ["a."], "rejected": ["b."]} for i in (1, 2, "../secret")]
    (tree / "desc.json").write_text(json.dumps(data))
    budget = BadRecordBudget(10)
    pairs = list(read_desc_data(tree / "desc.json", ImageResolver(root), budget))
    assert [p.image for p in pairs] == [root / "sub/in.png"]
    assert [(index, reason.split(": ")[1]) for _, index, reason in budget.skipped] == [(0, "field 'image_id'"), (2, "field 'image_id'")]


def test_train_refuses_an_outside_image_naming_file_record_and_field_unless_allowed(tree, llava, hadpo_dir, capsys):
    (tree / "data.jsonl").write_text(generic_lines(["sub/in.png", "../secret.png"]))
    config = write_config(tree, "llava", llava, hadpo_dir, data=[
        {"format": "generic", "path": str(tree / "data.jsonl"), "images": str(tree / "root")}], max_bad_records=0)
    run = ["train", "--config", str(config), "--set", "training.max_steps=1", "--set", "training.save_steps=100"]
    error = cli_error(capsys, *run, "--output-dir", str(tree / "refused"))
    assert f"{tree / 'data.jsonl'} record 1: image outside the image root: field 'image': '../secret.png'" in error
    assert "--allow-outside-images" in error
    assert main([*run, "--output-dir", str(tree / "allowed"), "--allow-outside-images"]) == 0
    assert "data: 2 preference pairs" in capsys.readouterr().err
    assert json.loads((tree / "allowed" / "train_config.json").read_text())["allow_outside_images"] is True


def test_pope_images_are_confined_unless_allowed(tree, llava, capsys):
    rows = [{"question_id": 1, "image": "sub/in.png", "text": "Is there a square?", "label": "yes"},
            {"question_id": 2, "image": "outer_link.png", "text": "Is there a star?", "label": "no"}]
    questions = tree / "coco_pope_random.json"
    questions.write_text("".join(json.dumps(row) + "\n" for row in rows))
    ask = ["eval", "pope", "--backbone", "llava", "--model", llava, "--questions", str(questions),
           "--images", str(tree / "root"), "--max-new-tokens", "2"]
    error = cli_error(capsys, *ask, "--out", str(tree / "refused"))
    assert error.startswith(f"error: {questions}: question 2: field 'image': 'outer_link.png' leads to {tree / 'secret.png'}")
    assert not (tree / "refused" / "answers_coco_pope_random.jsonl").exists()
    assert main([*ask, "--out", str(tree / "allowed"), "--allow-outside-images", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["random"]["total"] == 2


def test_a_config_that_is_not_utf8_is_one_line(tmp_path, capsys):
    (tmp_path / "latin1.yaml").write_bytes("backbone: llava  # café\n".encode("latin-1"))
    error = cli_error(capsys, "train", "--config", str(tmp_path / "latin1.yaml"))
    at = len(b"backbone: llava  # caf")
    assert error == f"error: {tmp_path / 'latin1.yaml'}: not UTF-8 text (invalid continuation byte at byte {at})"


def test_a_record_that_is_not_utf8_is_a_counted_skip(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    good = [json.dumps({"image": "a.png", "prompt": "Où?", "chosen": f"Là {i}.", "rejected": "Ici."}).encode() for i in range(2)]
    bad = b'{"image": "a.png", "prompt": "Caf\xe9?", "chosen": "Yes.", "rejected": "No."}'  # latin-1
    (tmp_path / "data.jsonl").write_bytes(b"\n".join([good[0], bad, good[1]]) + b"\n")
    budget = BadRecordBudget(5)
    pairs = list(read_generic(tmp_path / "data.jsonl", ImageResolver(tmp_path), budget))
    assert [(p.index, p.prompt, p.chosen) for p in pairs] == [(0, "Où?", "Là 0."), (2, "Où?", "Là 1.")]
    assert budget.skipped == [(str(tmp_path / "data.jsonl"), 1, "not UTF-8: byte 0xe9 in the text 'Caf'…")]

    # the same in a JSON document: the other records are read
    records = [{"image_id": "a", "chosen": ["x."], "rejected": ["y."]}, {"image_id": "a", "chosen": ["Caf\udce9"], "rejected": ["y."]}]
    text = json.dumps(records, ensure_ascii=False).encode("utf-8", "surrogateescape")
    assert b"Caf\xe9" in text
    (tmp_path / "desc.json").write_bytes(text)
    budget = BadRecordBudget(5)
    assert [p.index for p in read_desc_data(tmp_path / "desc.json", ImageResolver(tmp_path), budget)] == [0]
    assert [(index, reason.split(":")[0]) for _, index, reason in budget.skipped] == [(1, "not UTF-8")]


def test_a_pickled_base_model_is_one_line_and_never_runs(tmp_path, llava, capsys):
    base = Path(shutil.copytree(llava, tmp_path / "base"))
    (base / "model.safetensors").unlink()
    torch.save({"model": Payload(tmp_path / "ran")}, base / "pytorch_model.bin")
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    error = cli_error(capsys, "generate", "--backbone", "llava", "--model", str(base), "--image", str(image), "--prompt", "Hi")
    assert not (tmp_path / "ran").exists()
    assert error.startswith(f"error: {base / 'pytorch_model.bin'}: refused to unpickle this model weights file: "
                            "it refers to io.open, which is not allowed")
    assert len(error.splitlines()) == 1


LIMIT = 89_478_485  # Pillow's Image.MAX_IMAGE_PIXELS: 2**30 bytes of 4-byte pixels / 3


def test_the_pixel_limit_enforced_is_the_documented_one(tmp_path):
    assert Image.MAX_IMAGE_PIXELS == (1024 * 1024 * 1024 // 4 // 3) == LIMIT
    side = int(LIMIT ** 0.5)  # 9459 x 9459 is under the limit, 9460 x 9460 over it
    assert side * side <= LIMIT < (side + 1) * (side + 1)
    for width, height, problem in ((side, side, "cannot decode image"), (side + 1, side + 1, "image too large"),
                                   (LIMIT, 1, "cannot decode image"), (LIMIT + 1, 1, "image too large"),
                                   (16384, 16384, "image too large")):
        path = tmp_path / f"{width}x{height}.png"
        path.write_bytes(png_header(width, height))  # the size is declared, the pixels are missing
        with pytest.raises(ImageError, match=problem):
            open_image(path)
    stated = f"{LIMIT:,} pixels"
    for doc in (REPO / "README.md", REPO / "docs" / "scale-out.md"):
        text = doc.read_text()
        assert stated in text and "above 16384" not in text, doc  # the limit stated before



def test_shr_images_are_confined_too(tree, llava):
    from mllm_pib.checkpoint import load_model
    from mllm_pib.errors import UserError
    from mllm_pib.evaluation.judge import JudgeConfig
    from mllm_pib.evaluation.suite import evaluate_shr

    shr, vg = tree / "shr", tree / "root"
    shr.mkdir()
    (shr / "val_images_final.json").write_text(json.dumps([{"image_id": 7}]))
    (shr / "shr_factual_part1.jsonl").write_text(json.dumps({"7": ["A red square."]}) + "\n")
    (vg / "image_data.json").write_text(json.dumps([{"image_id": 7, "width": 12, "height": 8,
                                                     "url": "https://x/VG_100K/../../secret.png"}]))
    (vg / "region_descriptions.json").write_text("[]")
    judge = JudgeConfig(url="http://127.0.0.1:9/v1", model="never-asked")
    with pytest.raises(UserError, match=rf"'\.\./secret\.png' leads to {tree / 'secret.png'}, outside"):
        evaluate_shr(load_model(llava, backbone="llava"), shr, vg, judge, tree / "out")
