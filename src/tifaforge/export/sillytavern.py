"""SillyTavern presets for a model: import them instead of setting a dozen fields by hand.

    tifa export sillytavern runs/demo --out presets/

Writes two files to OUT:
- `NAME-chat-completion.json`: a Chat Completion preset (API "Custom (OpenAI-compatible)", pointed at
  `tifa serve`): the card's sampling (temperature 0.4, top_p 0.6, and repetition_penalty 1.17 through
  "Additional Parameters", which that source does not send otherwise), response length 1536, the
  model's context, reasoning shown. Import it under AI Response Configuration → Chat Completion
  presets.
- `NAME-text-completion.json`: an Advanced Formatting "Master Import": the instruct and context
  templates with this model's role tags as its tokenizer spells them (SillyTavern's bundled DeepSeek
  presets spell them with full-width bars, which an ASCII-spelled tokenizer splits into plain
  tokens), the reasoning template (`<think>` … `</think>`), and a Text Completion preset with the
  card's sampling. Turn on Reasoning → Auto-Parse there so think blocks are folded and never sent
  back.
A prompt SillyTavern builds from these templates is the text `tifa serve` renders for the same chat
(tests/test_export_sillytavern.py checks it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tifaforge.chat.template import SPECIAL_TOKENS, detect_spelling
from tifaforge.config import SamplingConfig
from tifaforge.errors import TifaError
from tifaforge.utils import atomic_write_json

RESPONSE_TOKENS = 1536  # the card's max_new_tokens: SillyTavern's default of 300 cuts most think blocks


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a model folder or run folder (its tokenizer decides the tag spelling)")
    p.add_argument("--out", required=True, help="output folder for the two preset files")
    p.add_argument("--url", default="http://127.0.0.1:8000/v1", help="the server's OpenAI base URL (tifa serve)")
    p.add_argument("--name", help="preset name (default: the model folder's name)")


def presets(tokenizer, context: int, name: str, url: str, sampling: SamplingConfig | None = None) -> dict[str, dict]:
    """{file name: preset} for a tokenizer with the seed's role tags."""
    spelling = detect_spelling(tokenizer)
    if spelling is None:
        raise TifaError("the tokenizer has no role tags of either spelling (<|User|> or <｜User｜>): "
                        "these presets are for models with the seed's chat template")
    s = sampling or SamplingConfig()
    tags = SPECIAL_TOKENS[spelling]
    chat = {
        "chat_completion_source": "custom", "custom_url": url, "custom_model": name,
        "custom_include_body": f"repetition_penalty: {s.repetition_penalty}",
        "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k, "min_p": s.min_p,
        "frequency_penalty": s.frequency_penalty, "presence_penalty": s.presence_penalty,
        "repetition_penalty": s.repetition_penalty,
        "openai_max_context": context, "openai_max_tokens": RESPONSE_TOKENS, "max_context_unlocked": context > 4095,
        "stream_openai": True, "show_thoughts": True,
    }
    instruct = {
        "name": name, "input_sequence": tags["user"], "output_sequence": tags["assistant"],
        "last_output_sequence": "", "system_sequence": "", "stop_sequence": tags["eos"],
        "wrap": False, "macro": True, "names_behavior": "none", "activation_regex": "",
        "first_output_sequence": "", "skip_examples": False, "output_suffix": tags["eos"], "input_suffix": "",
        "system_suffix": "", "user_alignment_message": "", "system_same_as_user": True,
        "last_system_sequence": "", "first_input_sequence": "", "last_input_sequence": "",
        "sequences_as_stop_strings": True, "story_string_prefix": tags["bos"], "story_string_suffix": "",
    }
    context_template = {
        "name": name,
        "story_string": "{{#if system}}{{system}}\n{{/if}}{{#if wiBefore}}{{wiBefore}}\n{{/if}}{{#if description}}"
                        "{{description}}\n{{/if}}{{#if personality}}{{personality}}\n{{/if}}{{#if scenario}}"
                        "{{scenario}}\n{{/if}}{{#if wiAfter}}{{wiAfter}}\n{{/if}}{{#if persona}}{{persona}}\n{{/if}}"
                        "{{trim}}",
        "example_separator": "", "chat_start": "", "use_stop_strings": False, "names_as_stop_strings": True,
        "story_string_position": 0, "story_string_depth": 1, "story_string_role": 0, "always_force_name2": False,
        "trim_sentences": False, "single_line": False,
    }
    reasoning = {"name": name, "prefix": "<think>\n", "suffix": "\n</think>", "separator": "\n"}
    text_preset = {
        "name": name, "temp": s.temperature, "temperature_last": True, "top_p": s.top_p, "top_k": s.top_k,
        "min_p": s.min_p, "typical_p": 1, "rep_pen": s.repetition_penalty, "rep_pen_range": 0,
        "freq_pen": s.frequency_penalty, "presence_pen": s.presence_penalty, "genamt": RESPONSE_TOKENS,
        "max_length": context, "add_bos_token": False, "ban_eos_token": False, "skip_special_tokens": False,
        "dry_multiplier": s.dry_multiplier, "dry_base": s.dry_base, "dry_allowed_length": s.dry_allowed_length,
        "dry_penalty_last_n": 0, "xtc_threshold": s.xtc_threshold, "xtc_probability": s.xtc_probability,
    }
    return {f"{name}-chat-completion.json": chat,
            f"{name}-text-completion.json": {"instruct": instruct, "context": context_template,
                                             "reasoning": reasoning, "preset": text_preset}}


def run(args: argparse.Namespace) -> int:
    from tifaforge.models.load import load_tokenizer, read_model_config, run_model

    folder = run_model(Path(args.model))
    if not folder.is_dir():
        raise TifaError(f"{args.model}: expected a model folder or a run folder")
    context = int(read_model_config(folder).get("max_position_embeddings") or 4096)
    name = args.name or folder.name if folder.name != "model" else args.name or folder.parent.name
    out = Path(args.out)
    for file, preset in presets(load_tokenizer(folder), context, name, args.url).items():
        atomic_write_json(out / file, preset)
        print(f"wrote {out / file}")
    return 0
