"""Llama-style GPT model (Megatron-Core GPTModel), checkpoints and the EMA reference."""
