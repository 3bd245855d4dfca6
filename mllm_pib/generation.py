"""Decoding loops for :class:`~mllm_pib.model.PIBModel`: greedy, sampling and beam search.

The transformers ``generate`` cannot be reused as is: the block needs its own cache (vision
keys/values, and the text keys/values of the ``self_attention`` variant) reordered with the
beams. The loops below keep the transformers semantics so that, with an identity block, the
tokens are those of the plain model's ``generate``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mllm_pib.block import PIBCache

StopFn = Callable[[list[int]], bool]


class Decoder:
    """Runs a :class:`PIBModel` one step at a time over a batch of sequences.

    With ``use_cache`` the decoder and block caches are extended each step; without it every
    step recomputes the whole sequence (the reference the cached path must equal).
    """

    def __init__(self, model, vision_inputs: dict, *, use_cache: bool, bypass_pib: bool):
        self.model = model
        self.backbone = model.backbone
        self.vision = self.backbone.encode_vision(**vision_inputs)
        self.use_cache = use_cache
        self.bypass_pib = bypass_pib
        self.head = model.reference_head() if bypass_pib else self.backbone.lm_head
        self.stops = StopSequences(self.backbone.stop_sequences, model.device)
        self.pad_id = self.backbone.pad_token_id

    def fan_out(self, n: int) -> None:
        """Repeat every image ``n`` times (one row per beam)."""
        self.vision = self.vision.repeat_interleave(n)

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run the prompts; return the next-token logits ``[B, V]``."""
        self.ids, self.mask = input_ids, attention_mask
        self.image_mask = input_ids == self.backbone.image_token_id
        self.cache = self.backbone.new_cache() if self.use_cache else None
        self.pib_cache = PIBCache() if self.use_cache else None
        return self._run(input_ids, self.image_mask)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row; return the next-token logits."""
        self.ids = torch.cat([self.ids, tokens[:, None]], dim=1)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(tokens), 1)], dim=1)
        self.image_mask = torch.cat([self.image_mask, self.image_mask.new_zeros(len(tokens), 1)], dim=1)
        if self.use_cache:
            return self._run(tokens[:, None], None)
        return self._run(self.ids, self.image_mask)

    def select(self, index: torch.Tensor) -> None:
        """Keep and reorder rows (beam search)."""
        self.ids, self.mask = self.ids[index], self.mask[index]
        self.image_mask = self.image_mask[index]
        self.vision = self.vision.map(lambda t: t.index_select(0, index))
        if self.use_cache:
            self.cache.reorder_cache(index)
            self.pib_cache = self.pib_cache.select(index)

    def _run(self, ids: torch.Tensor, image_mask: torch.Tensor | None) -> torch.Tensor:
        bb = self.backbone
        if not self.use_cache:
            self.pib_cache = None
        hidden = bb.lm_forward(bb.embed(ids), self.vision, self.mask, self.cache, image_mask=image_mask).hidden
        if not self.bypass_pib:
            pib = self.model.pib
            if pib.config.position_wise:
                hidden = hidden[:, -1:]
            hidden = pib(hidden, self.vision.pib, self.vision.pib_mask, text_mask=self.mask, cache=self.pib_cache)
        return self.head(hidden[:, -1]).float()


class StopSequences:
    """The backbone's stop sequences, matched against the ends of generated rows."""

    def __init__(self, sequences: list[list[int]], device: torch.device):
        if not sequences or any(not s for s in sequences):
            raise ValueError(f"stop sequences must be non-empty token-id lists, got {sequences!r}")
        self.sequences = [torch.tensor(s, dtype=torch.long, device=device) for s in sequences]
        self.longest = max(len(s) for s in sequences)

    def __len__(self) -> int:
        return len(self.sequences)

    def ended(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[..., T]`` new tokens -> ``[...]`` bool: the row now ends with a stop sequence."""
        hit = torch.zeros(tokens.shape[:-1], dtype=torch.bool, device=tokens.device)
        for stop in self.sequences:
            if len(stop) <= tokens.shape[-1]:
                hit |= (tokens[..., -len(stop):] == stop).all(-1)
        return hit


def first_stop(tokens: list[int], sequences: list[list[int]]) -> int | None:
    """Where the first stop sequence to complete in ``tokens`` starts (``None``: none does)."""
    for end in range(1, len(tokens) + 1):
        for stop in sequences:
            if end >= len(stop) and tokens[end - len(stop):end] == stop:
                return end - len(stop)
    return None


def sample_or_greedy(
    decoder: Decoder,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    stop: StopFn | None,
    *,
    do_sample: bool,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    logits = decoder.start(input_ids, attention_mask)
    done = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
    new_tokens: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        if do_sample:
            tokens = _sample(logits, temperature, top_p, generator)
        else:
            tokens = logits.argmax(-1)
        tokens = tokens.masked_fill(done, decoder.pad_id)
        new_tokens.append(tokens)
        done |= decoder.stops.ended(torch.stack(new_tokens[-decoder.stops.longest:], 1))
        if stop is not None:
            rows = torch.stack(new_tokens, 1).tolist()
            done |= torch.tensor([not d and stop(r) for r, d in zip(rows, done.tolist())], device=done.device)
        if bool(done.all()) or step + 1 == max_new_tokens:
            break
        logits = decoder.step(tokens)
    if not new_tokens:
        return input_ids.new_zeros(len(input_ids), 0)
    return torch.stack(new_tokens, 1)


def _sample(logits, temperature, top_p, generator) -> torch.Tensor:
    logits = logits / max(temperature, 1e-5)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop tokens once the mass before them already reaches top_p (the first always stays)
        drop = (cumulative - sorted_logits.softmax(-1)) >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def beam_search(
    decoder: Decoder,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    num_beams: int,
    max_new_tokens: int,
    stop: StopFn | None,
    length_penalty: float = 1.0,
) -> torch.Tensor:
    """Beam search with the transformers defaults (``early_stopping=False``): the best finished
    hypothesis per prompt, scored by summed log-prob / new-length ** ``length_penalty``."""
    batch = len(input_ids)
    nb = num_beams
    # enough candidates to keep nb running: each beam completes at most one stop per sequence
    keep = max(2, 1 + len(decoder.stops)) * nb
    device = input_ids.device
    decoder.fan_out(nb)
    logits = decoder.start(input_ids.repeat_interleave(nb, 0), attention_mask.repeat_interleave(nb, 0))

    running = torch.full((batch, nb, max_new_tokens), decoder.pad_id, dtype=torch.long, device=device)
    running_scores = torch.zeros(batch, nb, device=device)
    running_scores[:, 1:] = -1e9  # all beams start identical: expand from the first only
    finished = running.clone()
    finished_scores = torch.full((batch, nb), -1e9, device=device)
    finished_done = torch.zeros(batch, nb, dtype=torch.bool, device=device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)
    in_top = torch.arange(keep, device=device) < nb

    for t in range(max_new_tokens):
        logps = torch.log_softmax(logits, -1).view(batch, nb, -1) + running_scores[..., None]
        vocab = logps.shape[-1]
        top_scores, top_index = logps.view(batch, -1).topk(keep)
        source = top_index // vocab
        candidates = running.gather(1, source[..., None].expand(-1, -1, max_new_tokens)).clone()
        candidates[:, :, t] = top_index % vocab
        hits = decoder.stops.ended(candidates[:, :, : t + 1]) | (t + 1 == max_new_tokens)
        if stop is not None:
            rows = candidates[:, :, : t + 1].tolist()
            hits |= torch.tensor([[stop(r) for r in beams] for beams in rows], device=device)

        # the best nb candidates that did not end continue
        open_scores = top_scores - 1e9 * hits.float()
        cont = open_scores.topk(nb).indices
        running = candidates.gather(1, cont[..., None].expand(-1, -1, max_new_tokens))
        running_scores = open_scores.gather(1, cont)
        beam_rows = (source.gather(1, cont) + nb * torch.arange(batch, device=device)[:, None]).view(-1)

        # candidates among the top nb that ended join the finished pool if they beat it
        new_final = hits & in_top
        scores = top_scores / ((t + 1) ** length_penalty)
        scores = scores - 1e9 * (~improvable).float() - 1e9 * (~new_final).float()
        pool_scores = torch.cat([finished_scores, scores], 1)
        best = pool_scores.topk(nb).indices
        finished = torch.cat([finished, candidates], 1).gather(1, best[..., None].expand(-1, -1, max_new_tokens))
        finished_scores = pool_scores.gather(1, best)
        finished_done = torch.cat([finished_done, new_final], 1).gather(1, best)

        best_open = running_scores[:, :1] / ((t + 1) ** length_penalty)
        worst_final = torch.where(finished_done, finished_scores.min(1, keepdim=True).values, -1e9)
        improvable &= (best_open > worst_final).any(-1, keepdim=True)
        if not bool(improvable.any()) or bool(hits.all()):
            break
        decoder.select(beam_rows)
        logits = decoder.step(running[:, :, t].reshape(-1))

    best = finished[:, 0]
    length = int((best != decoder.pad_id).any(0).nonzero().max()) + 1 if (best != decoder.pad_id).any() else 0
    return best[:, :length]
