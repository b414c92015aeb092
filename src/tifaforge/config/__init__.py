"""Typed configuration: the dataclasses of this package are the ONE source of defaults and help text.

    tifa config configs/tiny.yaml --keys     # load, validate and print a resolved config, or every key

A YAML file overrides the defaults; `--set section.key=value` overrides the file. An unknown key,
a value of the wrong type or out of range is a `ConfigError` naming the file, the line and the key.
The resolved config (every value, defaults included) is written next to every output that used it
(`save_resolved`). Keep this module free of torch/transformers imports: the CLI's --help reads it.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from tifaforge.errors import ConfigError
from tifaforge.fields import opt, section  # noqa: F401  (re-exported: sections elsewhere use them)
from tifaforge.config.sections import (
    EvalConfig, LaunchConfig, LoopConfig, MiningConfig, RewardConfig, RopeScalingConfig,
)
from tifaforge.config.training import CPTConfig, DPOConfig, LoraConfig, LossType, MGRPOConfig, SFTConfig, TrainConfig
from tifaforge.utils import MAX_CONFIG_BYTES, atomic_write_text, read_text_bounded

__all__ = ["Config", "ModelConfig", "SamplingConfig", "EvalConfig", "LaunchConfig", "LoopConfig", "MiningConfig",
           "RopeScalingConfig",
           "RewardConfig", "CPTConfig", "DPOConfig", "LoraConfig", "LossType", "MGRPOConfig", "SFTConfig", "TrainConfig",
           "load_config", "apply_override", "to_dict", "dump_config", "save_resolved", "describe", "opt", "section"]


# ---------------------------------------------------------------------------------------------
# Sections defined here; the others are in sections.py and training.py beside this file.


@dataclass
class SamplingConfig:
    """Generation settings. The defaults are the seed card's recommendation, defined only here."""

    temperature: float = opt(0.4, "Softmax temperature (seed card: 0.4).", min=0.0)
    top_p: float = opt(0.6, "Nucleus sampling mass (seed card: 0.6); 1.0 turns it off.", min=0.0, max=1.0)
    top_k: int = opt(0, "Keep the k most likely tokens; 0 turns it off.", min=0)
    min_p: float = opt(0.0, "Drop tokens below min_p x the top probability (llama.cpp semantics); 0 = off.", min=0.0, max=1.0)
    repetition_penalty: float = opt(1.17, "Multiplicative penalty on tokens already in the context (seed card: 1.17).", min=0.0)
    presence_penalty: float = opt(0.0, "Subtracted once from the logit of any token already generated (OpenAI semantics).")
    frequency_penalty: float = opt(0.0, "Subtracted per occurrence of a token already generated (OpenAI semantics).")
    dry_multiplier: float = opt(0.0, "DRY repetition penalty strength; 0 turns DRY off (llama.cpp semantics).", min=0.0)
    dry_base: float = opt(1.75, "DRY exponential base.", min=1.0)
    dry_allowed_length: int = opt(2, "DRY: repeated sequences up to this length are not penalised.", min=0)
    dry_penalty_last_n: int = opt(-1, "DRY: how many recent tokens to scan; -1 = the whole context, 0 = off.", min=-1)
    dry_sequence_breakers: list[str] = opt(
        ["\n", ":", '"', "*", "：", "“", "”", "「", "」"],
        "DRY: strings that end a repeated sequence (half- and full-width punctuation).",
    )
    xtc_threshold: float = opt(0.1, "XTC: tokens above this probability are candidates for exclusion.", min=0.0, max=1.0)
    xtc_probability: float = opt(0.0, "XTC: chance per step to exclude the top candidates; 0 = off.", min=0.0, max=1.0)
    repetition_penalty_range: int = opt(
        0, "How many recent tokens the repetition penalty looks at; 0 = the whole context (the seed's).", min=0)
    typical_p: float = opt(1.0, "Locally typical sampling mass (llama.cpp's typ_p); 1.0 (or 0) turns it off.",
                           min=0.0, max=1.0)
    top_n_sigma: float = opt(0.0, "Keep tokens whose logit is within n standard deviations of the top one "
                                  "(top-nσ); 0 = off.", min=0.0)
    min_tokens: int = opt(0, "The end token and role tags cannot end an answer before this many tokens.", min=0)
    ignore_eos: bool = opt(False, "Never end at the end token or a role tag: generate max_new_tokens.")
    logit_bias: dict[int, float] = opt({}, "Token id -> added to its logit before every sampler (OpenAI's "
                                           "logit_bias; -100 bans the token).")
    banned_strings: list[str] = opt([], "Phrases never written: when one appears, generation steps back to the "
                                        "token where it began and picks another there (KoboldCpp's and TabbyAPI's "
                                        "banned strings).")
    max_new_tokens: int = opt(1536, "Most tokens generated per answer (seed card: 1536).", min=1)
    do_sample: bool = opt(True, "Sample (true, the seed's setting) or decode greedily (false).")
    seed: int | None = opt(None, "Random seed for reproducible sampling; null = not fixed.")


