"""A synthetic world of coloured shapes with a co-occurrence bias: the demo's data.

Each of the twelve object kinds has its own shape and its own saturated colour, drawn without
anti-aliasing on a black background, so a colour mask identifies a kind exactly. Objects never
overlap (a one-pixel gap separates them), so every annotated object stays visible.

Kinds come in six pairs of a *head* and its *partner*. When a head is in a scene its partner is
present with probability ``partner_rate``; when the partner is then absent, the supervised
("biased") caption still names it with probability ``caption_bias``. These are the statistics
that make captioners trained on real data hallucinate. The ground truth (objects and boxes) is
kept apart from the biased caption.

Every scene is drawn from a ``random.Random`` seeded with the world seed and the image id, so a
scene never depends on which other scenes were sampled. Boxes are ``(x0, y0, x1, y1)`` in
pixels with ``x1`` and ``y1`` exclusive (``image.crop(box)`` is the object).
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm import tqdm

from mllm_pib.errors import UserError
from mllm_pib.io import atomic_path

Box = tuple[int, int, int, int]
Point = tuple[float, float]
RGB = tuple[int, int, int]

BACKGROUND: RGB = (0, 0, 0)
GAP = 1  # empty pixels kept between two objects, so their masks never touch
MIN_OBJECT_PIXELS = 8  # below this the shapes stop being recognisable
DESCRIBE_PROMPT = "Describe this image in detail."
IMAGE_SUBDIR = "VG_100K"  # Visual Genome's image folder name, so VG-style loaders find the images


# --- object kinds -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One drawing primitive of a shape, in unit coordinates of the object's box.

    ``width`` > 0 draws an outline that thick (as a fraction of the box size, at least 2 px)
    instead of filling.
    """

    primitive: Literal["rect", "poly", "ellipse"]
    points: tuple[Point, ...] = ((0.0, 0.0), (1.0, 1.0))
    width: float = 0.0


@dataclass(frozen=True)
class ObjectKind:
    """An object kind: the word that names it, its colour and the parts of its shape."""

    word: str
    colour: RGB
    parts: tuple[Part, ...]


def _fit_unit(points: Sequence[Point]) -> tuple[Point, ...]:
    """Scale ``points`` so that they span exactly the unit square (the box is tight)."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return tuple(
        ((x - min(xs)) / (max(xs) - min(xs)), (y - min(ys)) / (max(ys) - min(ys))) for x, y in points
    )


def _star() -> tuple[Point, ...]:
    radii = (1.0, 0.45)
    return _fit_unit(
        [
            (radii[k % 2] * math.cos(-math.pi / 2 + k * math.pi / 5),
             radii[k % 2] * math.sin(-math.pi / 2 + k * math.pi / 5))
            for k in range(10)
        ]
    )


def _crescent(steps: int = 12) -> tuple[Point, ...]:
    """A crescent: the left arc of the unit circle, back along a smaller circle's left arc."""
    tip = math.sqrt(0.5)  # the horns sit at 45 degrees above and below the axis
    inner_left = -0.1  # leftmost point of the inner arc, which sets the crescent's thickness
    centre = (2 * tip * tip - inner_left * inner_left) / (2 * tip - 2 * inner_left)
    radius = centre - inner_left
    start = math.atan2(tip, tip - centre)
    outer = [
        (math.cos(a), math.sin(a))
        for a in (math.pi / 4 + i * (3 * math.pi / 2) / steps for i in range(steps + 1))
    ]
    inner = [
        (centre + radius * math.cos(a), radius * math.sin(a))
        for a in (2 * math.pi - start - i * (2 * math.pi - 2 * start) / steps for i in range(1, steps))
    ]
    return _fit_unit(outer + inner)


def _rect(x0: float, y0: float, x1: float, y1: float, width: float = 0.0) -> Part:
    return Part("rect", ((x0, y0), (x1, y1)), width)


def _poly(*points: Point) -> Part:
    return Part("poly", tuple(points))


