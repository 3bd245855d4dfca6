"""InstructBLIP (Vicuna) as an mllm-pib backbone, on ``transformers.InstructBlipForConditionalGeneration``."""
