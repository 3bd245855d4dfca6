"""CHAIR: object hallucination in image descriptions, measured against COCO objects.

For each description, the COCO object words it mentions are found through a synonym list
(``synonyms.txt``: one object per line, comma-separated, the first entry is the canonical
name); a mention is hallucinated when its object is not in the image's ground truth, which is
the image's COCO instance categories united with the objects named in its human captions.

- ``CHAIR_s`` = descriptions with at least one hallucinated mention / descriptions;
- ``CHAIR_i`` = hallucinated mentions / all mentions (every mention counts, repeats included);
- ``recall``  = sum over descriptions of |mentioned objects ∩ ground truth| / sum of
  |ground truth| (how much of the annotated content the descriptions cover).

Word handling follows the original CHAIR script (Rohrbach et al., 2018) with these rules:

1. Lower-case, split into words (letters/digits, hyphenated words kept whole), singularise
   each word with :func:`singularize` (rule-based, no downloaded corpora).
2. Two consecutive words are read as one name when they form a two-word synonym
   (``traffic light``, ``hot dog``, ``teddy bear``, ``dining table``…) or one of the special
   pairs: ``home plate`` and ``train track`` (not a train), ``baby``/``adult`` + an animal
   word (``bird cat dog horse sheep cow elephant bear zebra giraffe animal cub``: the animal,
   not a person), ``passenger jet``/``passenger train`` (the vehicle, not a person),
   ``bow tie`` (a tie) and ``toilet seat`` (a toilet).
3. When a description mentions both ``toilet`` and ``seat``, ``seat`` is dropped (the seat of
   a toilet is not a chair).

Deliberate differences from the original script: synonym entries are stripped of spaces (the
original keeps ``" motor bike"`` and ``" cheesecake"`` with a leading space, so they never
match); ``scissors`` and ``sports`` stay as they are instead of losing their ``s``; names of
three words (``stove top oven``) are read word by word, as the original's two-word joining
does in effect.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mllm_pib.errors import UserError
from mllm_pib.io import read_json_records, read_text

ANIMAL_WORDS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")
SPECIAL_PAIRS = {
    "home plate": "home plate",
    "train track": "train track",
    "passenger jet": "jet",
    "passenger train": "train",
    "bow tie": "tie",
    "toilet seat": "toilet",
    **{f"{qualifier} {animal}": animal for qualifier in ("baby", "adult") for animal in ANIMAL_WORDS},
}
DEFAULT_SYNONYMS = Path(__file__).with_name("coco_synonyms.txt")
_WORD = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")

# ---------------------------------------------------------------------------- singularisation

_IRREGULAR = {
    "men": "man", "children": "child", "mice": "mouse", "geese": "goose", "teeth": "tooth", "feet": "foot",
    "oxen": "ox", "lice": "louse", "dice": "die", "cacti": "cactus", "fungi": "fungus", "octopi": "octopus",
    "criteria": "criterion", "phenomena": "phenomenon", "knives": "knife", "wives": "wife", "lives": "life",
    "leaves": "leaf", "shelves": "shelf", "halves": "half", "calves": "calf", "wolves": "wolf", "loaves": "loaf",
    "scarves": "scarf", "hooves": "hoof", "thieves": "thief", "elves": "elf", "selves": "self", "tvs": "tv",
    "skis": "ski", "taxis": "taxi", "kiwis": "kiwi", "bikinis": "bikini", "menus": "menu", "emus": "emu",
    "lenses": "lens", "gases": "gas", "quizzes": "quiz",
}  # fmt: skip
# words that end like plurals but are not, or are their own plural
_INVARIANT = frozenset(
    {
        "people", "police", "cattle", "sheep", "deer", "fish", "bison", "moose", "aircraft", "series",
        "species", "scissors", "pants", "jeans", "news", "sports", "alias", "atlas", "canvas", "christmas",
        "pajamas", "pyjamas", "whereas", "overseas", "bias", "chaos", "kudos", "this", "his", "yes", "thus",
        "plus",
    }
)  # fmt: skip
# nouns ending in "ie" whose plural would otherwise become "...y"
_IE_NOUNS = frozenset(
    {
        "collie", "cookie", "movie", "hoodie", "goalie", "zombie", "brownie", "selfie", "smoothie", "rookie",
        "calorie", "pixie", "necktie",
    }
)  # fmt: skip
# nouns ending in "o" whose plural takes "es"
_O_ES_NOUNS = frozenset(
    {
        "tomato", "potato", "hero", "echo", "mango", "mosquito", "volcano", "torpedo", "buffalo", "domino",
        "tornado", "cargo",
    }
)  # fmt: skip
_NOT_PLURAL_MEN = frozenset({"amen", "omen", "semen", "specimen", "abdomen", "stamen", "regimen", "ramen"})


def singularize(word: str) -> str:
    """Singular of a lower-case English word, by rules plus an exceptions table.

    Covers the plurals that matter for COCO object names (``knives``, ``buses``, ``skis``,
    ``ponies``, ``glasses``, ``policemen``, ``children``, ``mice``…); words that are not
    plurals come back unchanged when they end in ``ss``, ``us`` or ``is``.
    """
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if word in _INVARIANT or len(word) <= 3:
        return word
    if word.endswith("children"):
        return word[: -len("ren")]
    if word.endswith("men") and word not in _NOT_PLURAL_MEN:
        return word[: -len("men")] + "man"
    if not word.endswith("s") or word.endswith(("ss", "us", "is")):
        return word
    if word.endswith("ies"):
        return word[:-1] if word[:-1] in _IE_NOUNS or len(word) == 4 else word[:-3] + "y"
    if word.endswith(("ches", "shes", "sses", "xes", "zzes", "buses")) or word[:-2] in _O_ES_NOUNS:
        return word[:-2]
    return word[:-1]


# ---------------------------------------------------------------------------- vocabulary


@dataclass(frozen=True)
class Mention:
    """One object mention: the (singularised) words as read, and its canonical object."""

    word: str
    object: str


class ChairVocabulary:
    """COCO object names and synonyms, with the two-word names that are read as one word.

    Args:
        synonyms: ``{name: canonical object}`` for every name (see :func:`load_synonyms`).
    """

    def __init__(self, synonyms: Mapping[str, str]):
        self.synonyms = dict(synonyms)
        pairs = {name: name for name in self.synonyms if len(name.split()) == 2}
        self.pairs = {**pairs, **SPECIAL_PAIRS}

    @classmethod
    def from_file(cls, path: str | Path | None = None) -> ChairVocabulary:
        """The vocabulary of a synonym file; by default the COCO list shipped with this package
        (the original CHAIR ``synonyms.txt``)."""
        return cls(load_synonyms(DEFAULT_SYNONYMS if path is None else path))

    def mentions(self, text: str) -> list[Mention]:
        """The COCO object mentions of ``text``, in order (rules in the module docstring)."""
        words = [singularize(w) for w in _WORD.findall(text.lower())]
        joined, i = [], 0
        while i < len(words):
            pair = " ".join(words[i : i + 2])
            if i + 1 < len(words) and pair in self.pairs:
                joined.append(self.pairs[pair])
                i += 2
            else:
                joined.append(words[i])
                i += 1
        if "toilet" in joined and "seat" in joined:
            joined = [w for w in joined if w != "seat"]
        return [Mention(w, self.synonyms[w]) for w in joined if w in self.synonyms]

    def canonical(self, name: str, where: str) -> str:
        """The canonical object of an annotation's object ``name`` (a synonym or a phrase that
        mentions exactly one object)."""
        key = " ".join(name.lower().split())
        if key in self.synonyms:
            return self.synonyms[key]
        found = {m.object for m in self.mentions(key)}
        if len(found) != 1:
            raise UserError(f"{where}: object {name!r} is not a COCO object or synonym of one")
        return found.pop()


def load_synonyms(path: str | Path) -> dict[str, str]:
    """``{name: canonical}`` from a CHAIR synonym file: one object per line, comma-separated
    names, the first being the canonical one. A name listed under two objects is an error."""
    synonyms: dict[str, str] = {}
    for lineno, line in enumerate(read_text(path).split("\n"), start=1):
        names = [" ".join(n.split()) for n in line.lower().split(",")]
        names = [n for n in names if n]
        for name in names:
            if synonyms.get(name, names[0]) != names[0]:
                raise UserError(f"{path}:{lineno}: {name!r} is already a synonym of {synonyms[name]!r}")
            synonyms[name] = names[0]
    if not synonyms:
        raise UserError(f"{path}: no synonyms")
    return synonyms


# ---------------------------------------------------------------------------- ground truth


def load_ground_truth(paths: Iterable[str | Path], vocab: ChairVocabulary) -> dict[int, set[str]]:
    """Ground-truth objects per COCO image id.

    ``paths`` may name a directory (every ``instances_*.json`` and ``captions_*.json`` in it),
    COCO instance or caption annotation files, or JSON-lines files of
    ``{"image_id", "objects": [names]}``. Objects from all of them are united per image; an
    image listed in an instances file without annotations has no objects.
    """
    truth: dict[int, set[str]] = {}
    for path in annotation_files(paths):
        for image_id, objects in _file_objects(path, vocab):
            truth.setdefault(image_id, set()).update(objects)
    return truth


def annotation_files(paths: Iterable[str | Path]) -> list[Path]:
    """The annotation files ``paths`` name (a directory: its instances and captions files)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(path.glob("instances_*.json")) + sorted(path.glob("captions_*.json"))
            if not found:
                raise UserError(f"{path}: no instances_*.json or captions_*.json annotation files")
            files.extend(found)
        else:
            files.append(path)
    return files


