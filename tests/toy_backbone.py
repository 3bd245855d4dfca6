"""A small pure-torch backbone, so core tests do not depend on any plugin."""

from __future__ import annotations

import torch
from torch import nn

from mllm_pib.backbone import Backbone, LMOutput, VisionFeatures, place_visual_tokens


class ToyLLM(nn.Module):
    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.q_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)

    def get_input_embeddings(self):
        return self.embed_tokens

    def forward(self, hidden, attention_mask):
        # causal mean of value projections: a cheap stand-in for attention
        weights = torch.tril(torch.ones(hidden.shape[1], hidden.shape[1])) * attention_mask[:, None, :]
        weights = weights / weights.sum(-1, keepdim=True).clamp(min=1)
        return self.norm(hidden + weights @ self.v_proj(torch.tanh(self.q_proj(hidden))))


class ToyBackbone(Backbone):
    name = "toy"
    feature_choices = ("patches",)

    def __init__(self, vocab=20, hidden=16, vision=12, patches=4, tie=False, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.vision = nn.Linear(3, vision)
        self.projector = nn.Linear(vision, hidden)
        self.llm = ToyLLM(vocab, hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)
        if tie:
            self.head.weight = self.llm.embed_tokens.weight
        self.image_token_id = vocab - 1
        self.hidden_size, self.pib_vision_size = hidden, vision
        self.num_patches, self.feature, self.model_id = patches, "patches", "toy"

    def encode_vision(self, pixel_values):
        feats = self.vision(pixel_values)  # [B, patches, 3] -> [B, patches, vision]
        return VisionFeatures(pib=feats, llm=self.projector(feats))

    def embed(self, input_ids):
        return self.llm.embed_tokens(input_ids)

    def lm_forward(self, hidden, vision_feats, attention_mask, cache=None, *, image_mask=None, position_ids=None):
        if image_mask is not None and image_mask.any():
            hidden = place_visual_tokens(hidden, vision_feats, image_mask)
        return LMOutput(hidden=self.llm(hidden, attention_mask))

    @property
    def lm_head(self):
        return self.head

    def parts(self):
        return {"vision": self.vision, "projector": self.projector, "llm": self.llm, "lm_head": self.head}


def toy_batch(backbone: ToyBackbone, pairs: int = 2, seed: int = 0) -> dict:
    """A pair batch (see PreferenceCollator): prompts [image tokens + 3 words], 4-token answers."""
    gen = torch.Generator().manual_seed(seed)
    image = [backbone.image_token_id] * backbone.num_patches
    prompts = torch.tensor([image + torch.randint(1, 10, (3,), generator=gen).tolist() for _ in range(pairs)])
    answers = torch.randint(1, 10, (2 * pairs, 4), generator=gen)
    return {
        "vision_inputs": {"pixel_values": torch.randn(pairs, backbone.num_patches, 3, generator=gen)},
        "prompt_ids": prompts,
        "prompt_mask": torch.ones_like(prompts),
        "answer_ids": answers,
        "answer_mask": torch.ones_like(answers),
        "pair_ids": [f"toy:{i}" for i in range(pairs)],
    }
