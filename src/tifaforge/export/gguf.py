"""GGUF export for llama.cpp, KoboldCpp, Ollama and LM Studio (DESIGN.md §8).

    tifa export gguf models/tiny --out tiny-q8_0.gguf --quant q8_0 --verify
    tifa export gguf --check tiny-q8_0.gguf --reference models/tiny

Why our own writer rather than llama.cpp's `convert_hf_to_gguf.py`: that script is not installed by any
package and refuses a BPE vocabulary whose hash it does not know, which is every tokenizer we train
(shared/research/feasibility.md, pitfalls 6 and 7). So the file is written with the `gguf` package:
- tensor names from the explicit Qwen2 and Llama tables below (an unknown tensor is an error, never
  silently dropped); Llama's q/k rows reordered for llama.cpp's rope, Qwen2's not (NEOX rope);
- the tokenizer as saved: byte-level BPE tokens, merges, token types (special -> CONTROL, added plain
  tokens like `<think>` -> USER_DEFINED), BOS/EOS/PAD ids, the pre-tokenizer name llama.cpp must use
  (`qwen2` for Qwen2's split regex), and the chat template with the seed's role tags;
- f32/f16/bf16/q8_0/q4_0/q4_1/q5_0/q5_1 quantised in Python by `gguf.quants`; K-quants (q4_k_m, q6_k…)
  by llama.cpp's own quantiser (`llama_model_quantize` in llama-cpp-python) from an f16 file;
- LoRA adapters merged and looped models unrolled first; tensors streamed one at a time into a temp
  file that is renamed into place, so memory stays at the model plus one tensor and a crash leaves
  no torn file.

`--check FILE` and `--verify` run `export/check.py` (llama.cpp against transformers on the file); the
validating reader of GGUF files is `models/gguf_file.py`, which the llama.cpp engine backend shares.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from tifaforge.errors import MissingExtraError, TifaError
from tifaforge.models.gguf_file import read_gguf

log = logging.getLogger(__name__)
Q = gguf.GGMLQuantizationType
FT = gguf.LlamaFileType

# --quant name -> (tensor type written in Python, general.file_type)
PY_QUANTS: dict[str, tuple[Q, FT]] = {
    "f32": (Q.F32, FT.ALL_F32), "f16": (Q.F16, FT.MOSTLY_F16), "bf16": (Q.BF16, FT.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, FT.MOSTLY_Q8_0), "q4_0": (Q.Q4_0, FT.MOSTLY_Q4_0), "q4_1": (Q.Q4_1, FT.MOSTLY_Q4_1),
    "q5_0": (Q.Q5_0, FT.MOSTLY_Q5_0), "q5_1": (Q.Q5_1, FT.MOSTLY_Q5_1),
}
# K-quants: gguf cannot write them (NotImplementedError); llama.cpp's quantiser picks per-tensor mixes.
LLAMA_QUANTS: dict[str, FT] = {
    name: FT[f"MOSTLY_{name.upper()}"]
    for name in ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
}
QUANTS = (*PY_QUANTS, *LLAMA_QUANTS)

# ---------------------------------------------------------------------------------------------
# Tensor names: HF parameter -> GGUF tensor. Written out (not gguf.get_tensor_name_map) so a reader
# sees what goes where; "blk.{i}." is prefixed to the per-layer names.

ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}
GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
QWEN2_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
LLAMA_LAYER = {**QWEN2_LAYER, "self_attn.o_proj.bias": "attn_output.bias"}  # biases only with attention_bias
LAYER_TENSORS = {"qwen2": QWEN2_LAYER, "llama": LLAMA_LAYER}
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")


def gguf_tensor_name(hf_name: str, arch: str) -> str:
    if hf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[hf_name]
    m = _LAYER_NAME.fullmatch(hf_name)
    if m and m.group(2) in LAYER_TENSORS[arch]:
        return f"blk.{m.group(1)}.{LAYER_TENSORS[arch][m.group(2)]}"
    raise TifaError(f"tensor {hf_name!r} has no place in a {arch} GGUF (not in the {arch} name table)")


def _permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotates the two halves of each head (x_i with x_{i+d/2}); llama.cpp's LLAMA rope rotates
    neighbours (x_2i with x_2i+1). Reordering q/k rows makes them the same rotation. Qwen2 runs with
    llama.cpp's NEOX rope, which rotates halves like HF: no reorder there."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------------------------
# The source model: a model folder, a LoRA adapter folder (merged), a run folder, a looped model.


def resolve_model_path(path: str | Path) -> Path:
    """A model or adapter folder as is; a run folder (runs/NAME) -> its last finished stage's model/."""
    path = Path(path)
    if not path.exists():
        raise TifaError(f"{path}: no such model folder")
    if not path.is_dir():
        raise TifaError(f"{path}: expected a model folder or run folder (to check a GGUF file: --check FILE)")
    if (path / "config.json").exists() or (path / "adapter_config.json").exists():
        return path
    from tifaforge.models.load import run_model

    model = run_model(path)  # a run folder: its last finished stage (manifest.json is written last)
    if model == path:
        raise TifaError(f"{path}: not a model folder (no config.json) nor a run folder with a finished stage")
    return model