# Colours are corners and edge midpoints of the RGB cube: every pair differs by >= 127 in some
# channel, and none is the black background.
KINDS: tuple[ObjectKind, ...] = (
    ObjectKind("circle", (255, 0, 0), (Part("ellipse"),)),
    ObjectKind("square", (0, 0, 255), (_rect(0, 0, 1, 1),)),
    ObjectKind("triangle", (0, 255, 0), (_poly((0, 1), (0.5, 0), (1, 1)),)),
    ObjectKind("star", (255, 255, 0), (Part("poly", _star()),)),
    ObjectKind("cross", (255, 0, 255), (_rect(0.34, 0, 0.66, 1), _rect(0, 0.34, 1, 0.66))),
    ObjectKind("ring", (0, 255, 255), (Part("ellipse", width=0.22),)),
    ObjectKind("diamond", (255, 255, 255), (_poly((0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)),)),
    ObjectKind("moon", (255, 128, 0), (Part("poly", _crescent()),)),
    ObjectKind("cup", (128, 0, 255), (_rect(0, 0, 0.68, 1), _rect(0.5, 0.2, 1, 0.75, width=0.16))),
    ObjectKind("house", (0, 128, 255), (_poly((0, 0.45), (0.5, 0), (1, 0.45)), _rect(0.15, 0.45, 0.85, 1))),
    ObjectKind("tree", (128, 255, 0), (_poly((0, 0.72), (0.5, 0), (1, 0.72)), _rect(0.36, 0.72, 0.64, 1))),
    ObjectKind("flag", (255, 0, 128), (_rect(0, 0, 0.18, 1), _rect(0.18, 0, 1, 0.55))),
)
KIND_BY_WORD: dict[str, ObjectKind] = {kind.word: kind for kind in KINDS}

# (head, partner): the head usually appears with its partner.
PAIRS: tuple[tuple[str, str], ...] = (
    ("house", "tree"),
    ("moon", "star"),
    ("cup", "flag"),
    ("ring", "diamond"),
    ("circle", "square"),
    ("cross", "triangle"),
)
PARTNER_OF: dict[str, str] = dict(PAIRS)
HEAD_OF: dict[str, str] = {partner: head for head, partner in PAIRS}


# --- text -------------------------------------------------------------------------------------

# Same split as ``tokenizers.pre_tokenizers.Whitespace``: runs of word characters or of punctuation.
_TOKEN = re.compile(r"\w+|[^\w\s]+")


def describe(words: Sequence[str]) -> str:
    """The caption grammar: ``"There is a circle, a star and a cup."``."""
    if not words:
        raise ValueError("a description needs at least one object")
    items = [f"a {word}" for word in words]
    listed = items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"
    return f"There is {listed}."


def question(word: str) -> str:
    """The yes/no question about one object kind."""
    return f"Is there a {word} in the image?"


def answer(word: str, yes: bool) -> str:
    """The answer to :func:`question`: ``"Yes, there is a cup."`` or ``"No, there is no cup."``."""
    return f"Yes, there is a {word}." if yes else f"No, there is no {word}."


def split_words(text: str) -> list[str]:
    """Split ``text`` into the word and punctuation tokens that :func:`vocabulary` lists."""
    return _TOKEN.findall(text)


def vocabulary() -> list[str]:
    """Every word and punctuation token that a prompt, caption or answer of the world can hold."""
    words = [kind.word for kind in KINDS]
    texts = [DESCRIBE_PROMPT, describe(words)]
    texts += [question(word) for word in words]
    texts += [answer(word, yes) for word in words for yes in (True, False)]
    return sorted({token for text in texts for token in split_words(text)})


def image_filename(image_id: int) -> str:
    """The image file name of a scene, inside the image folder."""
    return f"{image_id}.png"


def with_partners(words: Sequence[str], partners: Iterable[str]) -> list[str]:
    """``words`` with each partner inserted right after its head, as a biased captioner says it."""
    result = list(words)
    for partner in partners:
        result.insert(result.index(HEAD_OF[partner]) + 1, partner)
    return result


# --- scenes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneObject:
    """One annotated object: its kind's word and its box ``(x0, y0, x1, y1)``, ends exclusive."""

    word: str
    bbox: Box


