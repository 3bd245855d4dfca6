"""Backbones whose prompts are the model's own chat template, rendered by its transformers processor.

Today's VLMs publish a processor that holds the chat template and expands the image placeholder
into the image's visual tokens (a count that can depend on the image: anyres tiles, dynamic
resolution). :class:`ProcessorBackbone` builds prompts and answers from it once for every such
family; a family plugin supplies only its vision side and its parts.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch

from mllm_pib.backbone import DecoderBackbone

# The question of the conversation rendered to split an answer from its prompt: any text
# does, since the answer's ids start after the generation prompt, which ends the prompt.
SPLIT_QUESTION = "?"


def conversation(turns: Sequence[tuple[str, str]], question: str | None = None) -> list[dict]:
    """Messages in the processors' format: each ``(question, answer)`` turn, then ``question``
    when given; the image opens the first user turn."""
    messages: list[dict] = []
    for asked, answer in [*turns, *([(question, None)] if question is not None else [])]:
        content = [{"type": "text", "text": asked}]
        if not messages:
            content.insert(0, {"type": "image"})
        messages.append({"role": "user", "content": content})
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


class ProcessorBackbone(DecoderBackbone):
    """A :class:`DecoderBackbone` whose prompts and answers come from a transformers processor.

    - prompt: the processor's chat template with ``add_generation_prompt=True``, tokenised by the
      processor together with the image, so the placeholder expansion is exactly the processor's;
    - answer: the ids that follow the generation prompt when the template renders the
      conversation with the assistant's answer, up to and including the first end-of-turn token
      (what the template writes after it, such as a newline before the next turn, is not scored);
    - stop sequences: the end-of-turn tokens and EOS.

    Subclasses set ``self.processor``, ``self.tokenizer``, ``self.image_token_id``,
    ``self.decoder``, ``self._lm_head`` and :attr:`end_of_turn`, and implement the vision side.
    """

    processor: Any
    end_of_turn: ClassVar[tuple[str, ...]] = ()
    """Tokens that end an assistant turn in the chat template, besides EOS (``<|im_end|>``)."""

    def prompt_ids(self, question: str, image: Any = None) -> list[int]:
        return self.conversation_ids((), question, image)

    def conversation_ids(self, turns: Sequence[tuple[str, str]], question: str, image: Any = None) -> list[int]:
        """The chat template's own multi-turn format, the image in the first user turn."""
        if image is None:
            raise ValueError(f"backbone {self.name!r} counts an image's visual tokens from the image itself; "
                             "prompt_ids needs the image")
        inputs = self.processor.apply_chat_template(
            conversation(turns, question), add_generation_prompt=True, tokenize=True, return_dict=True,
            processor_kwargs={"images": [image.convert("RGB")]},
        )
        return [int(i) for i in inputs["input_ids"][0]]

    def answer_ids(self, answer: str) -> list[int]:
        prompt = self._template_ids(conversation((), SPLIT_QUESTION), add_generation_prompt=True)
        whole = self._template_ids(conversation([(SPLIT_QUESTION, answer)]), add_generation_prompt=False)
        if whole[: len(prompt)] != prompt:
            raise ValueError(f"the chat template's rendering of the answer {answer!r} does not continue its "
                             "generation prompt; cannot split the answer from the prompt")
        rest = whole[len(prompt):]
        ends = set(self.end_of_turn_ids())
        end = next((i for i, token in enumerate(rest) if token in ends), None)
        if end is None:
            raise ValueError(f"the chat template ends the answer {answer!r} with none of the end-of-turn "
                             f"tokens {self.tokenizer.convert_ids_to_tokens(sorted(ends))}")
        return rest[: end + 1]

    def _template_ids(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        text = self.processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def end_of_turn_ids(self) -> list[int]:
        """Ids of :attr:`end_of_turn` and EOS, each once."""
        ids = [self.tokenizer.convert_tokens_to_ids(token) for token in self.end_of_turn]
        ids.append(self.tokenizer.eos_token_id)
        return list(dict.fromkeys(ids))

    @property
    def stop_sequences(self) -> list[list[int]]:
        return [[token] for token in self.end_of_turn_ids()]

    def preprocess(self, images: list, questions: list[str] | None = None) -> dict[str, torch.Tensor]:
        """The image processor's outputs for the batch; pixels in the model's dtype."""
        out = self.processor.image_processor(self.image_batch([image.convert("RGB") for image in images]),
                                             return_tensors="pt")
        device, dtype = self.decoder.device, self.decoder.dtype
        return {
            name: value.to(device, dtype) if value.is_floating_point() else value.to(device)
            for name, value in out.items()
        }


    def image_batch(self, images: list) -> list:
        """The image processor's input for one image per sample. Default: the flat list; a
        processor that reads a flat list as the images of one sample gets ``[[image], ...]``."""
        return images


def image_only_processor(processor_class: type) -> type:
    """``processor_class`` (a transformers multimodal processor) without its video processor.

    A processor that also handles video cannot be built here otherwise: transformers' video
    processors need torchvision, which mllm-pib does not install. The returned class has the same
    name, so it saves the published layout (``processor_class``) and reads it back, video
    processor files ignored; the model's own prompt expansion and image processing are unchanged.
    """

    class ImageOnly(processor_class):
        @classmethod
        def get_attributes(cls):
            return [name for name in super().get_attributes() if name != "video_processor"]

    ImageOnly.__name__ = ImageOnly.__qualname__ = processor_class.__name__
    return ImageOnly
