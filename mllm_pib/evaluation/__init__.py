"""Hallucination benchmarks: POPE (:mod:`.pope`), CHAIR (:mod:`.chair`), SHR (:mod:`.shr`, its
inputs in :mod:`.shr_data`) and the chat-completions judge client SHR uses (:mod:`.judge`, over
:mod:`.http_client`).

These modules hold the model-independent parts: reading question/annotation files, prompts,
answer rules, scoring and judging. They import no model code.
"""
