"""LLaVA-1.5 backbone for mllm-pib."""
