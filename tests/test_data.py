"""Preference data readers, validation and collation (HA-DPO formats, bad records)."""

import json

import pytest
import torch
from PIL import Image

from mllm_pib.data.dataset import PreferenceCollator, PreferenceDataset, pad
from mllm_pib.data.images import ImageError, ImageResolver, open_image
from mllm_pib.data.records import DESCRIPTION_PROMPTS, BadRecordBudget, read_desc_data, read_generic, read_pope_data
from mllm_pib.errors import UserError


@pytest.fixture
def vg(tmp_path):
    """A Visual Genome-like folder: image_data.json pointing into VG_100K and VG_100K_2."""
    root = tmp_path / "VG"
    for sub, image_id in (("VG_100K", 1), ("VG_100K_2", 2)):
        (root / sub).mkdir(parents=True)
        Image.new("RGB", (20, 10), (image_id * 60, 0, 0)).save(root / sub / f"{image_id}.jpg")
    entries = [{"image_id": i, "url": f"https://cs.stanford.edu/people/rak248/{s}/{i}.jpg"} for s, i in (("VG_100K", 1), ("VG_100K_2", 2))]
    (root / "image_data.json").write_text(json.dumps(entries))
    return root


def test_vg_resolver_uses_image_data_urls(vg):
    resolve = ImageResolver(vg)
    assert resolve(1) == vg / "VG_100K" / "1.jpg"
    assert resolve("2") == vg / "VG_100K_2" / "2.jpg"


def test_desc_data_dict_and_list_forms_give_every_pair(vg, tmp_path):
    budget = BadRecordBudget(0)
    as_dict = {"1": {"chosen": ["a cat.", "one cat."], "rejected": ["a dog.", "two dogs.", "a bird."]}}
    as_list = [{"image_id": 1, "chosen": ["a cat.", "one cat."], "rejected": ["a dog.", "two dogs.", "a bird."]}]
    results = []
    for name, data in (("d.json", as_dict), ("l.json", as_list)):
        (tmp_path / name).write_text(json.dumps(data))
        results.append(list(read_desc_data(tmp_path / name, ImageResolver(vg), budget)))
    for pairs in results:
        assert len(pairs) == 6
        assert {(p.chosen, p.rejected) for p in pairs} == {(c, r) for c in as_list[0]["chosen"] for r in as_list[0]["rejected"]}
        assert all(p.image == vg / "VG_100K" / "1.jpg" and p.prompt in DESCRIPTION_PROMPTS for p in pairs)
    assert [p.prompt for p in results[0]] == [p.prompt for p in results[1]]  # the prompt is seeded by image id


def test_pope_data_reject_or_rejected_and_correct_skipped(vg, tmp_path):
    data = [
        {"image_id": 1, "question": "Is there a dog?", "chosen": "No.", "reject": "Yes.", "answer": "no", "correct": False},
        {"image_id": 2, "question": "Is there a cat?", "chosen": "Yes.", "rejected": "No.", "answer": "yes", "correct": False},
        {"image_id": 2, "question": "Is there a car?", "chosen": "No.", "rejected": "Yes.", "answer": "no", "correct": True},
    ]
    (tmp_path / "pope.json").write_text(json.dumps(data))
    pairs = list(read_pope_data(tmp_path / "pope.json", ImageResolver(vg), BadRecordBudget(0)))
    assert [(p.prompt, p.chosen, p.rejected, p.index) for p in pairs] == [
        ("Is there a dog?", "No.", "Yes.", 0), ("Is there a cat?", "Yes.", "No.", 1)]


