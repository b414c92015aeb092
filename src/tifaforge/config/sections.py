"""Config sections of the model's shape and of the data, reward and eval steps (`loop`, `reward`,
`eval`, `mining`): their defaults and help, defined only here.

    tifa config configs/tiny.yaml --keys      # every key of these sections with its help

They live with the top-level `Config` so that the config imports nothing above it: the code that uses a
section (models/looping.py, rewards/literary.py, eval/, stages/mining.py) imports it from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tifaforge.fields import opt


@dataclass
class RopeScalingConfig:
    """A longer context than the model was trained at, by scaling its rotary position embeddings."""

    type: Literal["none", "yarn", "linear"] = opt(
        "none", "yarn (as Qwen2.5 extends 32K to 128K), linear (position interpolation), or none.")
    factor: float = opt(4.0, "How many times the original context the model should read (yarn, linear).", min=1.0)
    original_max_position_embeddings: int = opt(
        0, "The context the model was trained at; 0 = its config's max_position_embeddings.", min=0)


@dataclass
class LoopConfig:
    """Looped layers: decoder layers start..end-1 run k times per forward (DESIGN.md §5.4)."""

    start: int = opt(0, "First decoder layer of the looped block (0-based).", min=0)
    end: int = opt(0, "One past the block's last layer; end = start (the default) turns looping off.", min=0)
    k: int = opt(2, "Iterations of the block at inference and evaluation; 1 = the base model.", min=1)
    schedule: Literal["fixed", "uniform", "curriculum"] = opt(
        "fixed", "Iterations in training: fixed = k; uniform = drawn per forward from [k_min, k_max]; "
        "curriculum = drawn from [k_min, a bound rising linearly to k_max over ramp_steps optimizer steps]."
    )
    k_min: int = opt(1, "Fewest iterations drawn in training (uniform, curriculum).", min=1)
    k_max: int = opt(4, "Most iterations drawn in training (uniform, curriculum).", min=1)
    ramp_steps: int = opt(1000, "Curriculum: optimizer steps for the upper bound to reach k_max.", min=1)
    grad_iterations: int = opt(
        0, "Backpropagate through only the last n iterations (truncated, as Huginn); 0 = all.", min=0)
    residual_scale: float = opt(
        1.0, "Scale on both residual branches of every layer in iterations 2..k; 1 = plain repetition.", min=0.0)
    seed: int = opt(0, "Seed of the per-forward draw of k (same on every rank and on resume).")

    @property
    def enabled(self) -> bool:
        return self.end != self.start


@dataclass
class RewardConfig:
    """The logic reward: which rules count, how much, which veto, and the rules' parameters."""

    weights: dict[str, float] = opt(
        {"think_format": 1.0, "think_length": 0.5, "in_character": 1.0, "user_lines": 1.0,
         "repetition": 2.0, "language": 1.0, "answer_length": 0.5, "texture": 1.0},
        "Weight of each rule in the weighted mean (0 = reported only). Rules: think_format, think_length, "
        "in_character, user_lines, refusal, repetition, language, answer_length, texture, blocklist, "
        "and judge (needs judge_url).")
    vetoes: list[str] = opt(["blocklist", "refusal"], "Rules whose failure sets the total to 0.")
    veto_below: float = opt(0.5, "A veto rule fails when its score is below this.", min=0.0, max=1.0)
    caps: dict[str, float] = opt({"texture": 0.8}, "Saturation: a rule earns min(score, cap) / cap.")
    normalize: Literal["sum", "per_rule"] = opt(
        "sum", "How MGRPO turns rules into advantages: sum = the weighted total, normalised per group (GRPO); "
        "per_rule = each rule normalised within the group first, then weighted and summed (GDPO), so a rule "
        "with a small spread is not drowned by one with a large spread.")
    think_length_zh: list[int] = opt([10, 1500], "Think block length band in characters (Chinese).")
    think_length_en: list[int] = opt([5, 800], "Think block length band in words (English).")
    answer_length_zh: list[int] = opt([50, 1500], "Answer length band in characters (Chinese).")
    answer_length_en: list[int] = opt([30, 800], "Answer length band in words (English).")
    language: Literal["auto", "zh", "en"] = opt("auto", "Conversation language; auto = from the user turns.")
    user_name: str = opt("", "The user's persona name ({{user}}), to catch the answer writing their lines.")
    blocklist: list[str] = opt([], "Words the answer must never contain (case-insensitive).")
    judge_url: str | None = opt(None, "OpenAI-compatible base URL of an LLM judge, e.g. http://127.0.0.1:8000/v1.")
    judge_model: str = opt("default", "Model name sent to the judge endpoint.")
    judge_timeout: float = opt(30.0, "Seconds before a judge call counts as missing.", min=0.0)
    judge_api_key_env: str = opt("", "Environment variable holding the judge's API key (not the key).")


