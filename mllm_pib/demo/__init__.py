"""The demo: a synthetic "hallucination world" small enough to train a tiny multimodal model on CPU.

``world`` draws scenes of coloured shapes whose object pairs co-occur, with supervised captions
that sometimes name an absent partner — the bias that makes real captioners hallucinate.
"""