@dataclass(frozen=True)
class Scene:
    """One image's ground truth and its biased supervision.

    ``objects`` are ordered left to right (the order captions use); ``hallucinated`` lists the
    absent partners that the biased caption (and the biased yes/no answers) name anyway.
    """

    image_id: int
    image_size: int
    objects: tuple[SceneObject, ...]
    hallucinated: tuple[str, ...]

    @property
    def words(self) -> tuple[str, ...]:
        return tuple(obj.word for obj in self.objects)

    @property
    def absent(self) -> tuple[str, ...]:
        """Kinds not in the image, in the fixed kind order."""
        return tuple(kind.word for kind in KINDS if kind.word not in self.words)

    @property
    def lures(self) -> tuple[str, ...]:
        """Absent partners of present heads: the objects a biased model hallucinates here."""
        partners = (PARTNER_OF[w] for w in self.words if w in PARTNER_OF)
        return tuple(p for p in partners if p not in self.words)

    @property
    def filename(self) -> str:
        return image_filename(self.image_id)

    @property
    def caption(self) -> str:
        """The faithful description: exactly the objects in the image."""
        return describe(self.words)

    @property
    def biased_caption(self) -> str:
        """The supervised description: the faithful one plus the hallucinated partners."""
        return describe(with_partners(self.words, self.hallucinated))

    def render(self) -> Image.Image:
        """Draw the scene (RGB, no anti-aliasing)."""
        image = Image.new("RGB", (self.image_size, self.image_size), BACKGROUND)
        draw = ImageDraw.Draw(image)
        for obj in self.objects:
            _draw_object(draw, KIND_BY_WORD[obj.word], obj.bbox)
        return image


def _to_pixels(box: Box, points: Sequence[Point]) -> list[tuple[int, int]]:
    """Unit coordinates to pixel coordinates, corners included (0 -> x0, 1 -> x1 - 1)."""
    x0, y0, x1, y1 = box
    return [(x0 + round(u * (x1 - x0 - 1)), y0 + round(v * (y1 - y0 - 1))) for u, v in points]


def _draw_object(draw: ImageDraw.ImageDraw, kind: ObjectKind, box: Box) -> None:
    size = box[2] - box[0]
    for part in kind.parts:
        xy = _to_pixels(box, part.points)
        if part.primitive == "poly":
            draw.polygon(xy, fill=kind.colour)
            continue
        paint = draw.rectangle if part.primitive == "rect" else draw.ellipse
        if part.width:
            paint(xy, outline=kind.colour, width=max(2, round(part.width * size)))
        else:
            paint(xy, fill=kind.colour)


