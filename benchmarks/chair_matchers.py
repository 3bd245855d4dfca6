"""How often CHAIR's builtin matcher finds other object mentions than the original script.

The original (OPERA's / LisaAnne/Hallucination's ``chair.py``) reads words with NLTK's
tokenizer, its perceptron POS tagger and WordNet's lemmatizer; this project's ``nltk`` matcher
reproduces it (``tests/test_chair_nltk.py``). Offline, two of NLTK's data packages are missing,
so this script measures with:

- the tokenizer: NLTK's word tokenizer over Punkt sentences, with Punkt's trained English
  parameters replaced by an untrained Punkt (it only decides where sentences end, i.e. whether
  a "." is split from the word before it);
- the tagger: not replaced by a guess, but bounded. A tag only picks the WordNet part of speech
  a token is lemmatized with (noun, verb, adjective, adverb), so for every caption the script
  runs the original on *every* combination of parts of speech of the tokens where that choice
  changes a lemma the matching can use, among the parts of speech WordNet knows the token in
  (noun always, as the original's fallback; "cars" is never lemmatized as a verb, "skiing" may
  be). A caption is "same for every tagging" when all
  combinations give the builtin matcher's mentions, "different for every tagging" when none
  does, else "depends on the tagger"; the real tagger's agreement lies in the range.

Two points inside that range are reported with the words behind their differences: every token
lemmatized as a noun (what the original does for tokens its tagger calls neither adjective, verb
nor adverb), and the tags of another Penn Treebank tagger, Lingua::EN::Tagger (Debian package
liblingua-en-tagger-perl), standing in for NLTK's perceptron tagger (its own tokenization is
aligned to NLTK's tokens; tokens it does not give back are lemmatized as nouns).

    .venv/bin/python benchmarks/chair_matchers.py [--json]     # ~1 min; needs nltk and WordNet
"""

from __future__ import annotations

import argparse
import difflib
import itertools
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = sorted((ROOT / "tests" / "data" / "chair").glob("opera_*.jsonl"))
SYNONYMS = ROOT / "tests" / "data" / "chair" / "synonyms.txt"
POS = ("n", "v", "a", "r")
WORDNET_POS = {"J": "a", "V": "v", "N": "n", "R": "r"}  # the original's tag -> lemmatizer part of speech
MAX_COMBINATIONS = 1 << 12


def lemmatizer():
    """WordNet's lemmatizer, installed from Debian's WordNet 3.0 when NLTK has none."""
    import nltk

    from mllm_pib.evaluation import chair_nltk

    if "wordnet" in chair_nltk.missing_data():
        root = Path(tempfile.mkdtemp(prefix="nltk_data."))
        chair_nltk.install_wordnet("/usr/share/wordnet", root)
        nltk.data.path.insert(0, str(root))
    from nltk.stem import WordNetLemmatizer

    lemmatize = WordNetLemmatizer().lemmatize
    cache: dict[tuple[str, str], str] = {}
    return lambda word, pos: cache.setdefault((word, pos), lemmatize(word, pos=pos))


def tokenizer():
    from nltk.tokenize import NLTKWordTokenizer, PunktSentenceTokenizer

    sentences, words = PunktSentenceTokenizer(), NLTKWordTokenizer()
    return lambda text: [t for s in sentences.tokenize(text) for t in words.tokenize(s)]


LINGUA = 'use Lingua::EN::Tagger; my $t = Lingua::EN::Tagger->new; while (<STDIN>) { chomp; print $t->add_tags($_), "\\n" }'


def lingua_tags(token_lists: list[list[str]]) -> list[list[str]] | None:
    """Penn Treebank tags from Lingua::EN::Tagger, one per given token ("NN" where its own
    tokenization does not give the token back); None when it is not installed."""
    if shutil.which("perl") is None:
        return None
    run = subprocess.run(["perl", "-e", LINGUA], input="".join(" ".join(t) + "\n" for t in token_lists),
                         capture_output=True, text=True)
    if run.returncode != 0:
        return None
    tagged = []
    for tokens, line in zip(token_lists, run.stdout.splitlines()):
        pairs = re.findall(r"<(\w+)>(.*?)</\1>", line)
        tags = ["NN"] * len(tokens)
        matcher = difflib.SequenceMatcher(a=tokens, b=[w for _, w in pairs], autojunk=False)
        for block in matcher.get_matching_blocks():
            for k in range(block.size):
                tags[block.a + k] = pairs[block.b + k][0].upper()
        tagged.append(tags)
    return tagged


