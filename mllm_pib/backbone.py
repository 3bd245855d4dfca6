"""The contract every backbone plugin implements.

A backbone is a frozen multimodal LLM cut in two at the place where the post-interaction block
goes: everything up to and including the decoder's final norm (``encode_vision`` +
``lm_forward``), and the vocabulary projection (``lm_head``). The core composes them as::

    vision = backbone.encode_vision(**vision_inputs)
    hidden = backbone.lm_forward(backbone.embed(input_ids), vision, attention_mask,
                                 image_mask=input_ids == backbone.image_token_id).hidden
    logits = backbone.lm_head(pib(hidden, vision.pib, vision.pib_mask))

Every built-in backbone puts its visual tokens into the LLM input the same way: the prompt
holds one placeholder token per visual token and the decoder input embeddings at those positions
are replaced by the visual embeddings (an image may give its own number of them: anyres tiles,
dynamic resolution). :class:`DecoderBackbone` implements that once; a plugin only supplies the
pieces that differ (vision encoder, template, processor). Models that publish a chat template
and a processor build on :class:`mllm_pib.processor_backbone.ProcessorBackbone`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar, Iterable, Sequence

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache

from mllm_pib.spec import BackboneSpec  # noqa: F401  (re-exported: plugins import it from here too)


@dataclass
class VisionFeatures:
    """What one batch of images gives the model.

    Images of one batch may give different numbers of tokens (anyres tiles, dynamic
    resolution, image splitting): the tensors are then padded to the batch's largest count and
    a mask says which entries are real.

    Attributes:
        pib: ``[B, N, Dv]`` the features the post-interaction block attends to.
        llm: ``[B, M, H]`` the visual token embeddings placed into the LLM input (``None`` when
            read back from a feature cache, where the LLM has already run).
        pib_mask: optional ``[B, N]`` bool mask of valid ``pib`` tokens (``None``: all valid).
        llm_mask: optional ``[B, M]`` bool mask of valid ``llm`` embeddings (``None``: all
            valid); image ``b``'s valid embeddings fill, in order, the placeholders of row ``b``.
        extra: per-image tensors (first dimension ``B``) that the backbone's own
            :meth:`Backbone.lm_forward` needs besides the embeddings (e.g. each image's patch grid
            for 3-D rotary positions); mapped with the others.
        rows: optional ``[R]`` image index of each row of a text batch whose rows share images
            (a preference pair's two answers): the block then aligns and projects each image
            once (``vision_index`` of :class:`~mllm_pib.block.PostInteractionBlock`). ``None``:
            text row ``b`` reads image ``b``.
    """

    pib: torch.Tensor
    llm: torch.Tensor | None
    pib_mask: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    llm_mask: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "VisionFeatures":
        """Apply ``fn`` to every per-image tensor (indexing, repeating, moving); ``rows`` is kept."""
        keep = lambda t: None if t is None else fn(t)  # noqa: E731
        return replace(
            self, pib=fn(self.pib), llm=keep(self.llm), pib_mask=keep(self.pib_mask), llm_mask=keep(self.llm_mask),
            extra={name: fn(t) for name, t in self.extra.items()},
        )

    def repeat_interleave(self, n: int) -> "VisionFeatures":
        """Fan each image out to ``n`` consecutive rows (several answers, beams)."""
        return self.map(lambda t: t.repeat_interleave(n, dim=0))


@dataclass
class LMOutput:
    """Final hidden states (after the decoder's final norm) and the decoder's KV cache."""

    hidden: torch.Tensor
    cache: Cache | None = None


class Backbone(nn.Module):
    """Abstract backbone. Subclasses set the attributes and implement the methods below.

    Attributes:
        name: registry name of the backbone (``"llava"``).
        tokenizer: a ``PreTrainedTokenizerBase``.
        image_token_id: id of the placeholder token marking visual-token positions.
        pib_vision_size: ``Dv``, width of :attr:`VisionFeatures.pib`.
        hidden_size: ``H``, width of the decoder's hidden states.
        feature: which vision features the PIB reads (backbone-specific option name).
        model_id: identity of the base weights (a path or hub id), recorded in checkpoints.
    """

    name: ClassVar[str] = ""
    feature_choices: ClassVar[tuple[str, ...]] = ()

    tokenizer: Any
    image_token_id: int
    pib_vision_size: int
    hidden_size: int
    feature: str
    model_id: str

    # --- vision -----------------------------------------------------------------------------
    def preprocess(self, images: list, questions: list[str]) -> dict[str, torch.Tensor]:
        """Turn PIL images (and the questions, for backbones whose vision side reads the
        instruction) into the keyword arguments of :meth:`encode_vision`."""
        raise NotImplementedError

    def encode_vision(self, pixel_values: torch.Tensor, **vision_inputs) -> VisionFeatures:
        """Encode a batch of images; see :class:`VisionFeatures`."""
        raise NotImplementedError

    # --- language ---------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Text input embeddings ``[B, T, H]`` (placeholders included)."""
        raise NotImplementedError

    def lm_forward(
        self,
        hidden: torch.Tensor,
        vision_feats: VisionFeatures | None,
        attention_mask: torch.Tensor,
        cache: Cache | None = None,
        *,
        image_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> LMOutput:
        """Run the frozen decoder up to and including its final norm.

        Args:
            hidden: ``[B, T, H]`` input embeddings of the new tokens.
            vision_feats: the features of the rows' images (row ``b``: image ``b``); their valid
                ``llm`` embeddings replace the positions of ``image_mask``. The core passes them on
                every call for rows that have an image, decoding steps included (whose new tokens
                hold no placeholder), so a backbone can derive positions from them (3-D rotary
                positions from :attr:`VisionFeatures.extra`).
            attention_mask: ``[B, past + T]`` 1 for real tokens, 0 for padding; or, when
                :attr:`packs_pairs`, a ``[B, 1, T, T]`` additive mask with ``position_ids``.
            cache: the decoder KV cache to extend (``None``: no cache kept).
            image_mask: ``[B, T]`` bool, positions of the visual placeholders.
            position_ids: ``[B, T]``; derived from ``attention_mask`` when omitted.
        """
        raise NotImplementedError

    @property
    def lm_head(self) -> nn.Module:
        """The vocabulary projection."""
        raise NotImplementedError

    @property
    def packs_pairs(self) -> bool:
        """True when :meth:`lm_forward` also takes a ``[B, 1, T, T]`` additive float
        ``attention_mask`` (with ``position_ids``): a preference pair's prompt and both answers
        then run as one row (:mod:`mllm_pib.packing`); otherwise each answer row runs whole."""
        return False

    def parts(self) -> dict[str, nn.Module]:
        """Named parts for the freezing policy (a subset of ``vision``, ``projector``,
        ``qformer``, ``llm``, ``lm_head``)."""
        raise NotImplementedError

    # --- template ---------------------------------------------------------------------------
    def prompt_ids(self, question: str, image: Any = None) -> list[int]:
        """Token ids of the full prompt up to where the answer starts, with the visual
        placeholders expanded to their final count.

        ``image``: the PIL image the prompt is about. The core passes it wherever it has it
        (training data, generation, chat, feature-cache probe); a backbone whose visual-token
        count depends on the image (anyres tiles, dynamic resolution, image splitting) needs it
        and raises ``ValueError`` without it; a fixed-count backbone ignores it."""
        raise NotImplementedError

    def answer_ids(self, answer: str) -> list[int]:
        """Token ids of an answer, ending with the end-of-turn token that is scored too."""
        raise NotImplementedError

    def conversation_ids(self, turns: Sequence[tuple[str, str]], question: str, image: Any = None) -> list[int] | None:
        """Prompt ids of ``question`` asked after the earlier ``(question, answer)`` turns about
        the same image, in the model's own multi-turn format (chat, ``generate --chat``);
        ``None`` (the default) when the template is single-turn: the chat then writes the earlier
        turns into the question as a transcript (:mod:`mllm_pib.chat`)."""
        return None

    @property
    def stop_sequences(self) -> list[list[int]]:
        """Token-id sequences that end generation (any of them, as soon as the new tokens end
        with it); the decoded answer stops before it. Default: the end-of-sequence token.
        A backbone whose model ends its answers with a text marker lists that marker's ids too,
        e.g. with :func:`text_stop_sequences`."""
        return [[self.tokenizer.eos_token_id]]

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    # --- persistence ------------------------------------------------------------------------
    def save_pretrained(self, path: str) -> None:
        """Write the base model in a layout ``load(path)`` reads back."""
        raise NotImplementedError

    def identity(self, exclude: Iterable[str] = ()) -> dict[str, Any]:
        """What identifies the base model: recorded in PIB checkpoints and feature caches.

        ``fingerprint`` samples the weights as loaded (``dtype``), leaving out the parts named in
        ``exclude`` (those a checkpoint trains and carries itself); ``fingerprints`` holds the
        same sample rounded to each half precision, so that a base loaded in another precision
        can still be recognised (see :func:`mllm_pib.checkpoint.base_differences`).
        """
        exclude = list(exclude)
        return {
            "backbone": self.name,
            "model_id": self.model_id,
            "feature": self.feature,
            "hidden_size": self.hidden_size,
            "pib_vision_size": self.pib_vision_size,
            "dtype": self.weights_dtype(),
            "fingerprint": self.fingerprint(exclude=exclude),
            "fingerprints": {name: self.fingerprint(getattr(torch, name), exclude) for name in HALF_DTYPES},
        }

    def weights_dtype(self) -> str:
        """The floating dtype holding most of the weights (some modules may stay in float32)."""
        sizes: dict[torch.dtype, int] = {}
        for tensor in self.state_dict().values():
            if tensor.is_floating_point():
                sizes[tensor.dtype] = sizes.get(tensor.dtype, 0) + tensor.numel()
        return str(max(sizes, key=sizes.get, default=torch.float32)).removeprefix("torch.")

    def fingerprint(self, dtype: torch.dtype | None = None, exclude: Iterable[str] = ()) -> str:
        """A short hash of the frozen weights' shapes and a sample of their values, rounded to
        ``dtype`` when given. Left out: the parts named in ``exclude`` (a weight tied to one of
        them too) and LoRA adapters, which are trained, not the base."""
        parts = self.parts()
        skipped = {id(param) for name in exclude if name in parts for param in parts[name].parameters()}
        digest = hashlib.sha256()
        for name, tensor in sorted(self.state_dict(keep_vars=True).items()):
            if id(tensor) in skipped or "lora_" in name:
                continue
            flat = tensor.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 64)][:64]
            if dtype is not None and sample.is_floating_point():
                sample = sample.to(dtype)
            digest.update(json.dumps([name.replace(".base_layer.", "."), list(tensor.shape)]).encode())
            digest.update(sample.float().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]


HALF_DTYPES = ("bfloat16", "float16")


def text_stop_sequences(tokenizer, text: str) -> list[list[int]]:
    """The token-id sequences ``text`` becomes in generated text: at the start, after a space,
    glued to a word and after a newline (a SentencePiece tokenizer gives ``###`` several forms:
    ``▁###``, ``##`` ``#``, ``###``). Each form is listed once, in that order."""
    def encode(piece: str) -> list[int]:
        return tokenizer(piece, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    forms: list[list[int]] = []
    for context in ("", " ", "a", "\n"):
        before, ids = encode(context), encode(context + text)
        form = ids[len(before):] if ids[: len(before)] == before else []
        if form and form not in forms:
            forms.append(form)
    return forms


def resolve_dtype(dtype: torch.dtype | str | None, default: torch.dtype | None = torch.float32) -> torch.dtype | None:
    """``torch.bfloat16``, ``"bfloat16"`` or ``None`` (``default``) -> a dtype; for backbone loaders."""
    from mllm_pib.errors import UserError

    if dtype is None or isinstance(dtype, torch.dtype):
        return default if dtype is None else dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise UserError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return resolved


def position_ids_from_mask(attention_mask: torch.Tensor, length: int) -> torch.Tensor:
    """Positions of the last ``length`` tokens, counting only real tokens (left padding)."""
    positions = attention_mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(attention_mask == 0, 0)
    return positions[:, -length:]


@dataclass(frozen=True)
class PromptTemplate:
    """A single-turn conversation template.

    ``prompt`` holds ``{image}`` (where the visual placeholders go) and ``{question}``; it ends
    where the answer starts. ``answer`` holds ``{answer}`` and the end-of-turn text, which is
    scored with the answer (e.g. ``" {answer}</s>"``).

    ``answer_alone`` chooses how the original tokenised its training answers: ``False`` (LLaVA)
    as part of the whole conversation, so the answer's ids are those that follow the prompt's
    last words; ``True`` (LAVIS, MiniGPT-4) as a text of its own, without BOS.
    """

    prompt: str
    answer: str
    answer_alone: bool = False

    def prompt_text(self, question: str, image: str) -> str:
        return self.prompt.format(image=image, question=question)

    def answer_context(self) -> str:
        """The prompt's fixed text after its last placeholder, that the answer continues."""
        return self.prompt.rsplit("}", 1)[-1]


def tokenize_around_image(tokenizer, text: str, image: str, image_token_id: int, count: int) -> list[int]:
    """Token ids of a prompt holding one ``image`` placeholder, as LLaVA, LAVIS and MiniGPT-4
    build them: the text is cut at the placeholder and each piece tokenised on its own (so a
    SentencePiece tokenizer starts each with its ``▁`` prefix); BOS is kept only on the first
    piece; the placeholder becomes ``count`` image tokens."""
    pieces = text.split(image)
    if len(pieces) != 2:
        raise ValueError(f"the prompt must hold exactly one image placeholder {image!r}, found {len(pieces) - 1}")
    before, after = (tokenizer(piece).input_ids for piece in pieces)
    bos = tokenizer.bos_token_id
    if bos is not None and after[:1] == [bos]:
        after = after[1:]
    return before + [image_token_id] * count + after


class DecoderBackbone(Backbone):
    """A backbone whose LLM is a transformers decoder (``LlamaModel`` and kin).

    Subclasses set ``self.decoder`` (the decoder without head, ending in its final norm),
    ``self._lm_head``, ``self.template``, ``self.image_token`` (placeholder text) and
    ``self.num_image_tokens``; this class tokenises prompts and answers, places the visual
    embeddings and runs the decoder.
    """

    decoder: nn.Module
    _lm_head: nn.Module
    template: PromptTemplate
    image_token: str
    num_image_tokens: int

    def prompt_ids(self, question: str, image: Any = None) -> list[int]:
        text = self.template.prompt_text(question, self.image_token)
        return tokenize_around_image(self.tokenizer, text, self.image_token, self.image_token_id, self.num_image_tokens)

    def answer_ids(self, answer: str) -> list[int]:
        template = self.template
        text = template.answer.format(answer=answer)
        if template.answer_alone:
            return self.tokenizer(text, add_special_tokens=False).input_ids
        # The ids that follow the prompt when the whole conversation is tokenised at once, as
        # the model was trained: the prompt's last words give the context (a SentencePiece
        # tokenizer joins no piece across a word start, so more context changes nothing).
        context = template.answer_context() or "."
        base = self.tokenizer(context).input_ids
        full = self.tokenizer(context + text).input_ids
        if full[: len(base)] != base:
            raise ValueError(f"cannot split the answer {answer!r} from its prompt context {context!r}")
        return full[len(base) :]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.get_input_embeddings()(input_ids)

    def lm_forward(
        self,
        hidden: torch.Tensor,
        vision_feats: VisionFeatures | None,
        attention_mask: torch.Tensor,
        cache: Cache | None = None,
        *,
        image_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> LMOutput:
        has_image = image_mask is not None and image_mask.any()
        if has_image:
            hidden = place_visual_tokens(hidden, vision_feats, image_mask)
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask, hidden.shape[1])
        if has_image:
            attention_mask = self.image_attention(hidden, attention_mask, cache, position_ids, image_mask)
        out = self.decoder(
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
        )
        return LMOutput(hidden=out.last_hidden_state, cache=out.cache)

    def image_attention(self, hidden, attention_mask, cache, position_ids, image_mask):
        """The attention mask the decoder receives for new tokens that hold images. Default:
        ``attention_mask`` as it is (causal attention throughout). A model whose image tokens
        attend to each other both ways (Gemma 3) builds its own masks here."""
        return attention_mask

    @property
    def lm_head(self) -> nn.Module:
        return self._lm_head

    @property
    def packs_pairs(self) -> bool:
        # transformers' decoders use a prepared 4D mask as it is with these two attentions
        return getattr(self.decoder.config, "_attn_implementation", None) in ("sdpa", "eager")

    def new_cache(self) -> Cache:
        return DynamicCache(config=self.decoder.config)


def pad_visual(features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image ``[L_i, D]`` features -> ``[B, max L_i, D]`` zero-padded and the ``[B, max L_i]``
    bool mask of the valid rows (for :attr:`VisionFeatures.llm_mask` / ``pib_mask``)."""
    width = max(f.shape[0] for f in features)
    padded = torch.stack([torch.nn.functional.pad(f, (0, 0, 0, width - f.shape[0])) for f in features])
    lengths = torch.tensor([f.shape[0] for f in features], device=padded.device)
    return padded, torch.arange(width, device=padded.device)[None] < lengths[:, None]


def place_visual_tokens(
    hidden: torch.Tensor, vision_feats: VisionFeatures | None, image_mask: torch.Tensor
) -> torch.Tensor:
    """Replace the placeholder embeddings of row ``b`` by the valid visual embeddings of image
    ``b`` (:attr:`VisionFeatures.llm_mask`), in order."""
    if vision_feats is None:
        raise ValueError("the input holds image placeholder tokens but no image features were given")
    llm = vision_feats.llm
    valid = vision_feats.llm_mask
    if valid is None:
        valid = torch.ones(llm.shape[:2], dtype=torch.bool, device=llm.device)
    valid = valid.to(device=image_mask.device, dtype=torch.bool)
    if valid.shape[0] != image_mask.shape[0]:
        raise ValueError(f"the input has {image_mask.shape[0]} rows but the image features {valid.shape[0]}")
    found, expected = image_mask.sum(-1), valid.sum(-1)
    wrong = (found != expected).nonzero().flatten().tolist()
    if wrong:
        b = wrong[0]
        raise ValueError(
            f"row {b} of the input holds {int(found[b])} image placeholder tokens but its image gives "
            f"{int(expected[b])} visual tokens; the prompt template and the vision encoder disagree"
        )
    visual = llm.to(hidden.dtype)[valid.to(llm.device)]
    return hidden.masked_scatter(image_mask.unsqueeze(-1), visual.to(hidden.device))