@dataclass
class EvalConfig:
    """What `tifa eval` measures on, and how."""

    prompts: str = opt("data/demo/prompts.jsonl", "Prompts JSONL (DESIGN §2a); the `split: eval` lines are used.")
    split: str = opt("eval", "Which split of the prompts file to evaluate on ('' or all = every line; a line "
                             "without `split` is in train).")
    ppl_text: str = opt("data/demo/eval/novel_heldout.txt", "Held-out novel text for perplexity ('' = skip).")
    user_name: str = opt("小林", "The user's name in the role-play ({{user}} in cards).")
    max_new_tokens: int = opt(1536, "Tokens per answer (the seed's 1536; the tiny demo config lowers it).", min=1)
    seed: int = opt(0, "Sampling seed: prompt i uses seed + i, so runs are reproducible.")
    batch_size: int = opt(8, "Prompts generated together.", min=1)
    bootstrap: int = opt(1000, "Bootstrap resamples for the 95% intervals.", min=10)
    limit: int = opt(0, "Evaluate at most this many prompts (0 = all).", min=0)
    unpenalised: bool = opt(False, "Also answer every prompt with the repetition, presence and frequency "
                                   "penalties and DRY off, and report that 4-gram repetition rate: how much "
                                   "a model loops when no sampler stops it (what anti-repetition DPO trains away; "
                                   "the seed's repetition_penalty 1.17 hides it). Doubles generation.")
    samples: int = opt(1, "Answers per prompt, each with its own seed: more answers, narrower intervals "
                          "(the bootstrap resamples prompts, so a prompt's answers count together).", min=1)
    slop_reference: str = opt("data/demo/novels", "Human prose the slop metric compares phrase frequencies "
                              "with: .txt/.epub files or a folder (your own novels; '' = no slop metric).")
    judge_url: str | None = opt(None, "OpenAI-compatible base URL of a pairwise LLM judge (e.g. `tifa serve` or any "
                                "API): each model's answers against the previous model's, both orders; null = none.")
    judge_model: str = opt("default", "Model name sent to the eval judge.")
    judge_api_key_env: str = opt("", "Environment variable holding the eval judge's API key (not the key).")
    judge_timeout: float = opt(60.0, "Seconds before an eval judge call counts as missing.", min=0.0)
    judge_concurrency: int = opt(8, "Judge calls in flight at once.", min=1)
    judge_max_tokens: int = opt(16, "Tokens the judge may answer with (its verdict is the first 1 or 2).", min=1)


@dataclass
class MiningConfig:
    """How pairs are mined (the `mining` section)."""

    k: int = opt(6, "Answers sampled per prompt.", min=2)
    # The seed's chat settings, penalties off: a model loops at a low temperature and a narrow nucleus, where
    # the penalties usually hide it (measured on the tiny demo after MGRPO, 8 answers to each of 60 prompts:
    # at 0.4 / 0.6, 58 of 480 answers had a 4-gram repetition rate over 0.1; at 0.9 / 1.0, none did).
    temperature: float = opt(0.4, "Sampling temperature while mining (the chat's: loops show at low temperatures).",
                             min=0.0)
    top_p: float = opt(0.6, "Nucleus mass while mining (the chat's).", min=0.0, max=1.0)
    repetition_penalty: float = opt(1.0, "Repetition penalty while mining (1.0 = off, so loops show up).", min=0.0)
    max_new_tokens: int = opt(256, "Tokens per mined answer.", min=1)
    bad_below: float = opt(0.6, "An answer whose repetition score is below this is 'repetitive' (rejected).",
                           min=0.0, max=1.0)
    good_at_least: float = opt(1.0, "A chosen answer needs a repetition score of at least this and a valid think block.",
                               min=0.0, max=1.0)
    pairs_per_prompt: int = opt(1, "Pairs kept per prompt at most: the most repetitive answers, each with its own "
                                   "chosen one (the least repetitive good answers), while both last.", min=1)
    synthesize: bool = opt(True, "Inject repetition into a good answer when no natural rejected answer exists.")
    slop_list: str = opt("", "A slop list (the slop.json `tifa eval` writes, or one phrase per line): an answer "
                         "using its phrases at least slop_above times per 100 units is rejected, and a chosen one "
                         "must stay below; '' = repetition only.")
    slop_above: float = opt(3.0, "Slop-phrase hits per 100 units from which an answer counts as slop.", min=0.01)
    split: str = opt("train", "Which split of the prompts file to mine ('' or all = every line; a line without "
                              "`split` is in train).")
    user_name: str = opt("小林", "The user's name in the role-play ({{user}} in cards).")
    seed: int = opt(0, "Sampling seed (prompt i, answer j uses seed + i * k + j) and injection seed.")


@dataclass
class LaunchConfig:
    """How `tifa pipeline` starts each training stage: in its own process, or N data-parallel ones."""

    launcher: Literal["none", "torchrun", "accelerate"] = opt(
        "none", "none = the stages run in the pipeline's process; torchrun / accelerate = each stage on "
        "num_processes ranks (one per GPU; gloo processes on CPU).")
    num_processes: int = opt(0, "Processes per stage under a launcher; 0 = the accelerate config's count "
                                "(torchrun: 1).", min=0)
    accelerate_config: str = opt("", "An accelerate config file (configs/accelerate/*.yaml) for launcher accelerate.")
    plan_check: bool = opt(True, "Before a stage loads its model, estimate its memory (tifa plan) and stop with the "
                                 "cheapest change that fits when it would not fit; false = run anyway.")
    sharding: Literal["ddp", "fsdp2"] = opt(
        "ddp", "ddp = a whole copy of the model per rank; fsdp2 = weights, gradients and optimizer states split "
        "over the ranks (torch FSDP2, every stage; on GPUs also through an accelerate FSDP config).")

