"""CHAIR: object hallucination in image descriptions, measured against COCO objects.

For each description, the COCO object words it mentions are found through a synonym list
(``synonyms.txt``: one object per line, comma-separated, the first entry is the canonical
name); a mention is hallucinated when its object is not in the image's ground truth, which is
the image's COCO instance categories united with the objects named in its human captions.

- ``CHAIR_s`` = descriptions with at least one hallucinated mention / descriptions;
- ``CHAIR_i`` = hallucinated mentions / all mentions (every mention counts, repeats included);
- ``recall``  = sum over descriptions of |mentioned objects ∩ ground truth| / sum of
  |ground truth| (how much of the annotated content the descriptions cover).

Words are read by one of two matchers (recorded in every report):

- ``nltk``: the original CHAIR script's reading (NLTK tokenizer, POS tagger, WordNet lemmatizer;
  :mod:`mllm_pib.evaluation.chair_nltk`), with the synonym file read as the script reads it
  (names split on ", ", case kept), so its mentions are the script's;
- ``builtin`` (default, no downloaded data): lower-case, split into words (letters/digits,
  hyphenated words kept whole), singularise each word with :func:`singularize` (rule-based).
  Its measured differences from the original are listed in ``docs/evaluation.md``.

Then, for both, as in the original script:

1. Two consecutive words are read as one name when they form a two-word synonym
   (``traffic light``, ``hot dog``, ``teddy bear``, ``dining table``…) or one of the special
   pairs: ``home plate`` and ``train track`` (not a train), ``baby``/``adult`` + an animal
   word (``bird cat dog horse sheep cow elephant bear zebra giraffe animal cub``: the animal,
   not a person), ``passenger jet``/``passenger train`` (the vehicle, not a person),
   ``bow tie`` (a tie) and ``toilet seat`` (a toilet).
2. When a description mentions both ``toilet`` and ``seat``, ``seat`` is dropped (the seat of
   a toilet is not a chair).

The builtin matcher's vocabulary also deliberately differs from the original script's:
synonym entries are stripped of spaces and lower-cased (the original keeps ``" motor bike"`` and
``" cheesecake"`` with a leading space and ``"iPhone"`` capitalised, so they never match a
lower-cased caption); ``scissors`` and ``sports`` stay as they are; names of three words
(``stove top oven``) are read word by word, as the original's two-word joining does in effect.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
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
MATCHERS = ("builtin", "nltk")
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


def builtin_words(text: str) -> list[str]:
    """The builtin matcher's words of ``text``: lower-cased word tokens, singularised."""
    return [singularize(w) for w in _WORD.findall(text.lower())]


# ---------------------------------------------------------------------------- vocabulary


@dataclass(frozen=True)
class Mention:
    """One object mention: the (singularised) words as read, and its canonical object."""

    word: str
    object: str


class ChairVocabulary:
    """COCO object names and synonyms, the two-word names read as one word, and the matcher
    that turns a text into words.

    Args:
        synonyms: ``{name: canonical object}`` for every name (see :func:`load_synonyms`).
        matcher: ``builtin`` or ``nltk`` (see the module docstring).
        words: the text-to-words function; by default the matcher's own.
    """

    def __init__(
        self,
        synonyms: Mapping[str, str],
        matcher: str = "builtin",
        words: Callable[[str], list[str]] | None = None,
    ):
        if matcher not in MATCHERS:
            raise UserError(f"unknown CHAIR matcher {matcher!r}; expected one of {MATCHERS}")
        self.matcher = matcher
        self.synonyms = dict(synonyms)
        pairs = {key: key for key in (" ".join(name.lower().split()) for name in self.synonyms) if key.count(" ") == 1}
        self.pairs = {**pairs, **SPECIAL_PAIRS}
        if words is None and matcher == "nltk":
            from mllm_pib.evaluation.chair_nltk import NltkWords

            words = NltkWords()
        self.words = words or builtin_words

    @classmethod
    def from_file(cls, path: str | Path | None = None, matcher: str = "builtin", **kwargs) -> ChairVocabulary:
        """The vocabulary of a synonym file (by default the COCO list shipped with this package,
        the original CHAIR ``synonyms.txt``), read as the matcher reads it."""
        return cls(load_synonyms(DEFAULT_SYNONYMS if path is None else path, exact=matcher == "nltk"), matcher, **kwargs)

    def mentions(self, text: str) -> list[Mention]:
        """The COCO object mentions of ``text``, in order (rules in the module docstring)."""
        words = self.words(text)
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


