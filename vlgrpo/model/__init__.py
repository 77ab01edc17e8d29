"""Model loading, the tiny offline Qwen-VL, LoRA, prompt encoding and decoding (layer 3 of the core)."""