@dataclass
class ModelConfig:
    """Which model a run starts from, and how it is loaded."""

    base: str = opt("tiny", "A Hugging Face model folder, a .gguf file, or a preset name (`tiny`).")
    preset_seed: int = opt(0, "Seed of the preset's random initialisation (presets only).", min=0)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "Weights' dtype: auto = float32 on CPU (bf16 is ~100x slower there), bfloat16 on GPU."
    )
    allow_pickle: bool = opt(False, "Allow pickle (.bin/.pt) weights. Off: they can run code when loaded.")
    loop: LoopConfig = section(LoopConfig, "Looped decoder layers (DESIGN.md §5.4): off unless end > start.")
    rope_scaling: RopeScalingConfig = section(
        RopeScalingConfig, "Extend the context by scaling rotary positions (YaRN): applied at load in every stage, "
        "chat and serve; saved in config.json and in exported GGUFs.")


# ---------------------------------------------------------------------------------------------
# Loading and validation


REQUIRED = "???"  # a config file's value for what the user must give (its data paths): no default applies


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, cls: type | None = None,
                allow_missing: bool = False) -> Any:
    """Defaults <- YAML file <- `key.sub=value` overrides; every value type-checked with its origin.
    A value left at "???" (REQUIRED) is an error naming the file, line and key, unless `allow_missing`
    (tifa plan and tifa config read such files as they are)."""
    cls = cls or Config
    data: dict = {}
    lines: dict[tuple[str, ...], int] = {}
    origin = "defaults"
    if path is not None:
        path = Path(path)
        origin = str(path)
        text = read_text_bounded(path, MAX_CONFIG_BYTES, "config")
        data, lines = _parse_yaml(text, str(path))
    cfg = _build(cls, data, (), origin, lines)
    for item in overrides or []:
        cfg = apply_override(cfg, item)
    missing = [] if allow_missing else sorted(required_left(cfg), key=lambda k: lines.get(k, 1 << 30))
    if missing:
        where = f"{origin}:{lines[missing[0]]}" if missing[0] in lines else origin
        keys = ", ".join(".".join(k) for k in missing)
        raise ConfigError(f"{where}: {keys} {'is' if len(missing) == 1 else 'are'} required (\"???\" in the file): "
                          f"set {'it' if len(missing) == 1 else 'them'} there or with --set "
                          f"{'.'.join(missing[0])}=PATH")
    return cfg


def required_left(cfg: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Keys whose value is still REQUIRED ("???")."""
    out = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            out += required_left(v, (*prefix, f.name))
        elif v == REQUIRED:
            out.append((*prefix, f.name))
    return out


def apply_override(cfg: Any, item: str) -> Any:
    """Apply one `a.b=value` override (value parsed as YAML) and re-validate that field."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. sampling.temperature=0.7")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    except RecursionError:
        raise ConfigError(f"--set {key}=...: the value is nested too deep") from None
    parts = tuple(key.strip().split("."))
    target = cfg
    for p in parts[:-1]:
        if not dataclasses.is_dataclass(target) or p not in _field_map(type(target)):
            raise ConfigError(f"--set {item!r}: unknown key '{key}'")
        target = getattr(target, p)
    fmap = _field_map(type(target)) if dataclasses.is_dataclass(target) else {}
    if parts[-1] not in fmap:
        raise ConfigError(f"--set {item!r}: unknown key '{key}'{_suggest(parts[-1], fmap)}")
    hints = typing.get_type_hints(type(target))
    f = fmap[parts[-1]]
    setattr(target, f.name, _check(value, hints[f.name], f, ".".join(parts), "--set", None))
    return cfg


