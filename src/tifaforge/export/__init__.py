"""Exports for other runtimes (DESIGN.md §8): `gguf.py` writes and checks GGUF files for llama.cpp,
KoboldCpp, Ollama and LM Studio; `unroll.py` turns a looped model into a plain one first."""