class WorldConfig(BaseModel):
    """How scenes are drawn.

    Object sizes are fractions of ``image_size`` (at 48 px the defaults give 10-18 px objects).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    image_size: int = Field(48, ge=24)
    min_objects: int = Field(2, ge=1)
    max_objects: int = Field(5, ge=1, le=len(PAIRS))
    min_object_frac: float = Field(0.21, gt=0, le=1)
    max_object_frac: float = Field(0.375, gt=0, le=1)
    partner_rate: float = Field(0.8, ge=0, le=1)
    caption_bias: float = Field(0.6, ge=0, le=1)

    @property
    def min_object_size(self) -> int:
        return round(self.min_object_frac * self.image_size)

    @property
    def max_object_size(self) -> int:
        return round(self.max_object_frac * self.image_size)

    @model_validator(mode="after")
    def _check_layout(self) -> WorldConfig:
        if self.min_objects > self.max_objects:
            raise ValueError(f"min_objects ({self.min_objects}) exceeds max_objects ({self.max_objects})")
        if self.min_object_size < MIN_OBJECT_PIXELS:
            raise ValueError(
                f"min_object_frac * image_size = {self.min_object_size} px; objects need at least "
                f"{MIN_OBJECT_PIXELS} px to stay recognisable"
            )
        if self.min_object_size > self.max_object_size:
            raise ValueError("min_object_frac exceeds max_object_frac")
        # Random placement stays quick while the smallest objects fill at most a third of the image.
        if 3 * self.max_objects * (self.min_object_size + GAP) ** 2 > self.image_size**2:
            raise ValueError(
                f"{self.max_objects} objects of {self.min_object_size} px do not fit comfortably in "
                f"{self.image_size} px images; lower max_objects or min_object_frac"
            )
        return self


_PLACE_TRIES = 64
_LAYOUT_RESTARTS = 256


class World:
    """A seeded generator of scenes.

    Args:
        seed: the world seed; scene ``i`` depends only on it, ``i`` and the config.
        config: the drawing parameters; alternatively pass ``WorldConfig`` fields as keywords.

    Example:
        >>> world = World(0, image_size=48)
        >>> scene = world.sample(1)[0]
        >>> scene.render().size
        (48, 48)
    """

    def __init__(self, seed: int, config: WorldConfig | None = None, **fields: object) -> None:
        if config is not None and fields:
            raise TypeError("pass either a WorldConfig or its fields, not both")
        self.seed = seed
        self.config = config if config is not None else WorldConfig(**fields)

    def sample(self, n: int, start: int = 0) -> list[Scene]:
        """Scenes with image ids ``start`` .. ``start + n - 1``."""
        return [self.scene(image_id) for image_id in range(start, start + n)]

    def scene(self, image_id: int) -> Scene:
        """The scene with id ``image_id``."""
        rng = random.Random(f"{self.seed}/scene/{image_id}")
        words = self._choose_words(rng)
        boxes = self._layout(rng, len(words))
        objects = sorted(
            (SceneObject(word, box) for word, box in zip(words, boxes)),
            key=lambda obj: (obj.bbox[0] + obj.bbox[2], obj.bbox[1] + obj.bbox[3]),
        )
        present = set(words)
        hallucinated = tuple(
            partner
            for head, partner in PAIRS
            if head in present and partner not in present and rng.random() < self.config.caption_bias
        )
        return Scene(image_id, self.config.image_size, tuple(objects), hallucinated)

    def _choose_words(self, rng: random.Random) -> list[str]:
        """Pick the scene's kinds so that P(partner | head) is exactly ``partner_rate``.

        A head is only drawn while two slots are free, so its partner coin is always honoured
        whatever it shows; a partner drawn on its own bars its head, so a partner never joins its
        head by any other route. Each draw takes a whole pair out of the pool.
        """
        slots = rng.randint(self.config.min_objects, self.config.max_objects)
        pool = [kind.word for kind in KINDS]
        chosen: list[str] = []
        while len(chosen) < slots:
            candidates = pool if slots - len(chosen) >= 2 else [w for w in pool if w not in PARTNER_OF]
            word = rng.choice(candidates)
            pool.remove(word)
            partner = PARTNER_OF.get(word)
            if partner is None:
                if HEAD_OF.get(word) in pool:
                    pool.remove(HEAD_OF[word])
                chosen.append(word)
            else:
                pool.remove(partner)
                chosen += [word, partner] if rng.random() < self.config.partner_rate else [word]
        return chosen

    def _layout(self, rng: random.Random, count: int) -> list[Box]:
        for _ in range(_LAYOUT_RESTARTS):
            boxes: list[Box] = []
            while len(boxes) < count:
                box = self._place(rng, boxes)
                if box is None:
                    break
                boxes.append(box)
            else:
                return boxes
        raise RuntimeError(f"could not place {count} objects; the config passed its fit check")

    def _place(self, rng: random.Random, boxes: list[Box]) -> Box | None:
        """A random box clear of ``boxes``; later tries allow only smaller sizes, to fit crowds."""
        cfg = self.config
        spread = cfg.max_object_size - cfg.min_object_size
        for attempt in range(_PLACE_TRIES):
            largest = cfg.max_object_size - spread * attempt // _PLACE_TRIES
            size = rng.randint(cfg.min_object_size, largest)
            x0 = rng.randint(0, cfg.image_size - size)
            y0 = rng.randint(0, cfg.image_size - size)
            box = (x0, y0, x0 + size, y0 + size)
            if all(_apart(box, other) for other in boxes):
                return box
        return None


def _apart(a: Box, b: Box) -> bool:
    """Whether two boxes are at least ``GAP`` pixels apart."""
    return a[2] + GAP <= b[0] or b[2] + GAP <= a[0] or a[3] + GAP <= b[1] or b[3] + GAP <= a[1]


# --- supervised pretraining stream --------------------------------------------------------------


class PretrainMix(BaseModel):
    """The mix of the supervised stream that teaches the demo model the world's biases.

    Args:
        caption_fraction: share of examples that ask for a description (target: the biased
            caption); the rest are yes/no questions.
        positive_fraction: share of questions about an object in the image (answer "Yes").
        lure_fraction: share of the other questions that ask about an absent partner of a
            present head, when the scene has one; the rest ask about a random absent kind.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    caption_fraction: float = Field(0.5, ge=0, le=1)
    positive_fraction: float = Field(0.5, ge=0, le=1)
    lure_fraction: float = Field(0.5, ge=0, le=1)