def load_synonyms(path: str | Path, exact: bool = False) -> dict[str, str]:
    """``{name: canonical}`` from a CHAIR synonym file: one object per line, comma-separated
    names, the first being the canonical one. A name listed under two objects is an error.

    Args:
        exact: read names as the original script does (split on ``", "``, spaces and case
            kept, so ``" motor bike"`` and ``"iPhone"`` never match a lower-cased caption);
            by default names are lower-cased and their spaces normalised.
    """
    synonyms: dict[str, str] = {}
    for lineno, line in enumerate(read_text(path).split("\n"), start=1):
        if exact:
            names = [n for n in line.strip().split(", ") if n]
        else:
            names = [n for n in (" ".join(n.split()) for n in line.lower().split(",")) if n]
        for name in names:
            if synonyms.get(name, names[0]) != names[0]:
                raise UserError(f"{path}:{lineno}: {name!r} is already a synonym of {synonyms[name]!r}")
            synonyms[name] = names[0]
    if not synonyms:
        raise UserError(f"{path}: no synonyms")
    return synonyms


# ---------------------------------------------------------------------------- ground truth


@dataclass
class Annotations:
    """Ground truth of the annotated images: ``objects`` (canonical objects per image id) and,
    where the annotations name them, the image ``files`` (file name per image id)."""

    objects: dict[int, set[str]] = field(default_factory=dict)
    files: dict[int, str] = field(default_factory=dict)

    def add(self, image_id: int, objects: Iterable[str], file: str | None, where: str) -> None:
        self.objects.setdefault(image_id, set()).update(objects)
        if file is not None:
            if self.files.setdefault(image_id, file) != file:
                raise UserError(f"{where}: image id {image_id} is both {self.files[image_id]!r} and {file!r}")


def load_annotations(paths: Iterable[str | Path], vocab: ChairVocabulary) -> Annotations:
    """Ground-truth objects per image id, united over ``paths``.

    ``paths`` may name a directory (every ``instances_*.json`` and ``captions_*.json`` in it),
    COCO instance or caption annotation files, or JSON lines (or a JSON array) of
    ``{"image_id", "objects": [names]}`` or ``{"image": file name, "objects"}`` (the object
    files ``eval pope build`` reads, whose image id is the number ending the file name:
    ``COCO_val2014_000000310196.jpg`` is 310196). An image listed in an instances file without
    annotations has no objects.
    """
    annotations = Annotations()
    for path in annotation_files(paths):
        _read_annotation_file(path, vocab, annotations)
    return annotations


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


def _read_annotation_file(path: Path, vocab: ChairVocabulary, out: Annotations) -> None:
    text = read_text(path)
    if path.suffix != ".jsonl" and text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # several objects: JSON lines
        if isinstance(data, dict) and isinstance(data.get("annotations"), list):
            return _coco_objects(data, path, vocab, out)
    return _simple_objects(path, vocab, out)


