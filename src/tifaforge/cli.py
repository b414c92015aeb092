"""The `tifa` command: ONE table maps each subcommand to its arguments, its function and an example.

    tifa --help

Targets are "module:function" strings imported only when that command runs, so `tifa --help` stays
fast. Every function takes the parsed arguments and returns an exit code; a `TifaError` becomes a
one-line `tifa: error: ...` and exit status 2.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    words: tuple[str, ...]  # e.g. ("init-model",) or ("data", "novels")
    target: str  # "module:function", imported lazily
    help: str
    example: str
    args: Callable[[argparse.ArgumentParser], None]


def _init_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("preset", choices=["tiny"], help="model preset")
    p.add_argument("--out", required=True, help="output folder (a Hugging Face model folder)")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed (same seed, same bytes)")
    p.add_argument("--spelling", choices=["ascii", "fullwidth"], default="ascii",
                   help="role-tag spelling: the card's <|User|> (ascii) or DeepSeek-R1-Distill's <｜User｜>")


def _doctor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="a model folder to check (template and tokenizer)")
    p.add_argument("--config", help="also load and validate this config file")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="a YAML config (omit to print the defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one key")
    p.add_argument("--keys", action="store_true", help="list every key with its default and help")


def _chat_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a model folder (or .gguf file)")
    p.add_argument("--card", help="a SillyTavern character card (V2/V3, JSON or PNG): becomes the system prompt")
    p.add_argument("--user", help="your name in the role-play ({{user}} in the card)")
    p.add_argument("--once", metavar="TEXT", help="answer one message and exit (non-interactive)")
    p.add_argument("--hide-think", action="store_true", help="do not show think blocks (/think on|off in chat)")
    p.add_argument("--revise", action="store_true",
                   help="revise each answer once before showing it (MGRPO's pass 2): the rules score the first "
                        "answer; if they complain, their messages ask for a rewrite, shown if it scores higher")
    p.add_argument("--config", help="a config file whose `sampling` section sets generation")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. sampling.temperature=0.7")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickle weights (they can run code)")
    p.add_argument("--backend", choices=["transformers", "llamacpp", "vllm"], default="transformers",
                   help="llamacpp runs a .gguf file in llama.cpp (faster on CPU; needs the llamacpp extra); "
                        "vllm decodes on a CUDA GPU (needs the vllm extra)")


def _data_check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="a JSONL file: OpenAI `messages` or ShareGPT rows (sft), a `messages` prompt per line (prompts), prompt/chosen/rejected (prefs)")
    p.add_argument("--kind", required=True, choices=["sft", "prompts", "prefs"], help="what the file holds")
    p.add_argument("--skip-bad", action="store_true", help="report every bad line and go on (default: stop at the first)")


def _lazy_args(target: str) -> Callable[[argparse.ArgumentParser], None]:
    """Arguments defined next to their command (its dataclass holds the defaults and help)."""

    def add(p: argparse.ArgumentParser) -> None:
        module, func = target.split(":")
        getattr(importlib.import_module(module), func)(p)

    return add


def _data_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="data/demo", help="output folder")


def _reward_score_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="SFT-form JSONL: the last assistant message is scored against what precedes it")
    p.add_argument("--config", help="a YAML file of reward settings (weights, vetoes, caps, bands)")


COMMANDS: list[Command] = [
    Command(("init-model",), "tifaforge.cli:cmd_init_model",
            "write a preset model folder (tiny Qwen2 + tokenizer + the seed's chat template)",
            "tifa init-model tiny --out models/tiny --seed 0", _init_model_args),
    Command(("chat",), "tifaforge.serve.terminal:run",
            "role-play chat in the terminal: streams, think block dimmed, /reset /regen /save /load",
            "tifa chat models/tiny --card data/demo/cards/shen_qingya.json --user 小林", _chat_args),
    Command(("data", "check"), "tifaforge.cli:cmd_data_check",
            "check an SFT, prompts or preference-pairs JSONL: every bad line by number, field and reason",
            "tifa data check data/demo/sft.jsonl --kind sft", _data_check_args),
    Command(("data", "novels"), "tifaforge.data.novels:novels_command",
            "turn .txt/.epub novels (any encoding) into a packed, deduplicated CPT dataset with stats.json",
            "tifa data novels data/demo/novels --out runs/cpt-data --tokenizer models/tiny --block-size 512",
            _lazy_args("tifaforge.data.novels:novels_arguments")),
    Command(("data", "mine-pairs"), "tifaforge.stages.mining:run",
            "mine anti-repetition preference pairs from a model's own answers (natural, else synthetic)",
            "tifa data mine-pairs runs/demo/03-mgrpo/model data/demo/prompts.jsonl --out runs/demo/pairs.jsonl",
            _lazy_args("tifaforge.stages.mining:add_arguments")),
    Command(("data", "demo"), "tifaforge.cli:cmd_data_demo",
            "regenerate the bundled demo data (deterministic: same files, same bytes)",
            "tifa data demo --out data/demo", _data_demo_args),
    Command(("reward", "score"), "tifaforge.cli:cmd_reward_score",
            "score answers with the logic rewards: total, per-rule scores and messages as JSON lines",
            "tifa reward score data/demo/sft.jsonl", _reward_score_args),
    Command(("train", "cpt"), "tifaforge.stages.cpt:run",
            "stage 1: continued pretraining on packed novels (TRL SFTTrainer), full or LoRA, resumable",
            "tifa train cpt configs/tiny-cpt.yaml --out runs/tiny/01-cpt", _lazy_args("tifaforge.stages.cpt:add_arguments")),
    Command(("train", "sft"), "tifaforge.stages.sft:run",
            "stage 2: CoT SFT cold start, loss on the final assistant turn (think block, answer, end tag), resumable",
            "tifa train sft configs/tiny-sft.yaml --model runs/tiny/01-cpt/model --out runs/tiny/02-sft",
            _lazy_args("tifaforge.stages.sft:add_arguments")),
    Command(("train", "mgrpo"), "tifaforge.stages.mgrpo:run",
            "MGRPO: GRPO on the logic rewards plus a revision pass guided by the rules' messages (resumable)",
            "tifa train mgrpo configs/tiny.yaml --set mgrpo.steps=30", _lazy_args("tifaforge.stages.mgrpo:add_arguments")),
    Command(("train", "dpo"), "tifaforge.stages.dpo:run",
            "stage 4: anti-repetition DPO (TRL DPOTrainer + SFT term) on pairs mined from the model's own answers; "
            "before/after report",
            "tifa train dpo configs/tiny.yaml --model runs/tiny/03-mgrpo/model --out runs/tiny/04-dpo",
            _lazy_args("tifaforge.stages.dpo:add_arguments")),
    Command(("plan",), "tifaforge.train.plan:run",
            "does each stage fit the GPUs (weights, gradients, optimizer, activations, KV cache)?",
            "tifa plan configs/qwen2.5-7b-full-1x8.yaml --gpus 8 --gpu-mem 80",
            _lazy_args("tifaforge.train.plan:add_arguments")),
    Command(("pipeline",), "tifaforge.pipeline:run",
            "run the recipe (cpt -> sft -> mgrpo -> dpo) into runs/NAME, resumably, then evaluate every stage",
            "tifa pipeline configs/tiny.yaml --stages cpt,sft,mgrpo,dpo --name tiny",
            _lazy_args("tifaforge.pipeline:add_arguments")),
    Command(("export", "gguf"), "tifaforge.export.gguf:run",
            "write a GGUF for llama.cpp/KoboldCpp/Ollama/LM Studio (f32..q5_1 in Python, K-quants via llama.cpp); "
            "--check FILE validates and compares with transformers",
            "tifa export gguf models/tiny --out tiny-q8_0.gguf --quant q8_0 --verify",
            _lazy_args("tifaforge.export.gguf:add_arguments")),
    Command(("serve",), "tifaforge.serve.app:run",
            "OpenAI-compatible server + web chat page: reasoning in reasoning_content, SillyTavern samplers, "
            "API key, 429 past --max-concurrency",
            "tifa serve models/tiny --port 8000 --api-key sk-local --max-concurrency 4",
            _lazy_args("tifaforge.serve.app:add_arguments")),
    Command(("export", "sillytavern"), "tifaforge.export.sillytavern:run",
            "SillyTavern presets for this model: a Chat Completion preset (the card's sampling) and text-mode "
            "templates with its tokenizer's tag spelling",
            "tifa export sillytavern runs/demo --out presets/", _lazy_args("tifaforge.export.sillytavern:add_arguments")),
    Command(("export", "unroll"), "tifaforge.export.unroll:run",
            "write a looped model as a plain Qwen2/Llama folder (the block's layers copied k times) for any runtime",
            "tifa export unroll runs/demo/02-sft/model --out models/unrolled",
            _lazy_args("tifaforge.export.unroll:add_arguments")),
    Command(("ablate",), "tifaforge.ablate:run",
            "GRPO against MGRPO from one start model at an equal number of sampled sequences, evaluated side by side",
            "tifa ablate configs/tiny.yaml --model runs/demo/02-sft/model --arms grpo,mgrpo --budget 960 --seeds 0,1,2",
            _lazy_args("tifaforge.ablate:add_arguments")),
    Command(("eval",), "tifaforge.eval.report:run",
            "evaluate a model or every stage of a run on held-out prompts: report.md, eval.json, plots",
            "tifa eval runs/demo/03-mgrpo/model --set eval.max_new_tokens=64", _lazy_args("tifaforge.eval.report:add_arguments")),
    Command(("doctor",), "tifaforge.cli:cmd_doctor",
            "print versions, device, threads, usable extras; check a model's template and tokenizer",
            "tifa doctor models/tiny", _doctor_args),
    Command(("config",), "tifaforge.cli:cmd_config",
            "validate a config and print it resolved (defaults + file + --set)",
            "tifa config configs/tiny.yaml --set sampling.temperature=0.7", _config_args),
]


# ---------------------------------------------------------------------------------------------
# Command functions kept here are thin: they parse, call the library and print.


def cmd_init_model(args: argparse.Namespace) -> int:
    from tifaforge.models.presets import init_model

    out = init_model(args.preset, args.out, seed=args.seed, spelling=args.spelling)
    print(f"wrote {args.preset} model to {out}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from tifaforge.doctor import environment_report, model_report

    print("\n".join(environment_report()))
    problems: list[str] = []
    if args.config:
        from tifaforge.config import load_config

        load_config(args.config)
        print(f"config        {args.config}: ok")
    if args.model:
        info, problems = model_report(args.model)
        print("\n".join(info))
        for p in problems:
            print(f"PROBLEM       {p}")
        print("template      " + ("ok" if not problems else f"{len(problems)} problem(s)"))
    return 1 if problems else 0


def cmd_config(args: argparse.Namespace) -> int:
    from tifaforge.config import describe, dump_config, load_config

    if args.keys:
        for key, default, help in describe():
            print(f"{key:<32} {default!r:<24} {help}")
        return 0
    print(dump_config(load_config(args.config, args.set)), end="")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from tifaforge.data.conversations import check_command

    return check_command(args.file, args.kind, args.skip_bad)


def cmd_data_demo(args: argparse.Namespace) -> int:
    from tifaforge.data.demo import demo_command

    return demo_command(args.out)


def cmd_reward_score(args: argparse.Namespace) -> int:
    from tifaforge.rewards.literary import score_command

    return score_command(args.file, args.config)


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    table = "\n".join(f"  {' '.join(c.words):<16} {c.help}" for c in COMMANDS)
    parser = argparse.ArgumentParser(
        prog="tifa",
        description="tifaforge: make and serve role-play models the Tifa way.\n\ncommands:\n" + table,
        epilog="example:\n  tifa init-model tiny --out models/tiny && tifa doctor models/tiny",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from tifaforge import __version__

    parser.add_argument("--version", action="version", version=f"tifaforge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subs: dict[tuple[str, ...], argparse._SubParsersAction] = {(): parser.add_subparsers(dest="command", metavar="COMMAND")}
    groups: dict[tuple[str, ...], argparse.ArgumentParser] = {}
    for cmd in COMMANDS:
        for depth in range(1, len(cmd.words)):
            prefix = cmd.words[:depth]
            if prefix not in groups:
                examples = "\n".join(f"  {c.example}" for c in COMMANDS if c.words[:depth] == prefix)
                groups[prefix] = subs[prefix[:-1]].add_parser(
                    prefix[-1], help=f"{' '.join(prefix)} commands", epilog=f"examples:\n{examples}",
                    formatter_class=argparse.RawDescriptionHelpFormatter)
                subs[prefix] = groups[prefix].add_subparsers(dest="_".join(prefix), metavar="COMMAND", required=True)
        p = subs[cmd.words[:-1]].add_parser(
            cmd.words[-1], help=cmd.help, description=cmd.help,
            epilog=f"example:\n  {cmd.example}", formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        cmd.args(p)
        p.set_defaults(_target=cmd.target)
    return parser


def main(argv: list[str] | None = None) -> int:
    from tifaforge.errors import TifaError, os_error_line

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_target", None):
        parser.print_help()
        return 0 if args.command is None else 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    module, func = args._target.split(":")
    try:
        return int(getattr(importlib.import_module(module), func)(args) or 0)
    except TifaError as e:
        return _fail(str(e), 2, args.verbose)
    except KeyboardInterrupt:
        print("tifa: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # disk full, permissions, a file where a folder goes: the user's to fix
        return _fail(os_error_line(e), 1, args.verbose)
    except Exception as e:  # noqa: BLE001 - a bug of ours: one line, the traceback with -v
        first = (str(e).strip().splitlines() or [""])[0][:300]
        if _disk_full(e) or _out_disk_full(args):
            return _fail(f"{os_error_line(OSError(errno.ENOSPC, 'No space left on device'))} ({first})",
                         1, args.verbose)
        return _fail(f"unexpected {type(e).__name__}: {first}; rerun with -v for the traceback and report it",
                     1, args.verbose)


def _fail(message: str, status: int, verbose: bool) -> int:
    """Print `tifa: error: MESSAGE` (after the traceback when -v) and return the exit status."""
    if verbose:
        import traceback

        traceback.print_exc()
    print(f"tifa: error: {message}", file=sys.stderr)
    return status


def _disk_full(e: BaseException) -> bool:
    """Writers in C++ and Rust (torch.save's zip writer, safetensors, tokenizers) report a full disk as
    their own error type; its words, or the OSError it was raised from, say why."""
    text = str(e)
    return any(w in text for w in ("No space left", "os error 28", "iostream error", "file write failed")) or \
        (isinstance(e.__context__, OSError) and e.__context__.errno == errno.ENOSPC)


def _out_disk_full(args: argparse.Namespace) -> bool:
    """Whether the disk of the command's --out has (almost) nothing free: torch.save's zip writer says
    only "[enforce fail at inline_container.cc] unexpected pos" when a write falls short."""
    import shutil
    from pathlib import Path

    out = getattr(args, "out", None)
    if not out:
        return False
    path = Path(out).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free < 1 << 20
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main())
