"""Exports for other runtimes: `gguf.py` writes GGUF files for llama.cpp, KoboldCpp, Ollama and LM
Studio; `check.py` runs a file in llama.cpp against transformers; `unroll.py` turns a looped model
into a plain one first. Reading and validating a GGUF file is `models.gguf_file`."""
