"""Load and save models: Hugging Face folders (safetensors), GGUF files, presets.

    tifa doctor models/tiny      # loads a model the way every command does and checks its template

Rules every caller gets for free:
- never remote code; pickle weights (.bin/.pt/.pth) refused unless `allow_pickle` (they run code on load);
- the tokenizer is read as saved (tokenizer.json), not through transformers' model-type class, which for
  `qwen2` swaps in Qwen2's NFC normaliser and pre-tokenizer (feasibility.md pitfall 4);
- GGUF weights come through transformers' GGUF loader, the tokenizer from HF files beside the GGUF where
  they exist (its GGUF tokenizer read-back is unfaithful for custom vocabularies, pitfall 5), and the
  "quantized" flags it leaves on a dequantized model are cleared so it can be trained and saved (pitfall 3);
- a base whose tokenizer lacks the template's tags (a plain Qwen2.5 base) gets them as special tokens,
  new embedding rows set to the mean of the old ones, and the change recorded in `config.tifaforge`.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import Any

from tifaforge.errors import TifaError
from tifaforge.utils import read_json_file, regular_file

log = logging.getLogger(__name__)

SAFE_WEIGHTS = ("*.safetensors",)
PICKLE_WEIGHTS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")
MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors crate's own limit


def read_model_config(folder: str | Path) -> dict:
    """A model folder's config.json as a dict, or a one-line error naming the file."""
    path = Path(folder) / "config.json"
    obj = read_json_file(path, what="model config")
    if not isinstance(obj, dict):
        raise TifaError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def scaled_config(config, rope, where: str = "model.rope_scaling"):
    """`config` with its rotary embeddings scaled by `rope` (a RopeScalingConfig), in transformers' own
    form (`rope_parameters`, which `save_pretrained` writes and plain transformers reads back):
    max_position_embeddings becomes original x factor. A model already scaled keeps its original
    context, so loading twice does not compound."""
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict) or "rope_theta" not in params:
        raise TifaError(f"{where}: model.rope_scaling.type {rope.type}: this architecture "
                        f"({getattr(config, 'model_type', '?')}) has no rotary position embeddings to scale; "
                        "set model.rope_scaling.type: none")
    original = (rope.original_max_position_embeddings or params.get("original_max_position_embeddings")
                or config.max_position_embeddings)
    config.rope_parameters = {**params, "rope_type": rope.type, "factor": float(rope.factor),
                              **({"original_max_position_embeddings": int(original)} if rope.type == "yarn" else {})}
    config.max_position_embeddings = int(original * rope.factor)
    return config


