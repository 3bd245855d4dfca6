"""Validated, tokenised preference pairs and their collation into model batches.

A batch holds each pair's image once and two rows per pair — all chosen rows, then all
rejected rows — right-padded, with labels only on the answer and its end token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from mllm_pib.data.images import ImageError, open_image
from mllm_pib.ranks import is_first
from mllm_pib.data.records import BadRecordBudget, PreferencePair


@dataclass(frozen=True)
class TokenisedPair:
    pair: PreferencePair
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


class PreferenceDataset(Dataset):
    """Checks every pair once (image decodes, answers non-empty and different, fits
    ``max_length``), tokenises it with the backbone's template, and skips bad ones within the
    budget. Images are decoded again when a pair is fetched."""

    def __init__(self, pairs, backbone, budget: BadRecordBudget, max_length: int):
        self.backbone = backbone
        self.items: list[TokenisedPair] = []
        for pair in tqdm(list(pairs), desc="checking data", unit="pair", leave=False, disable=not is_first()):
            reason, prompt = self._check(pair, max_length)
            if reason:
                budget.skip(pair.source, pair.index, reason)
            else:
                self.items.append(self._tokenise(pair, prompt, max_length))
        self.budget = budget

    def _check(self, pair: PreferencePair, max_length: int) -> tuple[str | None, list[int] | None]:
        """Why the pair is unusable (``None``: it is usable), and its prompt ids when it is. The
        prompt is tokenised with its image: some backbones' visual-token count depends on it."""
        if not pair.chosen.strip() or not pair.rejected.strip():
            return "empty answer", None
        if pair.chosen.strip() == pair.rejected.strip():
            return "chosen identical to rejected", None
        if not pair.prompt.strip():
            return "empty prompt", None
        try:
            image = open_image(pair.image)
        except ImageError as err:
            return f"bad image: {err}", None
        prompt = self.backbone.prompt_ids(pair.prompt, image)
        if len(prompt) + 1 > max_length:
            return f"over-long: the prompt alone exceeds max_length={max_length}", None
        return None, prompt

    def _tokenise(self, pair: PreferencePair, prompt: list[int], max_length: int) -> TokenisedPair:
        room = max_length - len(prompt)  # answers are cut, never the prompt with its image tokens
        return TokenisedPair(
            pair,
            prompt,
            self.backbone.answer_ids(pair.chosen)[:room],
            self.backbone.answer_ids(pair.rejected)[:room],
        )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        return {"item": item, "image": open_image(item.pair.image)}


class PreferenceCollator:
    """Builds a pair batch: each image once, each prompt once, both answers.

    ``prompt_ids``/``prompt_mask``: ``[B, P]`` left-padded, so every prompt ends at the same
    position and both answers can continue from one decoder pass over it;
    ``answer_ids``/``answer_mask``: ``[2B, A]`` right-padded, all chosen answers then all
    rejected ones (each answer ends with its scored end token).
    """

    def __init__(self, backbone):
        self.backbone = backbone

    def __call__(self, examples: list[dict]) -> dict:
        items = [example["item"] for example in examples]
        vision_inputs = self.backbone.preprocess(
            [example["image"] for example in examples], [item.pair.prompt for item in items]
        )
        pad_id = self.backbone.pad_token_id
        prompt_ids, prompt_mask = pad([i.prompt_ids for i in items], pad_id, "left")
        answers = [i.chosen_ids for i in items] + [i.rejected_ids for i in items]
        answer_ids, answer_mask = pad(answers, pad_id, "right")
        return {
            "vision_inputs": vision_inputs,
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "answer_ids": answer_ids,
            "answer_mask": answer_mask,
            "pair_ids": [i.pair.pair_id for i in items],
        }


def pad(rows: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token rows to one width on ``side``; returns ids and the 0/1 mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask
