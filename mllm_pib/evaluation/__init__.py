"""Hallucination benchmarks: POPE (:mod:`.pope`), CHAIR (:mod:`.chair`), SHR (:mod:`.shr`) and
the chat-completions judge client SHR uses (:mod:`.judge`).

These modules hold the model-independent parts: reading question/annotation files, prompts,
answer rules, scoring and judging. They import no model code.
"""