@dataclass(frozen=True)
class TrainingExample:
    """One supervised example: the scene (render it for the image), the prompt and the target."""

    scene: Scene
    prompt: str
    target: str


def pretraining_stream(
    scenes: Sequence[Scene], seed: int, mix: PretrainMix | None = None
) -> Iterator[TrainingExample]:
    """An endless, seeded stream of biased supervised examples over ``scenes``.

    Yes/no answers are biased like the captions: a question about a partner that the scene's
    biased caption names (``scene.hallucinated``) is answered "Yes" although it is absent.
    """
    if not scenes:
        raise UserError("the pretraining stream needs at least one scene")
    mix = mix or PretrainMix()
    rng = random.Random(f"{seed}/pretrain")
    while True:
        scene = rng.choice(scenes)
        if rng.random() < mix.caption_fraction:
            yield TrainingExample(scene, DESCRIBE_PROMPT, scene.biased_caption)
        else:
            yield _biased_question(scene, rng, mix)


def _biased_question(scene: Scene, rng: random.Random, mix: PretrainMix) -> TrainingExample:
    if rng.random() < mix.positive_fraction:
        word, yes = rng.choice(scene.words), True
    else:
        lures = scene.lures
        ask_lure = lures and rng.random() < mix.lure_fraction
        word = rng.choice(lures) if ask_lure else rng.choice(scene.absent)
        yes = word in scene.hallucinated
    return TrainingExample(scene, question(word), answer(word, yes))


# --- preference data (HA-DPO formats and the generic jsonl) -------------------------------------


def _scene_rng(seed: int, purpose: str, scene: Scene) -> random.Random:
    return random.Random(f"{seed}/{purpose}/{scene.image_id}")


def rejected_descriptions(scene: Scene, rng: random.Random) -> list[str]:
    """Descriptions with one hallucinated object each: one per lure, else one random absent kind.

    A lure is named right after its head (as the biased caption does), in place of another real
    object chosen at random; a random absent kind replaces a random object. A rejected
    description is thus as long as the faithful one: preferring the faithful one rewards naming
    the right objects, not naming fewer.
    """
    if scene.lures:
        rejected = []
        for lure in scene.lures:
            words = with_partners(scene.words, [lure])
            words.remove(rng.choice([w for w in scene.words if w != HEAD_OF[lure]]))
            rejected.append(describe(words))
        return rejected
    words = list(scene.words)
    words[rng.randrange(len(words))] = rng.choice(scene.absent)
    return [describe(words)]


def hadpo_desc_records(scenes: Iterable[Scene], seed: int) -> list[dict]:
    """``desc_data.json`` records (list form): the faithful description against hallucinated ones."""
    return [
        {
            "image_id": scene.image_id,
            "chosen": [scene.caption],
            "rejected": rejected_descriptions(scene, _scene_rng(seed, "desc", scene)),
        }
        for scene in scenes
    ]


def hadpo_pope_records(scenes: Iterable[Scene], seed: int) -> list[dict]:
    """``pope_data.json`` records: faithful yes/no answers against wrong ones.

    Per scene, one question per lure (else about one random absent kind), answered "No" (chosen)
    against "Yes" (reject), and as many questions about present objects, "Yes" against "No", so
    the pairs do not push the model towards always answering "No". ``answer`` is the true label;
    ``correct`` is false, as HA-DPO marks the pairs it trains on.
    """
    records = []
    for scene in scenes:
        rng = _scene_rng(seed, "pope", scene)
        negatives = list(scene.lures) or [rng.choice(scene.absent)]
        positives = rng.sample(scene.words, min(len(negatives), len(scene.words)))
        for word, present in [(w, True) for w in positives] + [(w, False) for w in negatives]:
            records.append(
                {
                    "image_id": scene.image_id,
                    "question": question(word),
                    "chosen": answer(word, present),
                    "reject": answer(word, not present),
                    "answer": "yes" if present else "no",
                    "correct": False,
                }
            )
    return records


