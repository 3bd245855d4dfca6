"""Web demo: the base model's and the PIB model's answers about an uploaded image, side by side.

Object words in the answers are marked against what is known about the image, found by the
uploaded file's name (without extension) in

- object annotations (``--annotations``: JSON lines of ``{"image", "objects"}`` or COCO
  ``instances_*.json``): they list every object of the image, so a mentioned object that they
  lack is marked as not in the image;
- POPE questions (``--pope-questions``, labelled ``{"image", "text", "label"}`` records): "yes"
  objects are in the image, "no" objects are not; other objects stay unmarked.

Object words are found as CHAIR finds them (:class:`~mllm_pib.evaluation.chair.ChairVocabulary`:
COCO names and their synonyms, plurals, two-word names), extended by the annotated names that
are no COCO object (names of up to two words).

The page is built with Gradio (the ``ui`` extra); :class:`Demo` holds everything it does, so
the logic runs without a browser.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mllm_pib.chat import BASE, PIB, Chat, DecodingOptions, read_image
from mllm_pib.errors import UserError
from mllm_pib.evaluation.chair import ChairVocabulary, singularize
from mllm_pib.evaluation.shr import DESCRIBE_PROMPT

if TYPE_CHECKING:
    import gradio as gr
    from PIL import Image

HALLUCINATED = "not in image"
CONFIRMED = "in image"
COLOR_MAP = {HALLUCINATED: "red", CONFIRMED: "green"}
ASK = "Ask a question"
MAX_UPLOAD = "50mb"  # Gradio refuses larger uploads; images are further limited in pixels when decoded
DESCRIBE = "Describe the image"
# CHAIR's word rule (letters/digits, hyphenated words whole), matched on the original text so
# that the spans index it.
WORD = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*", re.IGNORECASE | re.ASCII)
POPE_QUESTION = re.compile(r"^is there (?:a|an) (.+?) in the (?:image|picture)\s*\?*$", re.IGNORECASE)

Segments = list[tuple[str, str | None]]  # HighlightedText value: (text, label or None)


# ---------------------------------------------------------------------------- known objects


@dataclass(frozen=True)
class KnownObjects:
    """What is known about one image's objects (canonical names).

    Attributes:
        present: objects known to be in the image.
        absent: objects known not to be in it.
        complete: ``present`` lists every object, so any other object is absent.
        sources: where the knowledge comes from, for the page.
    """

    present: frozenset[str]
    absent: frozenset[str]
    complete: bool
    sources: tuple[str, ...]

    def label(self, obj: str) -> str | None:
        if obj in self.absent or (self.complete and obj not in self.present):
            return HALLUCINATED
        return CONFIRMED if obj in self.present else None


@dataclass(frozen=True)
class ObjectSpan:
    start: int
    end: int
    word: str  # as read: lower case, singular
    object: str  # canonical name


@dataclass
class _Facts:
    """Raw object names collected for one image."""

    present: set[str]
    absent: set[str]
    complete: bool
    sources: list[str]


class ObjectIndex:
    """Known objects per image name, and the vocabulary that finds object words in answers."""

    def __init__(self, vocab: ChairVocabulary, images: dict[str, KnownObjects]):
        self.vocab = vocab
        self.images = images

    @classmethod
    def load(cls, annotations: str | Path | None = None, pope_questions: str | Path | None = None) -> ObjectIndex:
        """Read object annotations and/or labelled POPE questions (errors name file and record)."""
        facts: dict[str, _Facts] = defaultdict(lambda: _Facts(set(), set(), False, []))
        if annotations is not None:
            _add_annotations(facts, annotations)
        if pope_questions is not None:
            _add_pope_questions(facts, pope_questions)
        names = {name for f in facts.values() for name in f.present | f.absent}
        vocab = extended_vocabulary(ChairVocabulary.from_file(), names)
        images = {
            key: KnownObjects(
                present=frozenset(canonical(vocab, n) for n in f.present),
                absent=frozenset(canonical(vocab, n) for n in f.absent),
                complete=f.complete,
                sources=tuple(dict.fromkeys(f.sources)),
            )
            for key, f in facts.items()
        }
        return cls(vocab, images)

    def lookup(self, file_name: str) -> KnownObjects | None:
        """What is known about the image of this file name (matched without directory and extension)."""
        return self.images.get(image_key(file_name))

    def spans(self, text: str) -> list[ObjectSpan]:
        """Object words of ``text`` with their character spans, read with CHAIR's rules (two-word
        names, special pairs; ``seat`` is no object when a toilet is mentioned)."""
        words = [(m.start(), m.end(), singularize(m.group().lower())) for m in WORD.finditer(text)]
        spans, i = [], 0
        while i < len(words):
            pair = " ".join(w[2] for w in words[i : i + 2])
            width = 2 if i + 1 < len(words) and pair in self.vocab.pairs else 1
            name = self.vocab.pairs[pair] if width == 2 else words[i][2]
            if name in self.vocab.synonyms:
                spans.append(ObjectSpan(words[i][0], words[i + width - 1][1], name, self.vocab.synonyms[name]))
            i += width
        if any(s.word == "toilet" for s in spans):
            spans = [s for s in spans if s.word != "seat"]
        return spans

    def mark(self, text: str, known: KnownObjects | None) -> Segments:
        """``text`` cut into segments, object words labelled by what ``known`` says of them."""
        segments: Segments = []
        at = 0
        for span in self.spans(text) if known is not None else []:
            label = known.label(span.object)
            if label is not None:
                segments += [(text[at : span.start], None), (text[span.start : span.end], label)]
                at = span.end
        segments.append((text[at:], None))
        return [s for s in segments if s[0]]


def image_key(name: str) -> str:
    return Path(name).stem


def normalise_name(name: str) -> str:
    """An object name as CHAIR reads it: lower case, singular words."""
    return " ".join(singularize(w.lower()) for w in WORD.findall(name))


def canonical(vocab: ChairVocabulary, name: str) -> str:
    """The canonical object of an annotated name: its COCO object when it is a synonym or a phrase
    naming exactly one COCO object (``wooden chair``), else the name itself."""
    key = normalise_name(name)
    if key in vocab.synonyms:
        return vocab.synonyms[key]
    found = {m.object for m in vocab.mentions(key)}
    return found.pop() if len(found) == 1 else key


def extended_vocabulary(vocab: ChairVocabulary, names: set[str]) -> ChairVocabulary:
    """``vocab`` plus every annotated name that it cannot map to an object, as its own object."""
    extra = {}
    for name in names:
        key = normalise_name(name)
        if key and key not in vocab.synonyms and len({m.object for m in vocab.mentions(key)}) != 1:
            extra[key] = key
    return ChairVocabulary({**vocab.synonyms, **extra}) if extra else vocab


def _add_annotations(facts: dict[str, _Facts], path: str | Path) -> None:
    from mllm_pib.evaluation.pope import load_object_images

    for image in load_object_images(path):
        entry = facts[image_key(image.image)]
        entry.present.update(image.objects)
        entry.complete = True
        entry.sources.append("object annotations")


def _add_pope_questions(facts: dict[str, _Facts], path: str | Path) -> None:
    from mllm_pib.evaluation.pope import load_questions

    for question in load_questions(path):
        found = POPE_QUESTION.match(question.text.strip())
        if found is None:
            raise UserError(
                f"{path} question {question.question_id}: cannot find the object in {question.text!r}; "
                "POPE questions read 'Is there a/an OBJECT in the image?'"
            )
        entry = facts[image_key(question.image)]
        (entry.present if question.label == "yes" else entry.absent).add(found.group(1))
        entry.sources.append("POPE questions")


# ---------------------------------------------------------------------------- the demo


@dataclass(frozen=True)
class Response:
    """What the page shows after a request: a status line and both answers."""

    status: str
    base: Segments
    pib: Segments


class Demo:
    """Answers requests from the page with the PIB model and its base.

    Args:
        model: a :class:`~mllm_pib.model.PIBModel` with a trained block.
        options: decoding options.
        objects: known objects per image, to mark object words; ``None`` marks nothing.
    """

    def __init__(self, model, options: DecodingOptions, objects: ObjectIndex | None = None):
        self.model = model
        self.options = options
        self.objects = objects

    def preview(self, file: str | None) -> tuple[Image.Image | None, str]:
        """The uploaded image for display, or an error status."""
        if file is None:
            return None, ""
        try:
            return read_image(file), ""
        except UserError as err:
            return None, error_status(err, file)

    def respond(self, file: str | None, mode: str, prompt: str | None) -> Response:
        """Both answers to the request; bad input gives an error status and no answers."""
        try:
            if file is None:
                raise UserError("upload an image first")
            question = DESCRIBE_PROMPT if mode == DESCRIBE else prompt
            reply = Chat(self.model, read_image(file), self.options, (BASE, PIB)).ask(question)
        except UserError as err:
            return Response(error_status(err, file), [], [])
        known = self.objects.lookup(Path(file).name) if self.objects is not None else None
        return Response(
            self.objects_status(Path(file).name, known),
            self.mark(reply.answers[BASE], known),
            self.mark(reply.answers[PIB], known),
        )

    def mark(self, text: str, known: KnownObjects | None) -> Segments:
        if self.objects is None:
            return [(text, None)] if text else []
        return self.objects.mark(text, known)

    def objects_status(self, name: str, known: KnownObjects | None) -> str:
        if self.objects is None:
            return ""
        if known is None:
            return markdown_escape(f"No annotations or POPE questions name {name}: object words are not checked.")
        absent = sorted(known.absent) + (["every other object"] if known.complete else [])
        return markdown_escape(
            f"Object words checked against the {' and '.join(known.sources)} of {name}. "
            f"In the image: {', '.join(sorted(known.present)) or 'nothing known'}. "
            f"Not in the image: {', '.join(absent) or 'nothing known'}."
        )


def error_status(err: Exception, file: str | None) -> str:
    """An error for the page; the upload's temporary directory is left out of file names."""
    message = str(err)
    if file is not None:
        message = message.replace(str(Path(file)), Path(file).name)
    return f"**Error:** {markdown_escape(message)}"


