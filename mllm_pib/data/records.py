"""Readers of preference data: HA-DPO's ``desc_data.json`` and ``pope_data.json``, and a generic
JSON-lines format ``{"image", "prompt", "chosen", "rejected"}``.

Every reader yields :class:`PreferencePair` records that remember their file and index, so a
bad record can be reported precisely. Bad records are counted against a
:class:`BadRecordBudget`: reported, skipped, and past the budget the run stops. A record holding
bytes that are not UTF-8 is one bad record, not a bad file; so is an image path that leads
outside the image root (see :mod:`mllm_pib.data.images`).
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mllm_pib.data.images import ImageOutsideRoot, ImageResolver
from mllm_pib.errors import UserError
from mllm_pib.io import read_json, read_text
from mllm_pib.log import get_logger
from mllm_pib.ranks import is_first

logger = get_logger(__name__)

# HA-DPO draws the description prompt from a small set of instructions.
DESCRIPTION_PROMPTS = (
    "Describe this image in detail.",
    "Describe this image.",
    "Provide a detailed description of the given image.",
    "Give an elaborate explanation of the image you see.",
    "Write a detailed description of the given image.",
    "Can you describe the main features of this image for me?",
)


@dataclass(frozen=True)
class PreferencePair:
    """One (image, prompt, chosen, rejected) example and where it came from."""

    image: Path
    prompt: str
    chosen: str
    rejected: str
    source: str
    index: int
    pair_id: str

    @property
    def where(self) -> str:
        return f"{self.source} record {self.index}"


@dataclass
class BadRecordBudget:
    """Counts skipped records; more than ``limit`` stops the run with a clear error."""

    limit: int
    skipped: list[tuple[str, int, str]] = field(default_factory=list)
    # records a reader leaves out by design (not bad, not counted against the limit): (source, reason) -> count
    left_out: Counter = field(default_factory=Counter)

    def skip(self, source: str, index: int | str, reason: str) -> None:
        self.skipped.append((source, index, reason))
        if is_first():  # every process reads the same data: one report
            logger.warning(f"skipping {source} record {index}: {reason}")
        if len(self.skipped) > self.limit:
            raise UserError(
                f"{len(self.skipped)} bad records, more than max_bad_records={self.limit}; the last: "
                f"{source} record {index}: {reason}. Fix the data or raise max_bad_records."
            )

    def summary(self) -> str:
        if not self.skipped:
            return "no records skipped"
        reasons = Counter(reason.split(":")[0] for _, _, reason in self.skipped)
        parts = ", ".join(f"{count} {reason}" for reason, count in reasons.most_common())
        return f"{len(self.skipped)} records skipped ({parts})"


def read_desc_data(path: str | Path, images: ImageResolver, budget: BadRecordBudget, seed: int = 0) -> Iterator[PreferencePair]:
    """HA-DPO description pairs: the dict form ``{image_id: {"chosen", "rejected"}}`` (LLaVA) or
    the list form ``[{"image_id", "chosen", "rejected"}]``; every chosen x rejected pair is used."""
    data = read_json(path, errors="surrogateescape")
    if isinstance(data, dict):
        entries = [({"image_id": key, **value} if isinstance(value, dict) else value) for key, value in data.items()]
    elif isinstance(data, list):
        entries = data
    else:
        raise UserError(f"{path}: expected a JSON object or array of description records")
    for index, entry in enumerate(entries):
        fields = _fields(entry, {"image_id": (str, int), "chosen": list, "rejected": list}, path, index, budget)
        if fields is None:
            continue
        image_id, chosen, rejected = fields
        if not (_strings(chosen) and _strings(rejected)):
            budget.skip(str(path), index, "wrong type: chosen and rejected must be lists of strings")
            continue
        image = _image(images, image_id, "image_id", path, index, budget)
        if image is None:
            continue
        prompt = random.Random(f"{seed}:{image_id}").choice(DESCRIPTION_PROMPTS)
        for i, good in enumerate(chosen):
            for j, bad in enumerate(rejected):
                yield PreferencePair(image, prompt, good, bad, str(path), index, f"desc:{image_id}:{i}:{j}")


def read_pope_data(path: str | Path, images: ImageResolver, budget: BadRecordBudget, skip_correct: bool = True) -> Iterator[PreferencePair]:
    """HA-DPO yes/no pairs ``{"image_id", "question", "chosen", "reject"|"rejected", "correct"}``;
    records the model already answered correctly are skipped (as HA-DPO does for LLaVA)."""
    data = read_json(path, errors="surrogateescape")
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON array of POPE preference records")
    for index, entry in enumerate(data):
        if isinstance(entry, dict) and "rejected" not in entry and "reject" in entry:
            entry = {**entry, "rejected": entry["reject"]}
        fields = _fields(entry, {"image_id": (str, int), "question": str, "chosen": str, "rejected": str}, path, index, budget)
        if fields is None:
            continue
        if skip_correct and entry.get("correct") is True:
            budget.left_out[(str(path), "marked correct: true")] += 1
            continue
        image_id, question, chosen, rejected = fields
        image = _image(images, image_id, "image_id", path, index, budget)
        if image is not None:
            yield PreferencePair(image, question, chosen, rejected, str(path), index, f"pope:{image_id}:{index}")


def read_generic(path: str | Path, images: ImageResolver, budget: BadRecordBudget) -> Iterator[PreferencePair]:
    """JSON lines ``{"image", "prompt", "chosen", "rejected"}``; ``image`` relative to the image root."""
    for index, entry in _json_lines(path, budget):
        fields = _fields(entry, {"image": str, "prompt": str, "chosen": str, "rejected": str}, path, index, budget)
        if fields is None:
            continue
        name, prompt, chosen, rejected = fields
        image = _image(images, name, "image", path, index, budget)
        if image is not None:
            yield PreferencePair(image, prompt, chosen, rejected, str(path), index, f"generic:{index}")


READERS = {"desc": read_desc_data, "pope": read_pope_data, "generic": read_generic}


def _json_lines(path, budget: BadRecordBudget) -> Iterator[tuple[int, object]]:
    """(record index, parsed value) per non-blank line; unparseable lines count as bad records."""
    index = 0
    for line in read_text(path, errors="surrogateescape").split("\n"):
        if not line.strip():
            continue
        try:
            yield index, json.loads(line)
        except json.JSONDecodeError as err:
            budget.skip(str(path), index, f"malformed JSON: {err.msg} (column {err.colno})")
        index += 1


def _image(images: ImageResolver, name, field: str, path, index, budget) -> Path | None:
    """The image file a record names, or ``None`` (a skip) when it leads outside the image root."""
    try:
        return images(name)
    except ImageOutsideRoot as err:
        budget.skip(str(path), index, f"image outside the image root: field {field!r}: {err}")
        return None


# what "surrogateescape" decoding makes of bytes that are not UTF-8 (and what a JSON "\udcXX" escape gives)
NOT_UTF8 = re.compile("[\udc80-\udcff]")


def _not_utf8(value) -> str | None:
    """The first string of a parsed record (keys included) holding bytes that are not UTF-8."""
    if isinstance(value, str):
        return value if NOT_UTF8.search(value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _not_utf8(key) or _not_utf8(item)
        if found is not None:
            return found
    return None


def _fields(entry, names: dict[str, type | tuple[type, ...]], path, index, budget) -> tuple | None:
    if not isinstance(entry, dict):
        budget.skip(str(path), index, f"wrong type: expected an object, got {type(entry).__name__}")
        return None
    bad_text = _not_utf8(entry)
    if bad_text is not None:
        at = NOT_UTF8.search(bad_text)
        byte = ord(at.group()) - 0xDC00
        budget.skip(str(path), index, f"not UTF-8: byte 0x{byte:02x} in the text {bad_text[:at.start()][-20:]!r}…")
        return None
    missing = [name for name in names if entry.get(name) is None]
    if missing:
        budget.skip(str(path), index, f"missing field: {', '.join(missing)}")
        return None
    wrong = [f"{name} is {type(entry[name]).__name__}" for name, kind in names.items() if not _is(entry[name], kind)]
    if wrong:
        budget.skip(str(path), index, f"wrong type: {', '.join(wrong)}")
        return None
    return tuple(entry[name] for name in names)


def _is(value, kind) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)  # JSON true is not an id


def _strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)
