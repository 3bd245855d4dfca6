"""CHAIR's nltk matcher against an independent re-implementation of the original script's word
reading (OPERA's ``chair.py``, itself LisaAnne/Hallucination's with NLTK in place of
``pattern``), on OPERA's 1,500 real LLaVA-1.5 captions.

The full comparison needs nltk with its punkt_tab, averaged_perceptron_tagger_eng and wordnet
data; where only WordNet is there (Debian's wordnet-base + wordnet-sense-index install it
offline), the same comparison runs with a stand-in tokenizer and tagger given to both sides, so
everything but NLTK's two data-driven components is still checked against the original.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest

from mllm_pib.cli import main
from mllm_pib.errors import UserError
from mllm_pib.evaluation import chair

nltk = pytest.importorskip("nltk", reason="the nltk package is missing: pip install 'mllm-pib[chair]'")

from mllm_pib.evaluation import chair_nltk  # noqa: E402  (needs nltk)

DATA = Path(__file__).parent / "data" / "chair"
OPERA = ["opera_llava-1.5_beam5.jsonl", "opera_llava-1.5_greedy.jsonl", "opera_llava-1.5_ours.jsonl"]
DEBIAN_WORDNET = Path("/usr/share/wordnet")


def opera_captions(names: list[str] = OPERA) -> list[str]:
    return [json.loads(line)["caption"] for name in names for line in (DATA / name).open()]


# ---------------------------------------------------------------- the original, re-implemented

# the script's hard-coded two-word names and qualifiers, as it lists them
ORIGINAL_DOUBLE_WORDS = (
    "motor bike, motor cycle, air plane, traffic light, street light, traffic signal, stop light, fire hydrant, "
    "stop sign, parking meter, suit case, sports ball, baseball bat, baseball glove, tennis racket, wine glass, "
    "hot dog, cell phone, mobile phone, teddy bear, hair drier, potted plant, bow tie, laptop computer, "
    "stove top oven, hot dog, teddy bear, home plate, train track"
).split(", ")
ORIGINAL_ANIMALS = "bird cat dog horse sheep cow elephant bear zebra giraffe animal cub".split()


class OriginalChairWords:
    """The original ``caption_to_words`` up to the COCO node words, with its tokenizer, tagger
    and lemmatizer passed in: lemmas by the tag's first letter (J adjective, V verb, N noun, R
    adverb, anything else noun); hard-coded double words joined left to right; "seat" dropped
    when "toilet" is there; words kept when in the synonym file as split on ", "."""

    def __init__(self, synonyms_text: str, tokenize, tag, lemmatize):
        self.tokenize, self.tag, self.lemmatize = tokenize, tag, lemmatize
        self.objects: set[str] = set()
        self.node: dict[str, str] = {}
        for row in (line.strip().split(", ") for line in synonyms_text.splitlines()):
            self.objects.update(row)
            for name in row:
                self.node[name] = row[0]
        self.doubles = {w: w for w in ORIGINAL_DOUBLE_WORDS}
        for animal in ORIGINAL_ANIMALS:
            self.doubles["baby " + animal] = animal
            self.doubles["adult " + animal] = animal
        for vehicle in ("jet", "train"):
            self.doubles["passenger " + vehicle] = vehicle
        self.doubles.update({"bow tie": "tie", "toilet seat": "toilet", "wine glas": "wine glass"})

    def node_words(self, caption: str) -> list[str]:
        wordnet_pos = {"J": "a", "V": "v", "N": "n", "R": "r"}
        tagged = self.tag(self.tokenize(caption.lower()))
        words = [self.lemmatize(word, pos=wordnet_pos.get(t[0], "n") if t else "n") for word, t in tagged]
        joined: list[str] = []
        skip_next = False
        for word, following in zip(words, [*words[1:], None]):
            if skip_next:  # the second word of a double word just joined
                skip_next = False
                continue
            double = f"{word} {following}"
            skip_next = following is not None and double in self.doubles
            joined.append(self.doubles[double] if skip_next else word)
        if "toilet" in joined and "seat" in joined:
            joined = [w for w in joined if w != "seat"]
        return [self.node[w] for w in joined if w in self.objects]


# ---------------------------------------------------------------- NLTK data


@pytest.fixture(scope="module")
def wordnet_lemmatize(tmp_path_factory):
    """WordNet's lemmatizer: from NLTK's data path, else installed from Debian's WordNet 3.0."""
    if "wordnet" in chair_nltk.missing_data():
        files = [name for name in chair_nltk.WORDNET_FILES if not (DEBIAN_WORDNET / name).is_file()]
        if files:
            pytest.skip(
                f"WordNet 3.0 is missing: NLTK finds no 'wordnet' data and {DEBIAN_WORDNET} lacks {', '.join(files)} "
                "(python -m nltk.downloader wordnet, or apt-get install wordnet-base wordnet-sense-index)"
            )
        root = tmp_path_factory.mktemp("nltk_data")
        chair_nltk.install_wordnet(DEBIAN_WORDNET, root)
        nltk.data.path.insert(0, str(root))
    from nltk.stem import WordNetLemmatizer

    return functools.lru_cache(maxsize=None)(WordNetLemmatizer().lemmatize)


@functools.lru_cache(maxsize=None)
def _tokenizers():
    from nltk.tokenize import NLTKWordTokenizer, PunktSentenceTokenizer

    return PunktSentenceTokenizer(), NLTKWordTokenizer()


@functools.lru_cache(maxsize=None)
def _stand_in_tokens(text: str) -> tuple[str, ...]:
    sentences, words = _tokenizers()
    return tuple(token for sentence in sentences.tokenize(text) for token in words.tokenize(sentence))


