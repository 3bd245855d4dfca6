"""MiniGPT-4's own algorithms, written out from the original (Vision-CAIR/MiniGPT-4) as test oracles.

- ``minigpt_base.py``: ``encode_img`` (``ln_vision`` of the EVA-ViT output, then the Q-Former and
  ``llama_proj`` for Vicuna, or 4 concatenated patch tokens and ``llama_proj`` for Llama-2),
  ``get_context_emb`` (the prompt split at ``<ImageHere>``, each segment tokenized alone, BOS
  only on the first one, the image embeddings between them), ``generate`` (the prompts' embeddings
  left-padded with zeros and handed to the LLM's ``generate``, which ends rows at ``</s>``) and the
  training target ``answer + end_sym`` tokenized without special tokens.
- the configs: ``prompt_template`` ``'###Human: {} ###Assistant: '`` / ``'[INST] {} [/INST] '``,
  ``end_sym`` ``"###"`` (Vicuna, stage 2 and eval) / ``"</s>"`` (Llama-2); the instruction is
  ``"<Img><ImageHere></Img> " + question`` (``prompts/alignment.txt``).
- ``demo.py`` / ``conversation.py``: Vicuna generation stops at the token ids of ``###`` after a
  space (``▁###``) and glued to a word (``##`` ``#``), and the answer text is cut at ``###``.

None of this calls the plugin's code.
"""

from __future__ import annotations

import torch
from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2VisionModel

PROMPT_TEMPLATES = {"v1": "###Human: {} ###Assistant: ", "llama2": "[INST] {} [/INST] "}
END_SYMS = {"v1": "###", "llama2": "</s>"}
# BLIP-2 needs a language model; it is never run.
TINY_OPT = dict(model_type="opt", hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=64, word_embed_proj_dim=16)


def prompt(variant: str, question: str) -> str:
    return PROMPT_TEMPLATES[variant].format("<Img><ImageHere></Img> " + question)


def prompt_segments(tokenizer, variant: str, question: str) -> list[list[int]]:
    """``get_context_emb``'s token ids: the segments around ``<ImageHere>``, BOS on the first only."""
    segments = prompt(variant, question).split("<ImageHere>")
    return [tokenizer(seg, add_special_tokens=i == 0).input_ids for i, seg in enumerate(segments)]


def answer_ids(tokenizer, variant: str, answer: str) -> list[int]:
    """The training target: ``answer + end_sym`` tokenized without special tokens."""
    return tokenizer(answer + END_SYMS[variant], add_special_tokens=False).input_ids


def vicuna_stops(tokenizer) -> list[list[int]]:
    """The demo's stop words for Vicuna (``[[835], [2277, 29937]]`` in Vicuna's vocabulary)."""
    return [tokenizer.convert_tokens_to_ids(["▁###"]), tokenizer.convert_tokens_to_ids(["##", "#"])]


def image_embeddings(model, pixels: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """``encode_img`` with transformers' BLIP-2 run directly on the model's weights: ``ln_vision``
    (LayerNorm, PyTorch's default epsilon 1e-5) of the EVA-ViT output; Vicuna:
    ``Blip2ForConditionalGeneration.get_image_features`` with ``llama_proj`` as its
    ``language_projection``; Llama-2: CLS dropped, ``view(bs, pn // 4, hs * 4)``, ``llama_proj``."""
    config = model.config
    ln = model.vision_model.post_layernorm
    if config.variant == "llama2":
        vision = Blip2VisionModel(config.vision_config).eval()
        vision.load_state_dict(model.vision_model.state_dict())
        before_norm = vision(pixels, output_hidden_states=True).hidden_states[-1]
        vit = torch.nn.functional.layer_norm(before_norm, ln.normalized_shape, ln.weight, ln.bias, 1e-5)
        patches = vit[:, 1:]
        batch_size, count, width = patches.shape
        merged = patches.reshape(batch_size, count // 4, width * 4)
        projected = torch.nn.functional.linear(merged, model.llama_proj.weight, model.llama_proj.bias)
        return {"vit": vit, "qformer": None, "projected": projected}
    hidden = config.text_config.hidden_size
    blip2 = Blip2ForConditionalGeneration(Blip2Config(
        vision_config=config.vision_config.to_dict(), qformer_config=config.qformer_config.to_dict(),
        text_config={**TINY_OPT, "hidden_size": hidden, "word_embed_proj_dim": hidden},
        num_query_tokens=config.num_query_tokens,
    )).eval()
    weights = {k: v for k, v in model.state_dict().items() if k.startswith(("vision_model.", "qformer.", "query"))}
    weights.update({f"language_projection.{name}": t for name, t in model.llama_proj.state_dict().items()})
    result = blip2.load_state_dict(weights, strict=False)
    assert not result.unexpected_keys and all(k.startswith("language_model.") for k in result.missing_keys)
    blip2.vision_model.post_layernorm.eps = 1e-5
    out = blip2.get_image_features(pixels)
    return {"vit": out.last_hidden_state, "qformer": out.qformer_outputs.last_hidden_state,
            "projected": out.pooler_output}


def generate(model, tokenizer, variant: str, pixels: torch.Tensor, questions: list[str], **kwargs) -> list[list[int]]:
    """``MiniGPTBase.generate``: new token ids per row, up to and including ``</s>``."""
    visual = image_embeddings(model, pixels)["projected"]
    embed = model.language_model.get_input_embeddings()
    rows = []
    for question, image in zip(questions, visual):
        before, after = prompt_segments(tokenizer, variant, question)
        rows.append(torch.cat([embed(torch.tensor(before)), image, embed(torch.tensor(after))]))
    width = max(len(row) for row in rows)
    embs = torch.zeros(len(rows), width, rows[0].shape[-1])
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        embs[i, -len(row):] = row
        mask[i, -len(row):] = 1
    eos = tokenizer.eos_token_id
    out = model.language_model.generate(
        inputs_embeds=embs, attention_mask=mask, do_sample=False, min_length=1, repetition_penalty=1.0,
        length_penalty=1.0, eos_token_id=eos, pad_token_id=eos, **kwargs,
    )
    return [row[: row.index(eos) + 1] if eos in row else row for row in out.tolist()]


def cut_at_stop(tokens: list[int], stops: list[list[int]]) -> list[int]:
    """The tokens up to and including the first completed stop."""
    for end in range(1, len(tokens) + 1):
        if any(end >= len(stop) and tokens[end - len(stop):end] == stop for stop in stops):
            return tokens[:end]
    return tokens


def answer_text(tokenizer, variant: str, tokens: list[int]) -> str:
    """The answer as the original reads it: decoded without special tokens, cut at ``###``
    (``Chat.answer``) or ``</s>`` (``generate``), stripped."""
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return text.split("###")[0].strip() if variant == "v1" else text.split("</s>")[0].strip()
