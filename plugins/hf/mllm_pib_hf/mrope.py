"""Qwen2-VL's multimodal rotary positions (M-RoPE), from 1-D positions and each row's image grid.

The decoder rotates each query/key by three position components (temporal, height, width). A
text token has all three equal to its position; the visual tokens of an image that starts at
position ``s`` with a merged grid of ``t x h x w`` tokens get ``(s + i, s + j, s + k)`` for
their grid cell ``(i, j, k)``; and the text after the image continues at ``s + max(h, w)``
instead of ``s + t*h*w``: every later position is shifted by the image's *rope delta*
``max(h, w) - t*h*w`` (transformers' ``rope_deltas``; images have ``t = 1``).

Computed here from 1-D positions rather than from whole token sequences, the same rule covers
the three ways the core runs the decoder: whole left-padded sequences (1-D positions count real
tokens), a preference pair packed in one row (both answers restart after the prompt), and
cached decoding, whose new tokens hold no image and all follow it (shifted by the delta).
"""

from __future__ import annotations

import torch


def llm_grids(image_grid_thw: torch.Tensor, merge_size: int) -> torch.Tensor:
    """``[B, 3]`` patch grids (the processor's ``image_grid_thw``) -> visual-token grids."""
    return image_grid_thw // torch.tensor([1, merge_size, merge_size], device=image_grid_thw.device)


def rope_deltas(grids: torch.Tensor) -> torch.Tensor:
    """``[B]`` shift of every position after each row's image (``grids``: visual-token grids)."""
    t, h, w = grids.unbind(-1)
    return torch.maximum(h, w) - t * h * w


def mrope_positions(positions: torch.Tensor, image_mask: torch.Tensor | None, grids: torch.Tensor | None) -> torch.Tensor:
    """``[3, B, T]`` rotary positions of the new tokens.

    Args:
        positions: ``[B, T]`` 1-D positions of the new tokens (real tokens counted from 0).
        image_mask: ``[B, T]`` bool, the visual tokens among them (``None``: none).
        grids: ``[B, 3]`` visual-token grid of each row's image (``None``: no images).
    Rows whose new tokens hold no visual token follow their image (decoding): shifted by its delta.
    """
    out = positions.unsqueeze(0).repeat(3, 1, 1)
    if grids is None:
        return out
    deltas = rope_deltas(grids)
    if image_mask is None or not bool(image_mask.any()):  # decoding: one shift per row, no loop
        return out + deltas.view(1, -1, 1)
    for row in range(positions.shape[0]):
        where = image_mask[row].nonzero().flatten()
        if where.numel() == 0:
            out[:, row] += deltas[row]
            continue
        t, h, w = grids[row].tolist()
        if where.numel() != t * h * w:
            raise ValueError(f"row {row} holds {where.numel()} visual tokens but its image grid {t}x{h}x{w} "
                             f"gives {t * h * w}")
        start = positions[row, where[0]]
        cells = torch.meshgrid(*(torch.arange(n, device=positions.device) for n in (t, h, w)), indexing="ij")
        out[:, row, where] = start + torch.stack(cells).reshape(3, -1)
        after = (positions[row] >= start + t * h * w) & ~image_mask[row]
        out[:, row, after] += deltas[row]
    return out
