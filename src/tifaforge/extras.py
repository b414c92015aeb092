"""Optional heavy dependencies, in one place: checked without importing them, imported at the point of use.

A missing extra raises `MissingExtraError` naming the extra and the command that installs it.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from tifaforge.errors import MissingExtraError

# extra name -> (import names that must all be present, what it enables)
EXTRAS: dict[str, tuple[tuple[str, ...], str]] = {
    "serve": (("fastapi", "uvicorn", "httpx"), "the OpenAI-compatible server (tifa serve)"),
    "llamacpp": (("llama_cpp",), "the llama.cpp engine backend and GGUF checks"),
    "vllm": (("vllm",), "vLLM generation on GPUs"),
    "deepspeed": (("deepspeed",), "DeepSpeed ZeRO-3 multi-GPU training"),
    "qlora": (("bitsandbytes",), "QLoRA (a 4-bit base under LoRA adapters)"),
    "dev": (("pytest", "hypothesis", "openai"), "the test suite"),
}


def is_available(extra: str) -> bool:
    modules, _ = EXTRAS[extra]
    return all(importlib.util.find_spec(m) is not None for m in modules)


def require(extra: str, module: str | None = None) -> ModuleType | None:
    """Import `module` (default: the extra's first module) or explain which extra to install."""
    modules, purpose = EXTRAS[extra]
    name = module or modules[0]
    if not is_available(extra):
        raise MissingExtraError(
            f"{purpose} needs the '{extra}' extra: pip install 'tifaforge[{extra}]'"
            + (" (a source build of about 9 minutes)" if extra == "llamacpp" else "")
        )
    return importlib.import_module(name)