def markdown_escape(text: str) -> str:
    return re.sub(r"([\\`*_{}\[\]<>()#+\-.!|~])", r"\\\1", text)


# ---------------------------------------------------------------------------- the page


def build_app(demo: Demo, title: str = "mllm-pib: base model vs PIB") -> gr.Blocks:
    """The Gradio page: upload, task, prompt; the two answers side by side."""
    import gradio as gr

    def respond(file, mode, prompt):
        response = demo.respond(file, mode, prompt)
        return response.status, response.base, response.pib

    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(f"## {title}")
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Image", file_count="single", type="filepath", elem_id="image-file")
                preview = gr.Image(label="Preview", interactive=False, height=240, elem_id="preview")
                mode = gr.Radio([ASK, DESCRIBE], value=ASK, label="Task", elem_id="mode")
                prompt = gr.Textbox(label="Question (for \"Ask a question\")", lines=2, max_lines=6, elem_id="prompt")
                submit = gr.Button("Submit", variant="primary", elem_id="submit")
            with gr.Column(scale=2):
                status = gr.Markdown(elem_id="status")
                with gr.Row():
                    answers = [
                        gr.HighlightedText(label=label, color_map=COLOR_MAP, show_legend=demo.objects is not None,
                                           elem_id=elem_id)
                        for label, elem_id in (("Base model", "answer-base"), ("With PIB", "answer-pib"))
                    ]
        upload.change(demo.preview, upload, [preview, status])
        for event in (submit.click, prompt.submit):
            event(respond, [upload, mode, prompt], [status, *answers])
    return app


def serve(app: gr.Blocks, host: str, port: int) -> None:
    """Serve the page until interrupted."""
    try:
        app.launch(server_name=host, server_port=port, ssr_mode=False, share=False, max_file_size=MAX_UPLOAD)
    except OSError:
        raise UserError(
            f"cannot serve on {host}:{port}: the port is taken or the address cannot be bound; "
            "choose another --port or --host"
        ) from None
