"""MiniGPT-4 backbone plugin for mllm-pib (backbone name ``minigpt4``)."""
