"""Backbones for mllm-pib built on transformers' own VLM classes and processors."""