def stand_in_tokenize(text: str) -> list[str]:
    """NLTK's word tokenizer over Punkt sentences, with Punkt's English parameters (not
    available offline) replaced by an untrained Punkt (cached: both sides tokenize alike)."""
    return list(_stand_in_tokens(text))


def stand_in_tag(tokens: list[str]) -> list[tuple[str, str]]:
    """A suffix tagger standing in for the perceptron tagger: it sends words through every
    lemmatizer part of speech (verbs, adverbs, adjectives, nouns, and punctuation)."""
    def tag(token: str) -> str:
        if not token[:1].isalpha():
            return "."
        for suffix, t in (("ing", "VBG"), ("ed", "VBD"), ("ly", "RB"), ("ful", "JJ"), ("ous", "JJ"), ("s", "NNS")):
            if token.endswith(suffix):
                return t
        return "NN"

    return [(token, tag(token)) for token in tokens]


def test_nltk_matcher_equals_the_original_on_opera_captions_with_wordnet(wordnet_lemmatize):
    captions = opera_captions(["opera_llava-1.5_greedy.jsonl"])  # 500 (all 1,500: benchmarks/chair_matchers.py)
    synonyms = (DATA / "synonyms.txt").read_text()
    original = OriginalChairWords(synonyms, stand_in_tokenize, stand_in_tag, wordnet_lemmatize)
    words = chair_nltk.NltkWords(tokenize=stand_in_tokenize, tag=stand_in_tag)
    vocab = chair.ChairVocabulary.from_file(DATA / "synonyms.txt", "nltk", words=words)
    got = [[m.object for m in vocab.mentions(c)] for c in captions]
    expected = [original.node_words(c) for c in captions]
    assert len(captions) == 500 and sum(map(len, expected)) > 3000
    assert got == expected
    # the tags matter on these captions ("skiing" as a verb is "ski": skis), so they were checked
    nouns = OriginalChairWords(synonyms, stand_in_tokenize, lambda ts: [(t, "NN") for t in ts], wordnet_lemmatize)
    assert sum(nouns.node_words(c) != e for c, e in zip(captions, expected)) >= 3


def test_nltk_matcher_equals_the_original_with_nltk_data(wordnet_lemmatize):
    missing = chair_nltk.missing_data()
    if missing:
        pytest.skip(chair_nltk.missing_message(missing))
    captions = opera_captions()
    original = OriginalChairWords((DATA / "synonyms.txt").read_text(), nltk.word_tokenize, nltk.pos_tag, wordnet_lemmatize)
    vocab = chair.ChairVocabulary.from_file(DATA / "synonyms.txt", "nltk")
    assert [[m.object for m in vocab.mentions(c)] for c in captions] == [original.node_words(c) for c in captions]


def test_the_original_quirks_hold_in_the_nltk_matcher(wordnet_lemmatize):
    """What the original reads differently from the builtin matcher, on single phrases."""
    words = chair_nltk.NltkWords(tokenize=stand_in_tokenize, tag=stand_in_tag)
    nltk_vocab = chair.ChairVocabulary.from_file(None, "nltk", words=words)
    builtin = chair.ChairVocabulary.from_file()
    cases = {  # text: (original, builtin)
        "two men": ([], ["person"]),  # WordNet keeps "men"
        "three vases": ([], ["vase"]),  # WordNet's noun lemma is "vas"
        "a man skiing": (["person", "skis"], ["person"]),  # the verb lemma is "ski"
        "a cat/dog bed": (["bed"], ["cat", "dog", "bed"]),  # one token "cat/dog"
        "an iPhone": ([], ["cell phone"]),  # "iPhone" in the file never meets a lower-cased word
        "a motor bike": ([], ["motorcycle"]),  # " motor bike" with its leading space
        "a cheesecake": ([], ["cake"]),
    }
    for text, (original, ours) in cases.items():
        assert [m.object for m in nltk_vocab.mentions(text)] == original, text
        assert [m.object for m in builtin.mentions(text)] == ours, text


def test_missing_nltk_data_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    assert chair_nltk.missing_data() == list(chair_nltk.DATA_PACKAGES)
    captions = tmp_path / "c.jsonl"
    captions.write_text(json.dumps({"image_id": 1, "caption": "A dog."}) + "\n")
    objects = tmp_path / "o.jsonl"
    objects.write_text(json.dumps({"image_id": 1, "objects": ["dog"]}) + "\n")
    code = main(["eval", "chair", "--captions", str(captions), "--annotations", str(objects), "--matcher", "nltk"])
    err = capsys.readouterr().err
    assert code == 2
    assert "punkt_tab, averaged_perceptron_tagger_eng, wordnet" in err and chair_nltk.DOWNLOAD_COMMAND in err


def test_install_wordnet_refuses_incomplete_or_existing_folders(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "data.noun").write_text("x")
    with pytest.raises(UserError, match=r"not a WordNet 3.0 database folder, missing data.verb"):
        chair_nltk.install_wordnet(source, tmp_path / "nltk_data")
    if not all((DEBIAN_WORDNET / name).is_file() for name in chair_nltk.WORDNET_FILES):
        return
    target = chair_nltk.install_wordnet(DEBIAN_WORDNET, tmp_path / "nltk_data")
    assert (target / "lexnames").read_text().splitlines()[5] == "05\tnoun.animal\t1"
    assert sorted(p.name for p in target.iterdir()) == sorted([*chair_nltk.WORDNET_FILES, "lexnames"])
    with pytest.raises(UserError, match="already exists"):
        chair_nltk.install_wordnet(DEBIAN_WORDNET, tmp_path / "nltk_data")
    shutil.rmtree(target)
