"""Environment and model checks.

    tifa doctor                  # versions, device, threads, usable extras
    tifa doctor models/tiny      # ... and the model's template/tokenizer check
"""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
from pathlib import Path

from tifaforge.extras import EXTRAS, is_available

PACKAGES = ("tifaforge", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "tokenizers",
            "safetensors", "gguf")


def environment_report() -> list[str]:
    import torch

    lines = [f"python        {platform.python_version()} ({platform.machine()}, {platform.system()})"]
    for p in PACKAGES:
        try:
            lines.append(f"{p:<13} {md.version(p)}")
        except md.PackageNotFoundError:
            lines.append(f"{p:<13} not installed")
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        lines.append(f"device        cuda x{torch.cuda.device_count()} ({names}); bf16 by default")
    else:
        lines.append("device        cpu (float32: bf16 matmul is ~100x slower without AVX-512-BF16)")
    lines.append(f"threads       torch {torch.get_num_threads()} of {os.cpu_count()} cores")
    for extra, (_, purpose) in EXTRAS.items():
        state = "yes" if is_available(extra) else f"no  (pip install 'tifaforge[{extra}]')"
        lines.append(f"extra {extra:<8} {state:<40} {purpose}")
    from tifaforge.data.novels import native_kernel as _native

    kernel = "built" if _native() is not None else "not built (no C compiler at install): ~3x slower, same output"
    lines.append(f"ingest kernel {kernel:<40} tokenising and MinHash for `tifa data novels`")
    return lines


def model_report(path: str | Path) -> tuple[list[str], list[str]]:
    """(info lines, problems) for a model folder's tokenizer and chat template."""
    from tifaforge.chat import template
    from tifaforge.errors import TifaError
    from tifaforge.models.load import check_weights, load_tokenizer, read_model_config, run_model

    path = run_model(Path(path))  # a run folder: its last finished stage's model
    tok = load_tokenizer(path)
    problems = template.check_template(tok)
    info = [f"model         {path}", f"tokenizer     {type(tok).__name__}, {len(tok)} tokens"]
    info.append(f"tag spelling  {template.detect_spelling(tok) or 'none found'}")
    cfg = path / "config.json" if path.is_dir() else None
    if cfg and cfg.exists():
        c = read_model_config(path)
        try:
            check_weights(path, allow_pickle=True)
            info.append("weights       headers ok")
        except TifaError as e:
            problems.append(str(e))
        info.append(f"architecture  {', '.join(c.get('architectures') or ['?'])}, vocab {c.get('vocab_size')}")
        if c.get("vocab_size") and c["vocab_size"] < len(tok):
            problems.append(f"tokenizer has {len(tok)} tokens but the model's vocab_size is {c['vocab_size']}")
    if not problems:
        demo = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "<think>想</think>你好。"},
                {"role": "user", "content": "再见"}]
        info.append("rendered      " + repr(template.render(demo, tok, add_generation_prompt=True)))
    return info, problems