def preference_records(desc: Iterable[dict], pope: Iterable[dict]) -> list[dict]:
    """The generic preference jsonl records ``{"image", "prompt", "chosen", "rejected"}``.

    Every chosen x rejected description pair, then every yes/no pair; ``image`` is the file name
    inside the image folder.
    """
    pairs = [
        (rec["image_id"], DESCRIBE_PROMPT, chosen, rejected)
        for rec in desc
        for chosen in rec["chosen"]
        for rejected in rec["rejected"]
    ]
    pairs += [(rec["image_id"], rec["question"], rec["chosen"], rec["reject"]) for rec in pope]
    return [
        {"image": image_filename(image_id), "prompt": prompt, "chosen": chosen, "rejected": rejected}
        for image_id, prompt, chosen, rejected in pairs
    ]


def object_records(scenes: Iterable[Scene]) -> list[dict]:
    """Object annotations ``{"image", "objects", "boxes"}`` (left to right) for POPE and CHAIR."""
    return [
        {
            "image": scene.filename,
            "objects": list(scene.words),
            "boxes": [list(obj.bbox) for obj in scene.objects],
        }
        for scene in scenes
    ]


# --- writing --------------------------------------------------------------------------------------


def _atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write through a temporary file in the same folder, then rename it into place."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        write(handle)


def write_json(path: str | Path, data: object) -> None:
    _atomic_write(Path(path), lambda f: f.write(json.dumps(data, indent=1).encode()))


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    _atomic_write(Path(path), lambda f: f.writelines(json.dumps(r).encode() + b"\n" for r in records))


def write_images(scenes: Sequence[Scene], vg_root: str | Path, progress: bool = False) -> Path:
    """Write PNGs as ``vg_root/VG_100K/<id>.png`` plus a Visual Genome style ``image_data.json``.

    Returns the image folder.
    """
    root = Path(vg_root)
    image_dir = root / IMAGE_SUBDIR
    for scene in tqdm(scenes, desc="images", disable=not progress):
        _atomic_write(image_dir / scene.filename, lambda f, s=scene: s.render().save(f, format="PNG"))
    index = [
        {
            "image_id": s.image_id,
            "url": f"{IMAGE_SUBDIR}/{s.filename}",
            "width": s.image_size,
            "height": s.image_size,
        }
        for s in scenes
    ]
    write_json(root / "image_data.json", index)
    return image_dir


@dataclass(frozen=True)
class ExportPaths:
    """Where :func:`export_dataset` put each file."""

    vg_root: Path
    image_dir: Path
    desc_data: Path
    pope_data: Path
    objects: Path
    preferences: Path
    synonyms: Path


def write_synonyms(path: str | Path) -> None:
    """A CHAIR synonym file of the world's object words (one object per line, no synonyms: the
    world names each kind one way), for scoring descriptions against ``objects.jsonl``."""
    _atomic_write(Path(path), lambda f: f.write("".join(f"{kind.word}\n" for kind in KINDS).encode()))


def export_dataset(
    scenes: Sequence[Scene], out_dir: str | Path, seed: int, progress: bool = False
) -> ExportPaths:
    """Write the images and all the data files the pipeline reads, under ``out_dir``.

    Layout: ``VG/image_data.json`` and ``VG/VG_100K/<id>.png``; ``hadpo/desc_data.json`` and
    ``hadpo/pope_data.json`` (HA-DPO list form); ``objects.jsonl`` (what ``eval pope build`` and
    ``eval chair --annotations`` read); ``chair_synonyms.txt``; ``preferences.jsonl``.
    """
    ids = [scene.image_id for scene in scenes]
    if len(set(ids)) != len(ids):
        raise UserError(f"scenes exported to {out_dir} must have distinct image ids")
    out = Path(out_dir)
    paths = ExportPaths(
        vg_root=out / "VG",
        image_dir=out / "VG" / IMAGE_SUBDIR,
        desc_data=out / "hadpo" / "desc_data.json",
        pope_data=out / "hadpo" / "pope_data.json",
        objects=out / "objects.jsonl",
        preferences=out / "preferences.jsonl",
        synonyms=out / "chair_synonyms.txt",
    )
    write_images(scenes, paths.vg_root, progress=progress)
    desc, pope = hadpo_desc_records(scenes, seed), hadpo_pope_records(scenes, seed)
    write_json(paths.desc_data, desc)
    write_json(paths.pope_data, pope)
    write_jsonl(paths.objects, object_records(scenes))
    write_jsonl(paths.preferences, preference_records(desc, pope))
    write_synonyms(paths.synonyms)
    return paths
