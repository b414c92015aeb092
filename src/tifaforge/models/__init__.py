"""Models: presets (the tiny Qwen2), loading HF folders and GGUF files, saving."""