def load_source(path: str | Path, workdir: Path):
    """(model, tokenizer, folder) exactly as saved: no template tokens added, LoRA merged, loops unrolled."""
    from tifaforge.models.load import load_tokenizer

    folder = resolve_model_path(path)
    if (folder / "adapter_config.json").exists():
        return (*_merged_lora(folder), folder)
    from tifaforge.models.load import read_model_config

    config = read_model_config(folder)
    if config.get("loop") or (config.get("tifaforge") or {}).get("loop"):
        folder = _unrolled(folder, workdir)
    return _load_plain(folder), load_tokenizer(folder), folder


def _load_plain(folder: Path):
    from transformers import AutoModelForCausalLM

    from tifaforge.models.load import check_weights

    check_weights(folder, allow_pickle=False)
    # dtype "auto" keeps the saved dtype: tensors are converted to float32 one at a time while writing.
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype="auto", use_safetensors=True,
                                                trust_remote_code=False).eval()


def _merged_lora(folder: Path):
    """A LoRA run's adapter folder: load its base, merge the adapter into the weights (peft)."""
    from peft import PeftModel

    from tifaforge.models.load import load_tokenizer

    from tifaforge.utils import read_json_file

    adapter = read_json_file(folder / "adapter_config.json", what="LoRA adapter config")
    base = adapter.get("base_model_name_or_path") if isinstance(adapter, dict) else None
    if not base or not Path(base).is_dir():
        raise TifaError(f"{folder}: the LoRA adapter's base model {base!r} is not a local model folder")
    model = PeftModel.from_pretrained(_load_plain(Path(base)), str(folder)).merge_and_unload()
    tokenizer = load_tokenizer(folder if (folder / "tokenizer.json").exists() else base)
    return model.eval(), tokenizer


def _unrolled(folder: Path, workdir: Path) -> Path:
    """Looped layers (DESIGN.md §5.4) have no GGUF form: write the plain, unrolled model first."""
    try:
        from tifaforge.export.unroll import unroll
    except ImportError:
        raise TifaError(f"{folder}: a looped model, and `tifa export unroll` is not available to unroll it first") from None
    return Path(unroll(folder, workdir / "unrolled"))


def _architecture(config) -> str:
    arch = next((ARCHITECTURES[a] for a in (config.architectures or []) if a in ARCHITECTURES), None)
    if arch is None:
        raise TifaError(f"architecture {config.architectures} is not exported; supported: {', '.join(ARCHITECTURES)}")
    if config.hidden_act != "silu":
        raise TifaError(f"hidden_act {config.hidden_act!r}: llama.cpp's {arch} graph uses silu")
    return arch


# ---------------------------------------------------------------------------------------------
# Metadata: model hyperparameters, rope, tokenizer.