def _parse_yaml(text: str, origin: str) -> tuple[dict, dict]:
    """Parse YAML into plain data plus the line number of every mapping key (for error messages)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"{origin}: invalid YAML: nested too deep") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "?"
        raise ConfigError(f"{origin}: {where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: line 1: the top level must be a mapping of sections, got {type(data).__name__}")
    lines: dict[tuple[str, ...], int] = {}

    def walk(n: Any, prefix: tuple[str, ...]) -> None:
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = prefix + (str(k.value),)
                lines[key] = k.start_mark.line + 1
                walk(v, key)

    walk(node, ())
    return data, lines


def _field_map(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _suggest(name: str, fields: dict) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(fields), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _build(cls: type, data: Any, prefix: tuple[str, ...], origin: str, lines: dict) -> Any:
    where = _where(origin, lines, prefix)
    dotted = ".".join(prefix) or "<top level>"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: key '{dotted}' must be a mapping, got {type(data).__name__}")
    fmap = _field_map(cls)
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fmap:
            full = ".".join(prefix + (str(key),))
            raise ConfigError(
                f"{_where(origin, lines, prefix + (str(key),))}: unknown key '{full}'{_suggest(str(key), fmap)}"
            )
    kwargs = {}
    for name, f in fmap.items():
        if name not in data:
            continue
        t = hints[name]
        if dataclasses.is_dataclass(t):
            kwargs[name] = _build(t, data[name] or {}, prefix + (name,), origin, lines)
        else:
            kwargs[name] = _check(data[name], t, f, ".".join(prefix + (name,)), origin, lines.get(prefix + (name,)))
    return cls(**kwargs)


def _where(origin: str, lines: dict, key: tuple[str, ...]) -> str:
    line = lines.get(key)
    return f"{origin}: line {line}" if line else origin


def _check(value: Any, t: Any, f: dataclasses.Field, key: str, origin: str, line: int | None) -> Any:
    """Check (and lightly coerce: int -> float) one value against its annotation and bounds."""
    where = f"{origin}: line {line}" if line else origin
    ok, value = _conforms(value, t)
    if not ok:
        raise ConfigError(f"{where}: key '{key}': expected {_type_name(t)}, got {value!r}")
    lo, hi = f.metadata.get("min"), f.metadata.get("max")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: key '{key}': {value!r} is not a finite number")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if lo is not None and value < lo or hi is not None and value > hi:
            rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
            raise ConfigError(f"{where}: key '{key}': {value!r} is out of range {rng}")
    return value


def _conforms(value: Any, t: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(t)
    args = typing.get_args(t)
    if t is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for a in args:
            ok, v = _conforms(value, a)
            if ok:
                return True, v
        return False, value
    if t is type(None):
        return value is None, value
    if origin is Literal:
        if isinstance(value, bool) and not any(isinstance(a, bool) for a in args):
            # YAML 1.1 reads off/no/false (on/yes/true) as booleans: map back to the literal meant
            words = ("on", "yes", "true") if value else ("off", "no", "false")
            value = next((a for a in args if isinstance(a, str) and a.lower() in words), value)
        return value in args, value
    if origin is list:
        if not isinstance(value, list):
            return False, value
        out = []
        for v in value:
            ok, v = _conforms(v, args[0] if args else Any)
            if not ok:
                return False, value
            out.append(v)
        return True, out
    if origin is dict:
        return isinstance(value, dict), value
    if t is bool:
        return isinstance(value, bool), value
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if t is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            return True, float(value)  # YAML 1.1 reads `3e-4` (no dot) as a string
        return False, value
    if t is str:
        return isinstance(value, str), value
    return isinstance(value, t), value


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(t: Any) -> str:
    origin = typing.get_origin(t)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(t))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(t))
    if t is type(None):
        return "null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(t)[0])}"
    return getattr(t, "__name__", str(t))


# ---------------------------------------------------------------------------------------------
# Output


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any) -> str:
    """The resolved config as YAML that `load_config` reads back to an equal config."""
    return yaml.safe_dump(to_dict(cfg), allow_unicode=True, sort_keys=False)


def save_resolved(cfg: Any, directory: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config next to an output (atomically)."""
    path = Path(directory) / name
    atomic_write_text(path, dump_config(cfg))
    return path


def describe(cls: type | None = None, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(key, default, help) for every field: the CLI's `--help` and the docs read this."""
    cls = cls or Config
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            rows += describe(hints[f.name], key + ".")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((key, default, f.metadata.get("help", "")))
    return rows


# ---------------------------------------------------------------------------------------------
# The whole config


@dataclass
class Config:
    """A tifaforge run: which model, how it samples, and (added per stage) how each stage trains."""

    name: str = opt("tiny", "Run name: outputs go to runs/NAME/.")
    seed: int = opt(1234, "Global random seed (data order, initialisation, sampling).")
    stages: list[str] = opt(["cpt", "sft", "mgrpo", "dpo"], "Stages `tifa pipeline` runs, in recipe order "
                            "(any subset of cpt, sft, mgrpo, dpo).")
    model: ModelConfig = section(ModelConfig, "The starting model.")
    sampling: SamplingConfig = section(SamplingConfig, "Generation defaults for chat, serving, rollouts and eval.")
    reward: RewardConfig = section(RewardConfig, "The logic rewards (MGRPO, pair mining, eval, tifa reward score).")
    eval: EvalConfig = section(EvalConfig, "Held-out evaluation (tifa eval, the end of tifa pipeline).")
    cpt: CPTConfig = section(CPTConfig, "Stage 1: continued pretraining on novels (tifa train cpt).")
    sft: SFTConfig = section(SFTConfig, "Stage 2: chain-of-thought SFT cold start (tifa train sft).")
    mgrpo: MGRPOConfig = section(MGRPOConfig, "MGRPO: groups, revisions, loss, optimiser (tifa train mgrpo).")
    mining: MiningConfig = section(MiningConfig, "Anti-repetition pair mining (tifa data mine-pairs, the DPO stage).")
    dpo: DPOConfig = section(DPOConfig, "Stage 4: anti-repetition DPO (tifa train dpo).")
    launch: LaunchConfig = section(LaunchConfig, "Processes per stage in tifa pipeline (launcher, count).")
