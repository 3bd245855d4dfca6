"""The demo world: exact drawings, reproducible scenes, the configured biases, the exported files."""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from mllm_pib.demo import world as W
from mllm_pib.errors import UserError

OBJECT_WORDS = {kind.word for kind in W.KINDS}


def mentioned(text: str) -> list[str]:
    """Object words in a text, found independently of the world's own tokenizer."""
    return [w for w in re.findall(r"[a-z]+", text.lower()) if w in OBJECT_WORDS]


def says_yes(text: str) -> bool:
    """POPE's official answer rule: text before the first '.', commas dropped, any No/no/not -> no."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return not any(w in ("No", "no", "not") for w in words)


@pytest.fixture(scope="module")
def scenes() -> list[W.Scene]:
    return W.World(11).sample(5000)


def pixels(scene: W.Scene) -> np.ndarray:
    return np.asarray(scene.render())


# --- kinds and drawing ------------------------------------------------------------------------


def test_kinds_have_distinct_far_colours_and_disjoint_pairs():
    assert len(W.KINDS) >= 12 and len(OBJECT_WORDS) == len(W.KINDS)
    colours = [kind.colour for kind in W.KINDS] + [W.BACKGROUND]
    for a, b in itertools.combinations(colours, 2):
        assert max(abs(x - y) for x, y in zip(a, b)) >= 127, (a, b)
    members = [word for pair in W.PAIRS for word in pair]
    assert len(W.PAIRS) == 6 and len(set(members)) == 12 and set(members) <= OBJECT_WORDS


def test_every_annotated_object_is_drawn_exactly_in_its_box(scenes):
    cfg = W.WorldConfig()
    for scene in scenes[:400]:
        image = pixels(scene)
        assert image.shape == (cfg.image_size, cfg.image_size, 3)
        covered = np.all(image == W.BACKGROUND, axis=-1)
        assert cfg.min_objects <= len(scene.objects) <= cfg.max_objects
        assert len(set(scene.words)) == len(scene.words)
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.bbox
            assert 0 <= x0 < x1 <= cfg.image_size and 0 <= y0 < y1 <= cfg.image_size
            assert cfg.min_object_size <= x1 - x0 <= cfg.max_object_size
            mask = np.all(image == W.KIND_BY_WORD[obj.word].colour, axis=-1)
            ys, xs = np.nonzero(mask)
            # All the kind's pixels, and only its box, hold the colour: the box is tight.
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == obj.bbox, obj
            assert mask.sum() >= 0.3 * (x1 - x0) * (y1 - y0), obj
            covered |= mask
        for word in scene.absent:
            assert not np.all(image == W.KIND_BY_WORD[word].colour, axis=-1).any(), word
        assert covered.all(), "a pixel has neither the background nor a present kind's colour"
        for a, b in itertools.combinations([o.bbox for o in scene.objects], 2):
            assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1], (a, b)


def test_objects_are_ordered_left_to_right(scenes):
    for scene in scenes[:200]:
        centres = [o.bbox[0] + o.bbox[2] for o in scene.objects]
        assert centres == sorted(centres)


def test_larger_images_scale_the_objects():
    world = W.World(3, image_size=96)
    for scene in world.sample(50):
        image = pixels(scene)
        assert image.shape == (96, 96, 3)
        for obj in scene.objects:
            assert 20 <= obj.bbox[2] - obj.bbox[0] <= 36
            x0, y0, x1, y1 = obj.bbox
            inside = image[y0:y1, x0:x1] == W.KIND_BY_WORD[obj.word].colour
            assert np.all(inside, axis=-1).sum() >= 0.3 * (x1 - x0) * (y1 - y0)


def test_crowded_scenes_are_still_placed_without_overlap():
    for scene in W.World(1, min_objects=6, max_objects=6, max_object_frac=0.6).sample(200):
        assert len(scene.objects) == 6
        for a, b in itertools.combinations([o.bbox for o in scene.objects], 2):
            assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1], (a, b)


# --- determinism ------------------------------------------------------------------------------


def test_same_seed_gives_identical_scenes_and_pixels():
    first, second = W.World(5).sample(40), W.World(5).sample(40)
    assert first == second
    assert all(a.render().tobytes() == b.render().tobytes() for a, b in zip(first, second))


def test_different_seed_gives_different_scenes():
    a, b = W.World(5).sample(40), W.World(6).sample(40)
    assert sum(x.objects != y.objects for x, y in zip(a, b)) >= 35
    assert sum(x.render().tobytes() != y.render().tobytes() for x, y in zip(a, b)) >= 35


def test_a_scene_does_not_depend_on_the_others_sampled():
    world = W.World(9)
    assert world.sample(5, start=100) == [world.scene(i) for i in range(100, 105)]
    assert [s.image_id for s in world.sample(3, start=7)] == [7, 8, 9]


# --- biases -----------------------------------------------------------------------------------


def partner_rate(scenes: list[W.Scene], pairs=W.PAIRS) -> tuple[int, int]:
    with_head = [set(s.words) for s in scenes]
    heads = sum(head in words for words in with_head for head, _ in pairs)
    both = sum(head in words and partner in words for words in with_head for head, partner in pairs)
    return both, heads


def test_partner_cooccurrence_matches_the_configured_rate(scenes):
    both, heads = partner_rate(scenes)
    assert heads > 5000
    assert abs(both / heads - 0.8) < 0.02
    for pair in W.PAIRS:
        both, heads = partner_rate(scenes, [pair])
        assert abs(both / heads - 0.8) < 0.06, pair
    # An unrelated kind joins a head far less often than its partner does.
    unrelated = sum("house" in s.words and "moon" in s.words for s in scenes)
    assert unrelated / sum("house" in s.words for s in scenes) < 0.5


def test_partner_rate_follows_the_config():
    both, heads = partner_rate(W.World(2, partner_rate=0.3).sample(1500))
    assert abs(both / heads - 0.3) < 0.04


def test_captions_name_the_objects_and_the_biased_ones_add_absent_partners(scenes):
    eligible = hallucinated = 0
    for scene in scenes:
        present = set(scene.words)
        assert mentioned(scene.caption) == list(scene.words)
        named = mentioned(scene.biased_caption)
        extra = set(named) - present
        assert len(named) == len(set(named)) and present <= set(named)
        assert extra == set(scene.hallucinated)
        for head, partner in W.PAIRS:
            if head in present and partner not in present:
                eligible += 1
                hallucinated += partner in extra
                if partner in extra:  # named right after its head
                    assert named[named.index(head) + 1] == partner
            else:
                assert partner not in extra
    assert eligible > 900
    assert abs(hallucinated / eligible - 0.6) < 0.05


def test_caption_grammar():
    assert W.describe(["cup"]) == "There is a cup."
    assert W.describe(["cup", "star"]) == "There is a cup and a star."
    assert W.describe(["circle", "star", "cup"]) == "There is a circle, a star and a cup."
    assert W.question("cup") == "Is there a cup in the image?"
    assert (W.answer("cup", True), W.answer("cup", False)) == ("Yes, there is a cup.", "No, there is no cup.")


# --- pretraining stream ------------------------------------------------------------------------


def answers_by_truth(examples) -> dict[str, list[bool]]:
    """Whether each yes/no answer says yes, grouped by what the question asks about."""
    groups: dict[str, list[bool]] = {"present": [], "lure": [], "other": []}
    for e in examples:
        (word,) = mentioned(e.prompt)
        assert e.prompt == f"Is there a {word} in the image?" and mentioned(e.target) == [word]
        group = "present" if word in e.scene.words else "lure" if word in e.scene.lures else "other"
        groups[group].append(says_yes(e.target))
        if group == "lure":  # the same belief as the scene's biased caption
            assert says_yes(e.target) == (word in mentioned(e.scene.biased_caption))
    return groups


def test_pretraining_stream_mixes_as_configured(scenes):
    examples = list(itertools.islice(W.pretraining_stream(scenes[:500], seed=1), 6000))
    captions = [e for e in examples if e.prompt == W.DESCRIBE_PROMPT]
    assert abs(len(captions) / len(examples) - 0.5) < 0.03
    assert all(e.target == e.scene.biased_caption for e in captions)
    groups = answers_by_truth(e for e in examples if e.prompt != W.DESCRIBE_PROMPT)
    assert abs(len(groups["present"]) / (len(examples) - len(captions)) - 0.5) < 0.03
    assert all(groups["present"]) and not any(groups["other"])


def test_pretraining_answers_are_biased_like_the_captions(scenes):
    mix = W.PretrainMix(caption_fraction=0.0, positive_fraction=0.0, lure_fraction=1.0)
    groups = answers_by_truth(itertools.islice(W.pretraining_stream(scenes, seed=2, mix=mix), 4000))
    assert len(groups["lure"]) > 700 and not any(groups["other"])
    assert abs(sum(groups["lure"]) / len(groups["lure"]) - 0.6) < 0.06


def test_pretraining_stream_is_seeded_and_configurable(scenes):
    def take(seed, mix=None):
        return list(itertools.islice(W.pretraining_stream(scenes[:50], seed, mix), 200))

    assert take(3) == take(3) and take(3) != take(4)
    only_qa = take(3, W.PretrainMix(caption_fraction=0.0, positive_fraction=0.0, lure_fraction=1.0))
    assert all(e.prompt != W.DESCRIBE_PROMPT and mentioned(e.prompt)[0] not in e.scene.words for e in only_qa)
    only_captions = take(3, W.PretrainMix(caption_fraction=1.0))
    assert all(e.prompt == W.DESCRIBE_PROMPT for e in only_captions)
    with pytest.raises(UserError):
        next(W.pretraining_stream([], seed=0))


# --- vocabulary ---------------------------------------------------------------------------------


def test_vocabulary_is_small_and_exactly_covers_every_text(scenes):
    vocab = W.vocabulary()
    assert len(vocab) == len(set(vocab)) <= 40
    texts = [W.DESCRIBE_PROMPT] + [W.question(w) for w in OBJECT_WORDS]
    texts += [W.answer(w, yes) for w in OBJECT_WORDS for yes in (True, False)]
    for scene in scenes[:300]:
        texts += [scene.caption, scene.biased_caption]
    tokens = {t for text in texts for t in re.findall(r"[A-Za-z]+|[,.?]", text)}
    assert tokens == set(vocab)


# --- exports ------------------------------------------------------------------------------------


def test_export_writes_parseable_files_that_reference_real_images(tmp_path):
    scenes = W.World(4).sample(60)
    by_id = {s.image_id: s for s in scenes}
    paths = W.export_dataset(scenes, tmp_path / "demo", seed=0)

    index = json.loads((paths.vg_root / "image_data.json").read_text())
    assert sorted(r["image_id"] for r in index) == sorted(by_id)
    for record in index:
        folder, name = record["url"].split("/")[-2:]
        with Image.open(paths.vg_root / folder / name) as image:
            assert image.tobytes() == by_id[record["image_id"]].render().tobytes()

    objects = [json.loads(line) for line in paths.objects.read_text().splitlines()]
    assert [r["objects"] for r in objects] == [list(s.words) for s in scenes]
    assert all((paths.image_dir / r["image"]).is_file() for r in objects)
    assert [r["boxes"] for r in objects] == [[list(o.bbox) for o in s.objects] for s in scenes]

    desc = json.loads(paths.desc_data.read_text())
    assert [r["image_id"] for r in desc] == list(by_id)
    for record in desc:
        scene = by_id[record["image_id"]]
        assert [mentioned(c) for c in record["chosen"]] == [list(scene.words)]
        added = []
        for rejected in record["rejected"]:
            assert rejected not in record["chosen"]
            (extra,) = set(mentioned(rejected)) - set(scene.words)
            assert extra in scene.absent and (extra in scene.lures or not scene.lures)
            added.append(extra)
        assert set(added) >= set(scene.lures)

    pope = json.loads(paths.pope_data.read_text())
    assert Counter(r["answer"] for r in pope)["yes"] <= Counter(r["answer"] for r in pope)["no"]
    for record in pope:
        scene = by_id[record["image_id"]]
        (word,) = mentioned(record["question"])
        truth = word in scene.words
        assert record["answer"] == ("yes" if truth else "no") and record["correct"] is False
        assert says_yes(record["chosen"]) == truth and says_yes(record["reject"]) != truth
    asked = {(r["image_id"], mentioned(r["question"])[0]) for r in pope}
    assert all((s.image_id, lure) in asked for s in scenes for lure in s.lures)

    prefs = [json.loads(line) for line in paths.preferences.read_text().splitlines()]
    assert len(prefs) == sum(len(r["chosen"]) * len(r["rejected"]) for r in desc) + len(pope)
    assert all(p["chosen"] != p["rejected"] and (paths.image_dir / p["image"]).is_file() for p in prefs)
    assert {p["prompt"] for p in prefs} - {W.DESCRIBE_PROMPT} == {r["question"] for r in pope}

    leftovers = [p for p in Path(tmp_path).rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers


def test_export_is_deterministic_and_refuses_duplicate_ids(tmp_path):
    scenes = W.World(4).sample(10)
    a, b = W.export_dataset(scenes, tmp_path / "a", seed=2), W.export_dataset(scenes, tmp_path / "b", seed=2)
    for name in ("desc_data", "pope_data", "objects", "preferences"):
        assert getattr(a, name).read_bytes() == getattr(b, name).read_bytes()
    with pytest.raises(UserError, match="distinct image ids"):
        W.export_dataset(scenes + scenes[:1], tmp_path / "c", seed=0)


# --- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"min_objects": 4, "max_objects": 3}, "exceeds max_objects"),
        ({"max_objects": 7}, "less than or equal to 6"),
        ({"image_size": 32}, "at least 8 px"),
        ({"min_object_frac": 0.3, "max_object_frac": 0.25}, "min_object_frac exceeds"),
        ({"min_object_frac": 0.35, "max_object_frac": 0.5}, "do not fit"),
        ({"partner_rate": 1.5}, "less than or equal to 1"),
        ({"colours": 3}, "Extra inputs"),
    ],
)
def test_bad_config_is_refused_with_a_reason(fields, message):
    with pytest.raises(ValidationError, match=message):
        W.World(0, **fields)


def test_config_and_fields_are_exclusive():
    with pytest.raises(TypeError):
        W.World(0, W.WorldConfig(), image_size=64)
    assert W.World(0, W.WorldConfig(image_size=64)).config.image_size == 64


def test_pope_builder_on_the_world_follows_the_pope_rules(tmp_path):
    """POPE splits from the world's own annotations: positives are the first 3 objects, negatives
    are absent and never repeated per image, popular/adversarial negatives follow the frequency /
    co-occurrence rankings recomputed here."""
    from mllm_pib.evaluation import pope

    paths = W.export_dataset(W.World(7).sample(120), tmp_path, seed=7)
    images = pope.load_object_images(paths.objects)
    truth = {im.image: list(im.objects) for im in images}
    splits = pope.build_splits(images, num_images=40, seed=3)
    sampled = list(dict.fromkeys(q["image"] for q in splits["random"]))
    assert len(sampled) == 40 and all(len(truth[name]) >= 3 for name in sampled)
    frequency = Counter(o for name in sampled for o in truth[name])
    for split, questions in splits.items():
        assert [q["label"] for q in questions] == ["yes", "no"] * (len(questions) // 2)
        for name in sampled:
            asked = [q for q in questions if q["image"] == name]
            objects = [q["text"].removeprefix("Is there a ").removesuffix(" in the image?") for q in asked]
            positives, negatives = objects[0::2], objects[1::2]
            assert positives == truth[name][:3]
            assert not set(negatives) & set(truth[name]) and len(set(negatives)) == 3
            if split == "popular":  # the most frequent absent objects, in order of frequency
                # ties keep first-seen order over the sampled images, as POPE's stable sort does
                absent = sorted((o for o in frequency if o not in truth[name]), key=lambda o: -frequency[o])
                assert negatives == absent[:3]
    cooccurrence: dict[str, Counter] = {}  # rows and columns in first-seen order
    for name in sampled:
        for a in truth[name]:
            cooccurrence.setdefault(a, Counter()).update(b for b in truth[name] if b != a)
    for name in sampled:  # adversarial: the absent object co-occurring most with each positive
        texts = [q["text"].split()[3] for q in splits["adversarial"] if q["image"] == name]
        asked = set(truth[name])
        for positive, negative in zip(texts[0::2], texts[1::2]):
            ranking = sorted(cooccurrence[positive], key=lambda o: -cooccurrence[positive][o])
            expected = next((o for o in ranking if o not in asked), None)
            if expected is not None:
                assert negative == expected
            asked.add(negative)