def test_generic_jsonl_and_bad_records_within_budget(vg, tmp_path, caplog):
    lines = [
        {"image": "VG_100K/1.jpg", "prompt": "What?", "chosen": "A cat.", "rejected": "A dog."},
        {"image": "VG_100K/1.jpg", "prompt": "What?", "chosen": "A cat."},
        ["not", "an", "object"],
    ]
    (tmp_path / "g.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    budget = BadRecordBudget(2)
    pairs = list(read_generic(tmp_path / "g.jsonl", ImageResolver(vg), budget))
    assert len(pairs) == 1 and pairs[0].image == vg / "VG_100K" / "1.jpg"
    out = caplog.text
    assert f"{tmp_path / 'g.jsonl'} record 1: missing field: rejected" in out
    assert "record 2: wrong type" in out
    assert budget.summary() == "2 records skipped (1 missing field, 1 wrong type)"
    with pytest.raises(UserError, match="more than max_bad_records=1"):
        list(read_generic(tmp_path / "g.jsonl", ImageResolver(vg), BadRecordBudget(1)))


def test_malformed_json_line_is_a_counted_skip(tmp_path, vg):
    good = {"image": "VG_100K/1.jpg", "prompt": "p", "chosen": "a", "rejected": "b"}
    (tmp_path / "g.jsonl").write_text(json.dumps(good) + '\n{oops\n' + json.dumps(good) + "\n")
    budget = BadRecordBudget(5)
    assert [p.index for p in read_generic(tmp_path / "g.jsonl", ImageResolver(vg), budget)] == [0, 2]
    assert budget.skipped[0][1:] == (1, "malformed JSON: Expecting property name enclosed in double quotes (column 2)")
    with pytest.raises(UserError, match=r"g.jsonl record 1: malformed JSON"):
        list(read_generic(tmp_path / "g.jsonl", ImageResolver(vg), BadRecordBudget(0)))


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16"])
def test_open_image_converts_every_mode_to_rgb(tmp_path, mode):
    path = tmp_path / f"x.{'tiff' if mode in ('CMYK', 'I;16') else 'png'}"
    Image.new(mode, (5, 4)).save(path)
    image = open_image(path)
    assert image.mode == "RGB" and image.size == (5, 4)


def test_open_image_errors(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ImageError, match="cannot decode"):
        open_image(tmp_path / "broken.jpg")
    with pytest.raises(ImageError, match="not found"):
        open_image(tmp_path / "missing.jpg")
    good = tmp_path / "good.png"
    Image.new("RGB", (30, 30)).save(good)
    good.write_bytes(good.read_bytes()[:60])  # truncated
    with pytest.raises(ImageError):
        open_image(good)


def test_pad_left_and_right():
    ids, mask = pad([[1, 2, 3], [4]], pad_id=0, side="left")
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad([[1, 2, 3], [4]], pad_id=0, side="right")
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


class TinyTemplateBackbone:
    """Just the template side of a backbone: 4 image tokens (id 99) + words as ids."""

    image_token_id = 99
    pad_token_id = 0

    def prompt_ids(self, question, image=None):
        return [1] + [99] * 4 + [len(w) for w in question.split()]

    def answer_ids(self, answer):
        return [len(w) + 10 for w in answer.split()] + [2]

    def preprocess(self, images, questions):
        return {"pixel_values": torch.stack([torch.tensor(image.getpixel((0, 0)), dtype=torch.float) for image in images])}


def test_dataset_validates_truncates_answers_and_never_the_image(vg, tmp_path):
    from mllm_pib.data.records import PreferencePair

    image = vg / "VG_100K" / "1.jpg"
    make = lambda i, prompt, chosen, rejected, img=image: PreferencePair(img, prompt, chosen, rejected, "f.json", i, f"p{i}")  # noqa: E731
    pairs = [
        make(0, "is it", "yes it is a cat", "no"),
        make(1, "is it", "", "no"),
        make(2, "is it", "same", "same"),
        make(3, "is it", "yes", "no", vg / "missing.jpg"),
        make(4, "a very long prompt with many words", "yes", "no"),
    ]
    budget = BadRecordBudget(10)
    dataset = PreferenceDataset(pairs, TinyTemplateBackbone(), budget, max_length=9)
    assert len(dataset) == 1
    item = dataset.items[0]
    assert item.prompt_ids == [1, 99, 99, 99, 99, 2, 2]
    assert item.chosen_ids == [13, 12]  # cut to the 2 positions left; the prompt is whole
    reasons = [reason.split(":")[0] for _, _, reason in budget.skipped]
    assert reasons == ["empty answer", "chosen identical to rejected", "bad image", "over-long"]
    batch = PreferenceCollator(TinyTemplateBackbone())([dataset[0]])
    assert batch["prompt_ids"].tolist() == [[1, 99, 99, 99, 99, 2, 2]] and batch["pair_ids"] == ["p0"]
    assert batch["answer_ids"].tolist() == [[13, 12], [12, 2]]  # chosen row, then rejected row
    assert batch["answer_mask"].tolist() == [[1, 1], [1, 1]]
    assert batch["vision_inputs"]["pixel_values"].shape == (1, 3)