def _file_objects(path: Path, vocab: ChairVocabulary) -> Iterable[tuple[int, list[str]]]:
    text = read_text(path)
    if path.suffix != ".jsonl" and text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # several objects: JSON lines
        if isinstance(data, dict) and isinstance(data.get("annotations"), list):
            return _coco_objects(data, path, vocab)
    return _simple_objects(path, vocab)


def _coco_objects(data: dict, path: Path, vocab: ChairVocabulary) -> list[tuple[int, list[str]]]:
    out = [(_int(img.get("id"), f"{path} image {i} 'id'"), []) for i, img in enumerate(data.get("images", []))]
    if "categories" in data:
        names = {
            _int(c.get("id"), f"{path} category {i} 'id'"): vocab.canonical(str(c.get("name")), f"{path} category {i}")
            for i, c in enumerate(data["categories"])
        }
        for i, ann in enumerate(data["annotations"]):
            if ann.get("category_id") not in names:
                raise UserError(f"{path} annotation {i}: unknown category_id {ann.get('category_id')!r}")
            out.append((_int(ann.get("image_id"), f"{path} annotation {i} 'image_id'"), [names[ann["category_id"]]]))
    else:
        for i, ann in enumerate(data["annotations"]):
            if not isinstance(ann.get("caption"), str):
                raise UserError(f"{path} annotation {i}: neither instances ('categories') nor a 'caption' string")
            objects = [m.object for m in vocab.mentions(ann["caption"])]
            out.append((_int(ann.get("image_id"), f"{path} annotation {i} 'image_id'"), objects))
    return out


