"""Current open vision-language models from transformers as mllm-pib backbones."""
