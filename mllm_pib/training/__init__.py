"""Training: the preference step, the transformers-based trainer and the run driver."""