def _simple_objects(path: Path, vocab: ChairVocabulary) -> list[tuple[int, list[str]]]:
    out = []
    for i, record in enumerate(read_json_records(path)):
        where = f"{path} record {i + 1}"
        objects = record.get("objects")
        if not isinstance(objects, list) or not all(isinstance(o, str) for o in objects):
            raise UserError(f"{where}: 'objects' must be a list of object names")
        out.append((_int(record.get("image_id"), f"{where} 'image_id'"), [vocab.canonical(o, where) for o in objects]))
    return out


def _int(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{where}: expected an integer image id, got {value!r}")
    return value


# ---------------------------------------------------------------------------- scoring


@dataclass
class CaptionResult:
    """CHAIR details of one description."""

    image_id: int
    caption: str
    mentions: list[Mention]
    hallucinated: list[Mention]
    ground_truth: list[str]

    def to_dict(self) -> dict:
        return {
            "image_id": self.image_id,
            "caption": self.caption,
            "mentioned": [[m.word, m.object] for m in self.mentions],
            "hallucinated": [[m.word, m.object] for m in self.hallucinated],
            "ground_truth": self.ground_truth,
        }


@dataclass
class ChairReport:
    """Overall CHAIR metrics (fractions) and per-description details."""

    chair_s: float
    chair_i: float
    recall: float
    captions: int
    mentions: int
    hallucinated_mentions: int
    per_caption: list[CaptionResult] = field(repr=False)

    def to_dict(self, per_caption: bool = True) -> dict:
        out = {
            k: getattr(self, k)
            for k in ("chair_s", "chair_i", "recall", "captions", "mentions", "hallucinated_mentions")
        }
        if per_caption:
            out["per_caption"] = [c.to_dict() for c in self.per_caption]
        return out


def load_captions(path: str | Path) -> list[tuple[int, str]]:
    """``(image_id, caption)`` pairs from JSON lines or a JSON array of ``{"image_id", "caption"}``."""
    pairs = []
    for i, record in enumerate(read_json_records(path)):
        where = f"{path} record {i + 1}"
        if not isinstance(record.get("caption"), str):
            raise UserError(f"{where}: field 'caption' must be a string")
        pairs.append((_int(record.get("image_id"), f"{where} 'image_id'"), record["caption"]))
    if not pairs:
        raise UserError(f"{path}: no captions")
    return pairs


def evaluate(captions: list[tuple[int, str]], truth: Mapping[int, set[str]], vocab: ChairVocabulary) -> ChairReport:
    """CHAIR of ``captions`` against ``truth``; every described image must be annotated."""
    unknown = sorted({image_id for image_id, _ in captions if image_id not in truth})
    if unknown:
        raise UserError(
            f"{len(unknown)} described images have no annotations (e.g. image ids {unknown[:5]}); "
            "the annotations must cover every image_id of the captions"
        )
    results = []
    for image_id, caption in captions:
        gt = truth[image_id]
        mentions = vocab.mentions(caption)
        hallucinated = [m for m in mentions if m.object not in gt]
        results.append(CaptionResult(image_id, caption, mentions, hallucinated, sorted(gt)))
    n_mentions = sum(len(r.mentions) for r in results)
    n_hallucinated = sum(len(r.hallucinated) for r in results)
    covered = sum(len({m.object for m in r.mentions} & set(r.ground_truth)) for r in results)
    total_truth = sum(len(r.ground_truth) for r in results)
    return ChairReport(
        chair_s=sum(bool(r.hallucinated) for r in results) / len(results) if results else 0.0,
        chair_i=n_hallucinated / n_mentions if n_mentions else 0.0,
        recall=covered / total_truth if total_truth else 0.0,
        captions=len(results),
        mentions=n_mentions,
        hallucinated_mentions=n_hallucinated,
        per_caption=results,
    )