def differences(ours: list[chair.Mention], theirs: list[chair.Mention], only_ours: Counter, only_theirs: Counter) -> bool:
    """Whether two readings find other objects; tallies the words each has alone."""
    if [m.object for m in ours] == [m.object for m in theirs]:
        return False
    only_ours.update((Counter(m.word for m in ours) - Counter(m.word for m in theirs)).elements())
    only_theirs.update((Counter(m.word for m in theirs) - Counter(m.word for m in ours)).elements())
    return True


def measure() -> dict:
    from nltk.corpus import wordnet

    from mllm_pib.evaluation import chair

    lemma, tokenize = lemmatizer(), tokenizer()
    current: list[str] = []
    original = chair.ChairVocabulary.from_file(SYNONYMS, "nltk", words=lambda text: current)
    builtin = chair.ChairVocabulary.from_file(SYNONYMS)
    usable = set(original.synonyms) | {w for pair in original.pairs for w in pair.split()} | {"toilet", "seat"}

    def read(lemmas: list[str]) -> list[chair.Mention]:
        current[:] = lemmas
        return original.mentions("")

    captions = [json.loads(line)["caption"] for path in CAPTIONS for line in path.open()]
    token_lists = [tokenize(c.lower()) for c in captions]
    penn = lingua_tags(token_lists)
    status: Counter = Counter()
    points = {name: {"differing_captions": 0, "mentions": 0, "only_builtin": Counter(), "only_original": Counter()}
              for name in ("all_nouns", "lingua_tagger") if name == "all_nouns" or penn is not None}
    builtin_mentions = 0
    deciding: Counter = Counter()
    for index, (caption, tokens) in enumerate(zip(captions, token_lists)):
        ours = builtin.mentions(caption)
        builtin_mentions += len(ours)
        options = [list(dict.fromkeys(lemma(t, p) for p in POS if p == "n" or wordnet.morphy(t, p))) for t in tokens]
        readings = {"all_nouns": [opts[0] for opts in options]}
        if penn is not None:
            readings["lingua_tagger"] = [lemma(t, WORDNET_POS.get(tag[:1], "n")) for t, tag in zip(tokens, penn[index])]
        for name, lemmas in readings.items():
            theirs, point = read(lemmas), points[name]
            point["mentions"] += len(theirs)
            point["differing_captions"] += differences(ours, theirs, point["only_builtin"], point["only_original"])
        free = [i for i, opts in enumerate(options) if len(opts) > 1 and usable & set(opts)]
        nouns = [m.object for m in read(readings["all_nouns"])]
        for i in free:  # the tokens whose tag alone changes the original's objects
            for value in options[i][1:]:
                if [m.object for m in read(readings["all_nouns"][:i] + [value] + readings["all_nouns"][i + 1:])] != nouns:
                    deciding[f"{tokens[i]} -> {value}"] += 1
        if len(list(itertools.islice(itertools.product(*(options[i] for i in free)), MAX_COMBINATIONS + 1))) > MAX_COMBINATIONS:
            status["too_many_taggings"] += 1
            continue
        outcomes = set()
        for choice in itertools.product(*(options[i] for i in free)):
            lemmas = [opts[0] for opts in options]
            for i, value in zip(free, choice):
                lemmas[i] = value
            outcomes.add([m.object for m in read(lemmas)] == [m.object for m in ours])
        status["same_for_every_tagging" if outcomes == {True} else "different_for_every_tagging" if outcomes == {False} else "depends_on_tagger"] += 1
    n = len(captions)
    return {
        "captions": n,
        "builtin_mentions": builtin_mentions,
        **{k: status[k] for k in ("same_for_every_tagging", "different_for_every_tagging", "depends_on_tagger", "too_many_taggings")},
        "tags_that_decide": dict(deciding.most_common()),
        "agreement_range_percent": [
            round(100 * status["same_for_every_tagging"] / n, 2),
            round(100 * (n - status["different_for_every_tagging"]) / n, 2),
        ],
        **{
            name: {
                "agreement_percent": round(100 * (n - point["differing_captions"]) / n, 2),
                "differing_captions": point["differing_captions"],
                "original_mentions": point["mentions"],
                "words_only_builtin": dict(point["only_builtin"].most_common(25)),
                "words_only_original": dict(point["only_original"].most_common(25)),
            }
            for name, point in points.items()
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    result = measure()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
