"""CLI command groups; see :mod:`mllm_pib.cli`."""
