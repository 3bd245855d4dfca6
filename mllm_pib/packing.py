"""A preference pair in one decoder row: image + prompt, then the chosen answer, then the
rejected one.

The row's attention mask lets the prompt attend causally to itself, each answer to the prompt
and to its own earlier tokens but never to the other answer, and the rejected answer's positions
restart where the prompt ends. One pass over the row therefore gives exactly the hidden states
of the two whole sequences (prompt + chosen, prompt + rejected) while running the image and the
prompt once — without a KV cache to copy per answer, and as one matrix product per weight
rather than one for the prompt and one for the answers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedPairs:
    """``ids``/``positions``: ``[B, P + 2A]``; ``allowed``: ``[B, P + 2A, P + 2A]``, True where
    a query may attend to a key."""

    ids: torch.Tensor
    positions: torch.Tensor
    allowed: torch.Tensor
    prompt_width: int
    answer_width: int

    def mask(self, dtype: torch.dtype) -> torch.Tensor:
        """The decoder's ``[B, 1, T, T]`` additive attention mask: 0 where allowed, else the
        dtype's minimum (the form both the ``sdpa`` and the ``eager`` attention add to scores)."""
        blocked = torch.zeros(self.allowed.shape, dtype=dtype, device=self.allowed.device)
        return blocked.masked_fill(~self.allowed, torch.finfo(dtype).min).unsqueeze(1)

    def answer_rows(self, hidden: torch.Tensor, keep: int) -> torch.Tensor:
        """``[2B, keep + A, H]``: each pair's last ``keep`` prompt positions followed by its chosen
        answer (rows ``0..B-1``), then again followed by its rejected answer (rows ``B..2B-1``)."""
        p, a = self.prompt_width, self.answer_width
        prompt = hidden[:, p - keep : p]
        chosen = torch.cat([prompt, hidden[:, p : p + a]], 1)
        rejected = torch.cat([prompt, hidden[:, p + a :]], 1)
        return torch.cat([chosen, rejected], 0)


def pack_pairs(batch: dict) -> PackedPairs:
    """Pack a pair batch (:class:`~mllm_pib.data.dataset.PreferenceCollator`: left-padded prompts,
    right-padded answers, chosen rows then rejected rows) into one row per pair."""
    prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"].bool()
    pairs, p = prompt_ids.shape
    chosen_ids, rejected_ids = batch["answer_ids"].split(pairs)
    chosen_mask, rejected_mask = batch["answer_mask"].bool().split(pairs)
    a = chosen_ids.shape[1]
    device = prompt_ids.device

    ids = torch.cat([prompt_ids, chosen_ids, rejected_ids], 1)
    valid = torch.cat([prompt_mask, chosen_mask, rejected_mask], 1)
    # positions count real tokens: left padding takes none, and both answers start after the prompt
    prompt_positions = (prompt_mask.long().cumsum(1) - 1).clamp(min=0)
    answer_positions = prompt_mask.sum(1, keepdim=True) + torch.arange(a, device=device)
    positions = torch.cat([prompt_positions, answer_positions, answer_positions], 1)

    segment = torch.cat([torch.zeros(p, dtype=torch.long), torch.ones(a, dtype=torch.long),
                         torch.full((a,), 2, dtype=torch.long)]).to(device)  # prompt, chosen, rejected
    index = torch.arange(p + 2 * a, device=device)
    causal = index[None, :] <= index[:, None]
    same_text = (segment[None, :] == 0) | (segment[None, :] == segment[:, None])
    allowed = (causal & same_text)[None] & valid[:, None, :]
    allowed |= torch.eye(p + 2 * a, dtype=torch.bool, device=device)  # a padded query sees itself: no empty row
    return PackedPairs(ids, positions, allowed, p, a)
