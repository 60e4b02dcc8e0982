"""Stage 1: supervised fine-tuning on demonstrations (`python -m sft`)."""
