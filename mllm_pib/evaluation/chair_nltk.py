"""CHAIR's original word reading, through NLTK.

The CHAIR script as OPERA and later papers run it (LisaAnne/Hallucination's ``chair.py`` with
NLTK in place of ``pattern``) reads a description as: lower-case it, ``nltk.word_tokenize``,
``nltk.pos_tag``, then ``WordNetLemmatizer.lemmatize`` each token with the WordNet part of speech
of its tag (adjective ``J*``, verb ``V*``, noun ``N*``, adverb ``R*``; anything else as a noun).
So "skiing" tagged as a verb becomes "ski", "men" stays "men" and "vases" becomes "vas".

It needs the optional ``nltk`` package (``pip install 'mllm-pib[chair]'``) and three NLTK data
packages: the Punkt sentence splitter (``punkt_tab``), the perceptron POS tagger
(``averaged_perceptron_tagger_eng``) and WordNet (``wordnet``). :func:`install_wordnet` builds
the WordNet package from a WordNet 3.0 database folder such as Debian's ``wordnet-base`` +
``wordnet-sense-index`` (``/usr/share/wordnet``), for machines that cannot download it.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Callable
from pathlib import Path

from mllm_pib.errors import UserError
from mllm_pib.io import atomic_directory

# NLTK data package -> the resource path NLTK looks it up by
DATA_PACKAGES = {
    "punkt_tab": "tokenizers/punkt_tab/english/",
    "averaged_perceptron_tagger_eng": "taggers/averaged_perceptron_tagger_eng/",
    "wordnet": "corpora/wordnet",
}
DOWNLOAD_COMMAND = "python -m nltk.downloader " + " ".join(DATA_PACKAGES)
_WORDNET_POS = {"J": "a", "V": "v", "N": "n", "R": "r"}


def missing_data() -> list[str]:
    """The NLTK data packages the matcher needs that NLTK cannot find (all of them without
    the ``nltk`` package, which is reported as ``nltk``)."""
    try:
        import nltk
    except ImportError:
        return ["nltk"]
    missing = []
    for package, resource in DATA_PACKAGES.items():
        try:
            nltk.data.find(resource)
        except LookupError:
            missing.append(package)
    return missing


def missing_message(missing: list[str]) -> str:
    """What is missing for the NLTK matcher, and the commands that install it."""
    if missing == ["nltk"]:
        return "CHAIR's nltk matcher needs the nltk package: pip install 'mllm-pib[chair]'"
    return (
        f"CHAIR's nltk matcher needs the NLTK data package(s) {', '.join(missing)}, not found in "
        f"NLTK's data path; install them with: {DOWNLOAD_COMMAND} (offline, WordNet alone: "
        "mllm-pib eval chair wordnet --source /usr/share/wordnet)"
    )


class NltkWords:
    """Callable turning a text into the original script's word list (see the module docstring).

    Args:
        tokenize: the tokenizer (default ``nltk.word_tokenize``).
        tag: the POS tagger of a token list (default ``nltk.pos_tag``).

    Raises:
        UserError: when nltk or one of the data packages the defaults use is missing.
    """

    def __init__(
        self,
        tokenize: Callable[[str], list[str]] | None = None,
        tag: Callable[[list[str]], list[tuple[str, str]]] | None = None,
    ):
        needed = {"nltk", "wordnet"} | ({"punkt_tab"} if tokenize is None else set())
        needed |= {"averaged_perceptron_tagger_eng"} if tag is None else set()
        missing = [m for m in missing_data() if m in needed]
        if missing:
            raise UserError(missing_message(missing))
        import nltk
        from nltk.stem import WordNetLemmatizer

        self.tokenize = tokenize or nltk.word_tokenize
        self.tag = tag or nltk.pos_tag
        # a description repeats few distinct words: WordNet's morphology once per (word, tag)
        self.lemmatize = functools.lru_cache(maxsize=1 << 16)(WordNetLemmatizer().lemmatize)

    def __call__(self, text: str) -> list[str]:
        tagged = self.tag(self.tokenize(text.lower()))
        return [self.lemmatize(word, pos=_WORDNET_POS.get(tag[:1], "n")) for word, tag in tagged]


# The lexicographer files of WordNet 3.0 (its ``lexnames`` file, which NLTK reads and Debian's
# packages do not ship): number = position, syntactic category from the prefix.
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
    "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
    "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()
_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
WORDNET_FILES = tuple(
    f"{kind}.{pos}" for kind in ("data", "index") for pos in ("noun", "verb", "adj", "adv")
) + ("noun.exc", "verb.exc", "adj.exc", "adv.exc", "index.sense")


def install_wordnet(source: str | Path, nltk_data: str | Path) -> Path:
    """Copy a WordNet 3.0 database folder into ``nltk_data/corpora/wordnet`` (plus the
    ``lexnames`` file it may lack) so NLTK's WordNet reader finds it; returns that folder.

    Raises:
        UserError: when ``source`` lacks a database file, or is not WordNet 3.0.
    """
    source = Path(source)
    missing = [name for name in WORDNET_FILES if not (source / name).is_file()]
    if missing:
        raise UserError(
            f"{source}: not a WordNet 3.0 database folder, missing {', '.join(missing)} "
            "(Debian: apt-get install wordnet-base wordnet-sense-index)"
        )
    if "WordNet 3.0 Copyright" not in (source / "data.adj").read_text(encoding="latin-1")[:5000]:
        raise UserError(f"{source}/data.adj: not WordNet 3.0 (CHAIR's lemmas are WordNet 3.0's)")
    target = Path(nltk_data) / "corpora" / "wordnet"
    if target.exists() and any(target.iterdir()):
        raise UserError(f"{target} already exists; NLTK reads it as it is (remove it to install again)")
    with atomic_directory(target) as tmp:
        for name in WORDNET_FILES:
            shutil.copyfile(source / name, tmp / name)
        lines = (f"{i:02d}\t{name}\t{_CATEGORY[name.split('.')[0]]}\n" for i, name in enumerate(LEXNAMES))
        (tmp / "lexnames").write_text("".join(lines), encoding="utf-8")
    return target
