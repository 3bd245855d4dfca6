"""The post-interaction block (PIB).

The PIB sits between a frozen LLM decoder and its ``lm_head``: every text position's final hidden
state looks back at the image features and is corrected before the vocabulary projection.

One block covers every variant the research compared, by configuration:

* ``align``: how vision features reach the LLM width — ``mlp`` (Dv -> I -> H, GELU), ``linear``
  or ``none`` (features already H wide, e.g. a projector's output);
* ``interaction``: ``cross_attention`` (text queries over vision keys/values), ``self_attention``
  (causal and padding-aware, over the text; vision-free) or ``none`` (MLP only, vision-free);
* ``depth``: layers chained one after another.

Each layer is pre-norm with two residual branches, each scaled by ``tanh(gate)`` with the gate
initialised to zero (as in Flamingo's gated cross-attention). A fresh block is therefore exactly
the identity, so the DPO reference policy is the same model with the block bypassed, and the
gates still receive gradient from the first step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn


class PIBConfig(BaseModel):
    """Configuration of a :class:`PostInteractionBlock` (JSON-serialisable)."""

    model_config = ConfigDict(extra="forbid")

    hidden_size: int = Field(gt=0, description="H, width of the LLM hidden states")
    vision_size: int = Field(gt=0, description="Dv, width of the vision features")
    align: Literal["mlp", "linear", "none"] = "mlp"
    align_intermediate_size: int | None = Field(
        default=None, gt=0, description="hidden width of the align MLP (default: intermediate_size)"
    )
    interaction: Literal["cross_attention", "self_attention", "none"] = "cross_attention"
    depth: int = Field(default=1, ge=1)
    num_heads: int = Field(default=32, gt=0)
    intermediate_size: int | None = Field(
        default=None, gt=0, description="width of each layer's MLP (default: 4 * hidden_size)"
    )
    norm_eps: float = Field(default=1e-5, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _check(self) -> "PIBConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.uses_vision and self.align == "none" and self.vision_size != self.hidden_size:
            raise ValueError(
                f"align 'none' needs vision_size == hidden_size, got {self.vision_size} and "
                f"{self.hidden_size}; use align 'linear' or 'mlp'"
            )
        return self

    @property
    def uses_vision(self) -> bool:
        return self.interaction == "cross_attention"

    @property
    def position_wise(self) -> bool:
        """True when each text position's output depends on that position alone (plus the
        image): the block can then run on any subset of positions."""
        return self.interaction != "self_attention"

    @property
    def mlp_size(self) -> int:
        return self.intermediate_size or 4 * self.hidden_size


@dataclass
class PIBCache:
    """State kept across decoding steps.

    ``vision``: per layer, the projected vision keys/values (computed once per image).
    ``text``: per layer, the keys/values of the text seen so far (``self_attention`` only).
    ``text_mask``: ``[B, T_seen]`` validity of the cached text positions.
    """

    vision: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    text: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    text_mask: torch.Tensor | None = None

    def select(self, index: torch.Tensor) -> "PIBCache":
        """Keep (and reorder) batch rows, e.g. for beam search."""
        pick = lambda kv: (kv[0].index_select(0, index), kv[1].index_select(0, index))  # noqa: E731
        mask = None if self.text_mask is None else self.text_mask.index_select(0, index)
        return PIBCache([pick(kv) for kv in self.vision], [pick(kv) for kv in self.text], mask)


class VisionAlign(nn.Module):
    """Maps vision features to the LLM width, then normalises them."""

    def __init__(self, config: PIBConfig):
        super().__init__()
        hidden, vision = config.hidden_size, config.vision_size
        if config.align == "mlp":
            inner = config.align_intermediate_size or config.mlp_size
            self.proj = nn.Sequential(nn.Linear(vision, inner), nn.GELU(), nn.Linear(inner, hidden))
        elif config.align == "linear":
            self.proj = nn.Linear(vision, hidden)
        else:
            self.proj = nn.Identity()
        self.norm = nn.LayerNorm(hidden, eps=config.norm_eps)

    def forward(self, vision: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(vision))


class PIBAttention(nn.Module):
    """Multi-head attention without biases or positions (queries from the text)."""

    def __init__(self, config: PIBConfig):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_heads
        self.head_dim = hidden // config.num_heads
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)
        self.dropout = config.dropout

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def key_values(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._heads(self.k_proj(source)), self._heads(self.v_proj(source))

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """``mask``: bool ``[B, 1 | Tq, Tk]``, True where a query may attend."""
        q = self._heads(self.q_proj(queries))
        attn_mask = None if mask is None else mask.unsqueeze(1)
        drop = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask, dropout_p=drop)
        out = out.transpose(1, 2).reshape(queries.shape)
        return self.o_proj(out)


class PIBMLP(nn.Module):
    def __init__(self, config: PIBConfig):
        super().__init__()
        self.up = nn.Linear(config.hidden_size, config.mlp_size)
        self.down = nn.Linear(config.mlp_size, config.hidden_size)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


class PIBLayer(nn.Module):
    """Pre-norm layer: gated interaction branch, then gated MLP branch."""

    def __init__(self, config: PIBConfig):
        super().__init__()
        self.interaction = config.interaction
        if self.interaction != "none":
            self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
            self.attn = PIBAttention(config)
            self.attn_gate = nn.Parameter(torch.zeros(1))  # 1-d: DeepSpeed cannot broadcast 0-d tensors
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = PIBMLP(config)
        self.mlp_gate = nn.Parameter(torch.zeros(1))
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        hidden: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        if self.interaction != "none":
            branch = self.attn(self.attn_norm(hidden), kv[0], kv[1], mask)
            hidden = hidden + torch.tanh(self.attn_gate) * self.dropout(branch)
        branch = self.mlp(self.mlp_norm(hidden))
        return hidden + torch.tanh(self.mlp_gate) * self.dropout(branch)


class PostInteractionBlock(nn.Module):
    """Corrects the decoder's final hidden states by looking back at the image.

    Example::

        pib = PostInteractionBlock(PIBConfig(hidden_size=4096, vision_size=1024, num_heads=32,
                                             intermediate_size=11008))
        logits = lm_head(pib(hidden, vision))      # identical to lm_head(hidden) at init
    """

    def __init__(self, config: PIBConfig):
        super().__init__()
        self.config = config
        self.align = VisionAlign(config) if config.uses_vision else None
        self.layers = nn.ModuleList(PIBLayer(config) for _ in range(config.depth))

    def forward(
        self,
        hidden: torch.Tensor,
        vision: torch.Tensor | None = None,
        vision_mask: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        cache: PIBCache | None = None,
        vision_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Apply the block.

        Args:
            hidden: ``[B, T, H]`` final hidden states of the new text positions.
            vision: ``[B, N, Dv]`` image features (``cross_attention`` only), or ``[I, N, Dv]``
                with ``vision_index``.
            vision_mask: ``[B, N]`` (or ``[I, N]``) bool, valid vision tokens (different counts
                per sample).
            text_mask: ``[B, T_past + T]`` 1/True for real tokens; ``self_attention`` ignores
                padded keys. Defaults to all valid.
            cache: a :class:`PIBCache` filled and reused across decoding steps; the output for
                the new positions equals that of a full-sequence call.
            vision_index: ``[B]`` the image each row reads, when ``vision`` holds one entry per
                image and several rows share one (a preference pair's two answers): the align
                MLP and the keys/values then run once per image, not once per row. ``None``:
                row ``b`` reads ``vision[b]``.

        Returns the corrected hidden states, ``[B, T, H]``, in the dtype of ``hidden``.
        """
        dtype = self.layers[0].mlp.up.weight.dtype
        x = hidden.to(dtype)
        if self.config.interaction == "cross_attention":
            kvs, mask = self._vision_kv(vision, vision_mask, cache, dtype, vision_index, x.shape[0])
            for layer, kv in zip(self.layers, kvs):
                x = layer(x, kv, mask)
        elif self.config.interaction == "self_attention":
            x = self._self_attend(x, text_mask, cache)
        else:
            for layer in self.layers:
                x = layer(x, None, None)
        return x.to(hidden.dtype)

    def _vision_kv(self, vision, vision_mask, cache, dtype, index, rows):
        if vision is None:
            raise ValueError("the cross_attention PIB needs vision features")
        if index is not None:
            index = _check_index(index, rows).to(vision.device)
        if cache is not None and cache.vision:
            kvs = cache.vision
        else:
            aligned = self.align(vision.to(dtype))
            kvs = [layer.attn.key_values(aligned) for layer in self.layers]
            if index is not None:  # per image -> per row; the backward sums each image's rows
                kvs = [(k.index_select(0, index), v.index_select(0, index)) for k, v in kvs]
            if cache is not None:
                cache.vision = kvs
        mask = None
        if vision_mask is not None:
            if index is not None:
                vision_mask = vision_mask.index_select(0, index.to(vision_mask.device))
            mask = vision_mask.bool().unsqueeze(1)  # [B, 1, N]
            # a sample without any vision token attends to nothing: its branch output is zero
            mask = mask | ~mask.any(-1, keepdim=True)
        return kvs, mask

    def _self_attend(self, x, text_mask, cache):
        batch, new = x.shape[:2]
        past = cache.text[0][0].shape[2] if cache is not None and cache.text else 0
        if text_mask is None:
            text_mask = torch.ones(batch, past + new, dtype=torch.bool, device=x.device)
        if text_mask.shape[1] != past + new:
            raise ValueError(f"text_mask covers {text_mask.shape[1]} positions, expected {past + new}")
        mask = _causal_padding_mask(text_mask.bool(), new)
        for i, layer in enumerate(self.layers):
            k, v = layer.attn.key_values(layer.attn_norm(x))
            if cache is not None:
                if len(cache.text) > i:
                    k = torch.cat([cache.text[i][0], k], dim=2)
                    v = torch.cat([cache.text[i][1], v], dim=2)
                    cache.text[i] = (k, v)
                else:
                    cache.text.append((k, v))
            x = layer(x, (k, v), mask)
        if cache is not None:
            cache.text_mask = text_mask
        return x


def _check_index(index: torch.Tensor, rows: int) -> torch.Tensor:
    # out-of-range values are left to index_select: checking them here would wait for a GPU
    if index.shape != (rows,) or index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"vision_index must hold one integer per row ({rows}), got shape "
                         f"{tuple(index.shape)} of {index.dtype}")
    return index


def _causal_padding_mask(text_mask: torch.Tensor, new: int) -> torch.Tensor:
    """``[B, new, past + new]``: causal, padded keys hidden. Every query may see itself, so a
    padded query row is never empty (its output is ignored anyway)."""
    total = text_mask.shape[1]
    query_pos = torch.arange(total - new, total, device=text_mask.device)
    key_pos = torch.arange(total, device=text_mask.device)
    causal = key_pos[None, :] <= query_pos[:, None]
    itself = key_pos[None, :] == query_pos[:, None]
    return (causal[None] & text_mask[:, None, :]) | itself[None]