def check_safetensors(file: Path) -> None:
    """Check that a safetensors file's header parses and covers the file exactly, before any loader
    reads it: the safetensors crate's own errors ("incomplete metadata, file not fully covered") name
    neither the file nor the cause, which is nearly always a copy cut short."""
    size = regular_file(file, "weights file").st_size
    again = "the file is truncated or corrupted; copy or download it again"
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise TifaError(f"{file}: {size} bytes, too short for a safetensors file: {again}")
        n = struct.unpack("<Q", head)[0]
        if n > MAX_SAFETENSORS_HEADER or 8 + n > size:
            raise TifaError(f"{file}: its header claims {n:,} bytes but the file holds {size:,}: {again}")
        try:
            header = json.loads(f.read(n))
        except ValueError:  # bad UTF-8 or bad JSON
            header = None
    tensors = [t for k, t in header.items() if k != "__metadata__"] if isinstance(header, dict) else None
    try:
        end = max((int(t["data_offsets"][1]) for t in tensors), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise TifaError(f"{file}: the safetensors header is not valid: {again}") from None
    if 8 + n + end != size:
        raise TifaError(f"{file}: holds {size:,} bytes but its header describes {8 + n + end:,}: {again}")


def resolve_dtype(dtype: str, device: str):
    """'auto' is float32 on CPU (bf16 matmul is ~100x slower there) and bfloat16 on CUDA."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_tokenizer(path: str | Path, *, spelling: str | None = None, strict: bool = False):
    """The tokenizer exactly as saved; the template's special tokens added if the base lacks them."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    folder = path.parent if path.suffix == ".gguf" else path
    if not (folder / "tokenizer.json").exists():
        if path.suffix == ".gguf":
            return _gguf_tokenizer(path)
        raise TifaError(f"{folder}: no tokenizer.json (a fast tokenizer is required)")
    try:
        tok = PreTrainedTokenizerFast.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001 - surfaced as one line naming the folder
        raise TifaError(f"{folder}: cannot read the tokenizer: {e}") from None
    return tok


def _gguf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    log.warning("%s: no tokenizer.json beside the GGUF; using transformers' GGUF tokenizer (may differ)", path)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def check_weights(folder: Path, allow_pickle: bool) -> None:
    """Refuse folders whose only weights are pickles (unless allowed) or that have no weights, and
    folders whose config.json or safetensors files are damaged (each named in one line)."""
    if (folder / "config.json").exists():
        read_model_config(folder)
    safe = [p for g in SAFE_WEIGHTS for p in folder.glob(g)]
    pickles = [p for g in PICKLE_WEIGHTS for p in folder.glob(g)]
    if safe:
        for file in sorted(safe):
            check_safetensors(file)
        return
    if pickles and not allow_pickle:
        raise TifaError(
            f"{folder}: only pickle weights ({pickles[0].name}); pickles can run code when loaded. "
            "Convert to safetensors, or pass --allow-pickle if you trust the source"
        )
    if not pickles:
        raise TifaError(f"{folder}: no model weights (*.safetensors) found")


def run_model(path: Path) -> Path:
    """A run folder (runs/NAME, DESIGN.md §6) means its last finished stage's model/; anything else is itself."""
    if not path.is_dir() or (path / "config.json").exists():
        return path
    stages = sorted(p for p in path.glob("[0-9][0-9]-*") if (p / "manifest.json").exists() and (p / "model").is_dir())
    return stages[-1] / "model" if stages else path


def load_model(
    path: str | Path,
    *,
    dtype: str = "auto",
    device: str | None = None,
    allow_pickle: bool = False,
    spelling: str = "ascii",
    quantize: str = "none",
    rope_scaling=None,
):
    """(model, tokenizer) from a HF folder or a .gguf file, ready for the template and training.
    `quantize` 4bit: the linear layers in 4-bit NF4 on the GPU (QLoRA's frozen base; train/device.py's
    check_quantize has checked CUDA and bitsandbytes), computing in bf16. `rope_scaling` (the config's
    `model.rope_scaling`): YaRN or linear scaling applied to the loaded config (see `scaled_config`)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    if not path.exists():
        raise TifaError(f"{path}: no such model folder or file")
    path = run_model(path)
    if path.suffix == ".gguf":
        from tifaforge.models.gguf_file import read_gguf

        read_gguf(path)  # a damaged file is named in one line, before transformers' own readers
    tokenizer = load_tokenizer(path)
    kwargs: dict[str, Any] = dict(dtype=torch_dtype, trust_remote_code=False)
    if path.suffix == ".gguf":
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise TifaError(f"{path}: cannot load the GGUF in transformers: {str(e).strip().splitlines()[0]}") from e
        _clear_gguf_quantizer(model)
    elif path.is_dir():
        if not (path / "config.json").exists():
            raise TifaError(f"{path}: not a model folder (no config.json)")
        check_weights(path, allow_pickle)
        from tifaforge.models.looping import apply_saved_loop, saved_base_config

        # A looped folder's config.json names a type plain transformers refuses; read it as its base type.
        kwargs["config"] = saved_base_config(path)
        if rope_scaling is not None and rope_scaling.type != "none":
            from transformers import AutoConfig

            kwargs["config"] = scaled_config(kwargs["config"] or AutoConfig.from_pretrained(str(path)), rope_scaling,
                                             str(path / "config.json"))
        if quantize == "4bit":
            import os

            import torch
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16)
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=not allow_pickle, **kwargs)
        except (OSError, ValueError, KeyError, TypeError) as e:  # transformers' words for a folder it cannot use
            raise TifaError(f"{path}: cannot load the model: {str(e).strip().splitlines()[0]}") from e
        model = apply_saved_loop(model)
    else:
        raise TifaError(f"{path}: expected a model folder or a .gguf file")
    ensure_template_tokens(model, tokenizer, spelling)
    _warn_template(path, tokenizer)
    if quantize == "4bit":  # placed by device_map; a quantized model cannot be moved
        return model.eval(), tokenizer
    return model.to(device).eval(), tokenizer


def _clear_gguf_quantizer(model) -> None:
    """transformers flags a dequantized GGUF model as quantized; clear it so Trainer and save work."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _warn_template(path: Path, tokenizer) -> None:
    from tifaforge.chat.template import check_template

    for problem in check_template(tokenizer):
        log.warning("%s: %s", path, problem)


def ensure_template_tokens(model, tokenizer, spelling: str = "ascii") -> list[str]:
    """Add the seed template's tags to a tokenizer that lacks them; grow the embeddings to match.

    The tags' rows are the mean of the trained rows (a neutral start that keeps logits finite), for the
    input embeddings and, when untied, the output head, whether the matrix grows or already has spare
    rows (a padded vocabulary). Recorded in `model.config.tifaforge` (`added_tokens`, `added_rows`).
    """
    from tifaforge.chat import template

    vocab = tokenizer.get_vocab()
    if _has_tags(vocab, "ascii") or _has_tags(vocab, "fullwidth"):
        return []
    tags = template.special_tokens(spelling)
    first = len(tokenizer)  # the added tags' ids start here
    added = [t for t in tags if t not in vocab]
    think = [t for t in template.THINK_TOKENS if t not in vocab]
    tokenizer.add_special_tokens({"additional_special_tokens": added}, replace_extra_special_tokens=False)
    if think:
        tokenizer.add_tokens(think)
    tokenizer.chat_template = template.seed_template(spelling)
    rows = model.get_input_embeddings().weight.shape[0]
    # llama.cpp's GGUF vocabularies name the rows no token uses "[PADn]": untrained, kept out of the mean
    placeholders = [i for t, i in vocab.items() if t.startswith("[PAD") and t[4:-1].isdigit() and t.endswith("]")]
    _grow_embeddings(model, len(tokenizer), first, placeholders)
    _set_turn_end(model, tokenizer, template.SPECIAL_TOKENS[spelling])
    record = dict(getattr(model.config, "tifaforge", None) or {})
    record["added_tokens"] = added + think
    record["added_rows"] = [first, len(tokenizer)]
    record["spelling"] = spelling
    model.config.tifaforge = record
    how = (f"spare rows {first}..{len(tokenizer) - 1} of the padded matrix ({rows} rows)" if len(tokenizer) <= rows
           else f"rows {first}..{len(tokenizer) - 1}, the matrix grown from {rows}")
    log.warning("added %d template tokens to the tokenizer (%s spelling): %s, set to the mean of rows 0..%d",
                len(added + think), spelling, how, first - 1)
    return added + think


def _set_turn_end(model, tokenizer, tags: dict[str, str]) -> None:
    """The template ends a turn with its eos tag: make it the eos (keeping the base's old eos as a
    second stop id), and give a base without a bos the template's bos."""
    old_eos = tokenizer.eos_token_id
    tokenizer.eos_token = tags["eos"]
    if tokenizer.bos_token is None:
        tokenizer.bos_token = tags["bos"]
    stops = [tokenizer.eos_token_id] + ([old_eos] if old_eos is not None and old_eos != tokenizer.eos_token_id else [])
    model.config.eos_token_id = stops[0]
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = stops
        model.generation_config.bos_token_id = tokenizer.bos_token_id


def _has_tags(vocab: dict, spelling: str) -> bool:
    from tifaforge.chat import template

    t = template.SPECIAL_TOKENS[spelling]
    return all(t[k] in vocab for k in ("user", "assistant", "eos"))


def _grow_embeddings(model, new_size: int, first: int | None = None, skip: list[int] | None = None) -> tuple[int, int]:
    """Rows first..new_size-1 (the added tags) set to the mean of rows 0..first-1 (the tokens the base
    was trained on) less `skip` (placeholder tokens), in the input embeddings and an untied output head;
    returns (first, new_size).

    The matrix grows only when it has fewer rows than the vocabulary now has. Qwen2.5 pads its matrix
    (151,665 tokens in 152,064 rows): the tags then take spare rows, which hold untrained values, so
    they are overwritten all the same (and the padding rows never enter the mean)."""
    import torch

    emb = model.get_input_embeddings().weight
    old = emb.shape[0]
    first = min(old, new_size) if first is None else first
    keep = torch.ones(first, dtype=torch.bool)
    keep[[i for i in (skip or []) if i < first]] = False
    with torch.no_grad():
        mean_in = emb[:first][keep].mean(dim=0, keepdim=True)
        out = model.get_output_embeddings()
        tied = out is not None and out.weight.data_ptr() == emb.data_ptr()
        mean_out = out.weight[:first][keep].mean(dim=0, keepdim=True) if out is not None and not tied else None
        if new_size > old:
            model.resize_token_embeddings(new_size, mean_resizing=False)
        model.get_input_embeddings().weight[first:new_size] = mean_in
        if mean_out is not None:
            model.get_output_embeddings().weight[first:new_size] = mean_out
    return first, new_size


def save_model(model, tokenizer, out: str | Path) -> Path:
    """Save a plain transformers folder atomically: written beside, then renamed into place."""
    from tifaforge.utils import atomic_dir

    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(out)