def _add_model_metadata(w: gguf.GGUFWriter, cfg, n_vocab: int, name: str) -> None:
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(cfg.num_key_value_heads or heads)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(n_vocab)
    if head_dim != cfg.hidden_size // heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    _add_rope(w, cfg)


def _add_rope(w: gguf.GGUFWriter, cfg) -> None:
    """transformers 5 keeps rope in `rope_parameters`; older configs in `rope_theta` + `rope_scaling`."""
    p = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    w.add_rope_freq_base(float(p.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    kind = p.get("rope_type", p.get("type", "default"))
    if kind == "default":
        return
    if kind not in ("linear", "yarn"):
        raise TifaError(f"rope type {kind!r} is not exported (default, linear and yarn are)")
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if kind == "linear" else gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(float(p["factor"]))
    if kind == "yarn":
        w.add_rope_scaling_orig_ctx_len(int(p.get("original_max_position_embeddings") or cfg.max_position_embeddings))


def _add_tokenizer(w: gguf.GGUFWriter, tok, n_vocab: int, pre: str | None) -> None:
    spec = json.loads(tok.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE" or "ByteLevel" not in json.dumps(spec["pre_tokenizer"]):
        raise TifaError("only byte-level BPE tokenizers (Qwen, Llama 3, GPT-2, SmolLM style) are exported")
    if spec.get("normalizer"):
        log.warning("the tokenizer's normaliser (%s) is not applied by llama.cpp", spec["normalizer"].get("type"))
    tokens, types = _vocab(spec, n_vocab)
    w.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    w.add_tokenizer_pre(pre or pre_tokenizer_name(spec["pre_tokenizer"]))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    for kind, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id),
                      ("pad", w.add_pad_token_id), ("unk", w.add_unk_token_id)):
        if getattr(tok, f"{kind}_token_id", None) is not None:
            add(getattr(tok, f"{kind}_token_id"))
    # Our template writes {{bos_token}} itself: llama.cpp must not add a second one.
    w.add_add_bos_token(tok.bos_token_id is not None and tok("a").input_ids[:1] == [tok.bos_token_id])
    w.add_add_eos_token(False)
    if isinstance(tok.chat_template, str):
        w.add_chat_template(_serving_form(tok.chat_template))


def _serving_form(chat_template: str) -> str:
    """The seed's template becomes its serving form (chat/template.py): llama.cpp, KoboldCpp and LM
    Studio then render in-chat system messages where they stand and continue a final assistant
    message in place, as `tifa serve` does. Any other template is written as it is."""
    from tifaforge.chat.template import SPELLINGS, seed_template, serving_template

    return next((serving_template(s) for s in SPELLINGS if chat_template == seed_template(s)), chat_template)


def _vocab(spec: dict, n_vocab: int) -> tuple[list[str], list[int]]:
    """Token texts and types by id; ids the tokenizer does not use (padded vocabularies) are UNUSED."""
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab
    entries = [(i, t, gguf.TokenType.NORMAL) for t, i in spec["model"]["vocab"].items()]
    entries += [(a["id"], a["content"], gguf.TokenType.CONTROL if a["special"] else gguf.TokenType.USER_DEFINED)
                for a in spec["added_tokens"]]
    for i, text, kind in entries:
        if i >= n_vocab:
            raise TifaError(f"token {text!r} has id {i}, but the model's embedding has only {n_vocab} rows")
        tokens[i], types[i] = text, kind
    return tokens, types


def pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name (tokenizer.ggml.pre) for the split regex of a tokenizer.json pre-tokenizer."""
    from tifaforge.models.presets import QWEN2_SPLIT

    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [s.get("type") for s in steps]
    if kinds == ["Split", "ByteLevel"] and steps[0]["pattern"].get("Regex") == QWEN2_SPLIT:
        return "qwen2"
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    raise TifaError(f"pre-tokenizer {json.dumps(pre)[:160]} is not one this exporter recognises; "
                    "pass --pre NAME with llama.cpp's tokenizer.ggml.pre name for it")


# ---------------------------------------------------------------------------------------------
# Tensors: plan (name, shape, type) first so the header can be written, then stream the data.


@dataclass
class _Planned:
    hf: str
    name: str
    shape: tuple[int, ...]
    qtype: Q


def _plan(state: dict, cfg, arch: str, qtype: Q) -> list[_Planned]:
    plan = []
    for hf, t in state.items():
        if hf == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # tied: llama.cpp reuses token_embd as the output matrix
        plan.append(_Planned(hf, gguf_tensor_name(hf, arch), tuple(t.shape), _tensor_type(tuple(t.shape), qtype)))
    return plan


def _tensor_type(shape: tuple[int, ...], qtype: Q) -> Q:
    """Norms and biases stay F32; a matrix whose rows a quant block does not divide falls back to F16
    (what llama.cpp's converter does)."""
    if len(shape) < 2 or qtype == Q.F32:
        return Q.F32
    return qtype if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0 else Q.F16


def _nbytes(p: _Planned) -> int:
    return int(np.prod(gguf.quant_shape_to_byte_shape(p.shape, p.qtype)))


def _tensor_data(state: dict, p: _Planned, cfg, arch: str) -> np.ndarray:
    a = state[p.hf].detach().float().cpu().numpy()
    if arch == "llama" and p.name.endswith(("attn_q.weight", "attn_q.bias")):
        a = _permute_rope(a, cfg.num_attention_heads)
    elif arch == "llama" and p.name.endswith(("attn_k.weight", "attn_k.bias")):
        a = _permute_rope(a, cfg.num_key_value_heads or cfg.num_attention_heads)
    if p.qtype == Q.F32:
        return a.astype(np.float32)
    if p.qtype == Q.F16:
        return a.astype(np.float16)
    return gguf.quants.quantize(a, p.qtype)


def _write(model, tok, path: Path, qtype: Q, ftype: FT, pre: str | None, name: str, progress: bool) -> dict[str, int]:
    """Write one GGUF: metadata, tensor infos, then the tensors one at a time (with a progress bar)."""
    from tqdm import tqdm

    cfg, state = model.config, model.state_dict()
    arch = _architecture(cfg)
    plan = _plan(state, cfg, arch, qtype)
    w = gguf.GGUFWriter(path, arch)
    _add_model_metadata(w, cfg, state["model.embed_tokens.weight"].shape[0], name)
    _add_tokenizer(w, tok, state["model.embed_tokens.weight"].shape[0], pre)
    w.add_file_type(int(ftype))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for p in plan:
        w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), _nbytes(p), raw_dtype=p.qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for p in tqdm(plan, desc=f"writing {path.name}", unit="tensor", disable=not progress, leave=False):
        w.write_tensor_data(_tensor_data(state, p, cfg, arch))
    w.close()
    return _count_types(plan)


def _count_types(plan: list[_Planned]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for p in plan:
        counts[p.qtype.name] = counts.get(p.qtype.name, 0) + 1
    return counts


def _llama_quantize(src: Path, dst: Path, quant: str) -> None:
    """K-quants through llama.cpp's quantiser (the same code as its `llama-quantize` tool)."""
    from tifaforge.extras import require

    try:
        lc = require("llamacpp")
    except MissingExtraError:
        raise TifaError(f"--quant {quant}: K-quants are written by llama.cpp's quantiser, which needs the "
                        f"'llamacpp' extra (pip install 'tifaforge[llamacpp]'); without it use one of "
                        f"{', '.join(PY_QUANTS)}") from None
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # its per-tensor log is noise here
    params = lc.llama_model_quantize_default_params()
    params.ftype = int(LLAMA_QUANTS[quant])
    params.nthread = os.cpu_count() or 1
    if lc.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise TifaError(f"llama.cpp's quantiser failed to write {quant} from {src.name}")


# ---------------------------------------------------------------------------------------------
# Export


@dataclass
class ExportReport:
    path: Path
    quant: str
    size: int
    tensor_types: dict[str, int]
    seconds: float

    def summary(self) -> str:
        types = ", ".join(f"{n} {k}" for k, n in sorted(self.tensor_types.items()))
        return f"wrote {self.path} ({self.quant}, {self.size / 2**20:.1f} MiB; tensors: {types}) in {self.seconds:.1f} s"


def export_gguf(model_path: str | Path, out: str | Path, quant: str = "f16", *, pre: str | None = None,
                progress: bool = True) -> ExportReport:
    """Write `out` from a model, adapter or run folder; atomic (temp file in the same folder, renamed)."""
    start, quant, out = time.monotonic(), quant.lower(), Path(out)
    if quant not in QUANTS:
        raise TifaError(f"unknown --quant {quant!r}; choose one of {', '.join(QUANTS)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as work:
        work = Path(work)
        model, tok, folder = load_source(model_path, work)
        tmp = work / "out.gguf"
        if quant in PY_QUANTS:
            types = _write(model, tok, tmp, *PY_QUANTS[quant], pre, _name(folder), progress)
        else:
            import torch

            base = PY_QUANTS["bf16" if model.dtype == torch.bfloat16 else "f16"]
            _write(model, tok, work / "base.gguf", *base, pre, _name(folder), progress)
            del model
            _llama_quantize(work / "base.gguf", tmp, quant)
            types = _count_types_in(tmp)
        _fsync(tmp)
        os.replace(tmp, out)
    return ExportReport(out, quant, out.stat().st_size, types, time.monotonic() - start)


def _name(folder: Path) -> str:
    """general.name: the model's folder, or the stage's for a run's `NN-stage/model`."""
    return folder.parent.name if folder.name == "model" else folder.name


def _count_types_in(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in read_gguf(path).tensors:
        counts[t.type.name] = counts.get(t.type.name, 0) + 1
    return counts


def _fsync(path: Path) -> None:
    from tifaforge.utils import umask

    with open(path, "rb") as f:
        os.fsync(f.fileno())
    os.chmod(path, 0o666 & ~umask())  # temp files are owner-only; outputs are meant to be shared


# ---------------------------------------------------------------------------------------------
# CLI: `tifa export gguf`


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="a model folder, a LoRA adapter folder (merged first) or a run folder (runs/NAME)")
    p.add_argument("--out", help="the .gguf file to write")
    p.add_argument("--quant", default="f16", choices=QUANTS, metavar="TYPE",
                   help=f"f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 (Python) or {' '.join(LLAMA_QUANTS)} "
                        "(llama.cpp's quantiser, needs the llamacpp extra); default f16")
    p.add_argument("--pre", help="llama.cpp pre-tokenizer name (tokenizer.ggml.pre) when it is not detected")
    p.add_argument("--verify", action="store_true", help="after writing, run the --check against MODEL")
    p.add_argument("--check", metavar="FILE", help="validate a GGUF file and compare llama.cpp's greedy tokens with transformers'")
    p.add_argument("--reference", help="with --check: the model folder the file came from "
                   "(default: transformers' GGUF loader reading the same file)")
    p.add_argument("--min-agreement", type=float, default=0.9,
                   help="with --check/--verify: fail below this top-1 agreement (default 0.9)")
    p.add_argument("--tokens", type=int, default=24, help="with --check/--verify: greedy tokens per prompt (default 24)")


def run(args: argparse.Namespace) -> int:
    from tifaforge.export.check import check_gguf, print_check  # it imports this module (load_source)

    if args.check:
        return print_check(check_gguf(args.check, args.reference, args.tokens), args.min_agreement)
    if not args.model or not args.out:
        raise TifaError("export gguf needs MODEL and --out FILE.gguf (or --check FILE)")
    report = export_gguf(args.model, args.out, args.quant, pre=args.pre)
    print(report.summary())
    if args.verify:
        return print_check(check_gguf(report.path, args.model, args.tokens), args.min_agreement)
    return 0