def _coco_objects(data: dict, path: Path, vocab: ChairVocabulary, out: Annotations) -> None:
    for i, img in enumerate(data.get("images", [])):
        where = f"{path} image {i}"
        name = img.get("file_name")
        out.add(_int(img.get("id"), f"{where} 'id'"), [], name if isinstance(name, str) else None, where)
    if "categories" in data:
        names = {
            _int(c.get("id"), f"{path} category {i} 'id'"): vocab.canonical(str(c.get("name")), f"{path} category {i}")
            for i, c in enumerate(data["categories"])
        }
        for i, ann in enumerate(data["annotations"]):
            if ann.get("category_id") not in names:
                raise UserError(f"{path} annotation {i}: unknown category_id {ann.get('category_id')!r}")
            where = f"{path} annotation {i}"
            out.add(_int(ann.get("image_id"), f"{where} 'image_id'"), [names[ann["category_id"]]], None, where)
    else:
        for i, ann in enumerate(data["annotations"]):
            where = f"{path} annotation {i}"
            if not isinstance(ann.get("caption"), str):
                raise UserError(f"{where}: neither instances ('categories') nor a 'caption' string")
            objects = [m.object for m in vocab.mentions(ann["caption"])]
            out.add(_int(ann.get("image_id"), f"{where} 'image_id'"), objects, None, where)


def _simple_objects(path: Path, vocab: ChairVocabulary, out: Annotations) -> None:
    for i, record in enumerate(read_json_records(path)):
        where = f"{path} record {i + 1}"
        objects = record.get("objects")
        if not isinstance(objects, list) or not all(isinstance(o, str) for o in objects):
            raise UserError(f"{where}: 'objects' must be a list of object names")
        file = record.get("image")
        if "image_id" in record or not isinstance(file, str):
            image_id = _int(record.get("image_id"), f"{where} 'image_id'")
        else:
            image_id = image_id_of(file, where)
        out.add(image_id, [vocab.canonical(o, where) for o in objects], file if isinstance(file, str) else None, where)


def image_id_of(file_name: str, where: str) -> int:
    """The image id a file name ends with (``COCO_val2014_000000310196.jpg`` -> 310196)."""
    digits = re.search(r"(\d+)$", Path(file_name).stem)
    if digits is None:
        raise UserError(f"{where}: no 'image_id', and the image name {file_name!r} does not end in a number")
    return int(digits.group(1))


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
    """Overall CHAIR metrics (fractions), the matcher that read the words, and per-description
    details."""

    chair_s: float
    chair_i: float
    recall: float
    captions: int
    mentions: int
    hallucinated_mentions: int
    matcher: str
    per_caption: list[CaptionResult] = field(repr=False)

    def to_dict(self, per_caption: bool = True) -> dict:
        out = {
            k: getattr(self, k)
            for k in ("chair_s", "chair_i", "recall", "captions", "mentions", "hallucinated_mentions", "matcher")
        }
        if per_caption:
            out["per_caption"] = [c.to_dict() for c in self.per_caption]
        return out


def load_captions(path: str | Path) -> list[tuple[int, str]]:
    """``(image_id, caption)`` pairs from JSON lines or a JSON array of ``{"image_id",
    "caption"}`` (OPERA's and CHAIR's files) or ``{"question_id", "text"}`` (the descriptions
    files this project writes, keyed by image id)."""
    pairs = []
    for i, record in enumerate(read_json_records(path)):
        where = f"{path} record {i + 1}"
        caption = _one_of(record, ("caption", "text"), where)
        if not isinstance(caption, str):
            raise UserError(f"{where}: the description must be a string, got {caption!r}")
        pairs.append((_int(_one_of(record, ("image_id", "question_id"), where), f"{where} image id"), caption))
    if not pairs:
        raise UserError(f"{path}: no captions")
    return pairs


def _one_of(record: dict, names: tuple[str, str], where: str):
    """The value of whichever of two equivalent fields the record has (both only if equal)."""
    present = [name for name in names if name in record]
    if not present:
        raise UserError(f"{where}: needs a {names[0]!r} (or {names[1]!r}) field")
    if len(present) == 2 and record[names[0]] != record[names[1]]:
        raise UserError(f"{where}: fields {names[0]!r} and {names[1]!r} differ; keep one")
    return record[present[0]]


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
        matcher=vocab.matcher,
        per_caption=results,
    )
