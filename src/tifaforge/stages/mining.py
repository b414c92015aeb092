"""Anti-repetition preference pairs mined from the model's own outputs (DESIGN.md §5.3).

    tifa data mine-pairs runs/demo/02-sft/model data/demo/prompts.jsonl --out pairs.jsonl

For each prompt, sample K answers through the engine where loops show (the chat's temperature and
top_p with no repetition penalty: a warmer temperature hides them, as measured below), score each with
the repetition and think-format rules, and pair a repetitive answer (rejected) with one that passes
(chosen), the worst against the cleanest, up to `pairs_per_prompt` per prompt. Where
the model gave no natural pair, a rejected answer can be synthesised from a good one by injecting
repetition (a repeated sentence or an n-gram loop, as in DITTO), marked `synthetic`. The summary
says how many pairs there are, how many prompts gave natural pairs, synthetic ones or none, and why.
With `mining.slop_list` (the over-used phrases `tifa eval` lists in slop.json), an answer full of them
is rejected like a looping one, and a chosen answer must be free of them (Antislop's preference pairs).
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections import Counter
from pathlib import Path

from tifaforge.config import MiningConfig

ROWS_PER_CALL = 16  # answers generated in one batch while mining


def add_arguments(p) -> None:
    p.add_argument("model", help="the model whose own outputs are mined (e.g. the SFT stage's model/)")
    p.add_argument("prompts", help="prompts JSONL (a `messages` list per line, optionally a `card`)")
    p.add_argument("--out", required=True, help="output JSONL of preference pairs")
    p.add_argument("--config", help="a config file (its `mining` and `sampling` sections)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. mining.k=8")


def run(args) -> int:
    from tifaforge.config import load_config
    from tifaforge.engine.generate import Engine
    from tifaforge.utils import atomic_write_json

    cfg = load_config(args.config, args.set)
    s = mine_pairs(Engine.load(args.model), args.prompts, args.out, cfg.mining, cfg.sampling, reward=cfg.reward)
    atomic_write_json(Path(args.out).with_suffix(".summary.json"), s)
    from tifaforge.config import save_resolved

    save_resolved(cfg, Path(args.out).parent, Path(args.out).stem + ".config.yaml")
    print(f"{s['pairs']} pairs from {s['prompts']} prompts: {s['natural']} prompts gave natural pairs, "
          f"{s['synthetic']} synthetic ones, "
          f"{s['impossible']} impossible" + "".join(f"\n  {v} x {k}" for k, v in s["why_impossible"].items()))
    print(f"wrote {args.out}")
    return 0


def mine_pairs(engine, prompts_path: str | Path, out: str | Path, cfg: MiningConfig, sampling, progress: bool = True,
               reward=None) -> dict:
    """Mine pairs for every prompt of the split; write JSONL (DESIGN §2a) atomically; return the summary."""
    lines, outcomes, n = mine_shard(engine, prompts_path, cfg, sampling, progress, reward)
    return write_pairs(out, [lines], [outcomes], n)


def write_pairs(out: str | Path, lines: list[list], outcomes: list[Counter], n: int) -> dict:
    """The shards' pairs in prompt order (one shard, or one per rank), written atomically; the summary."""
    from tifaforge.utils import atomic_write_text

    rows = sorted((row for shard in lines for row in shard), key=lambda row: row[0])  # stable within a prompt
    atomic_write_text(out, "".join(line + "\n" for _, line in rows))
    return summary(sum(outcomes, Counter()), n)


def mine_shard(engine, prompts_path: str | Path, cfg: MiningConfig, sampling, progress: bool = True, reward=None,
               rank: int = 0, world: int = 1) -> tuple[list[tuple[int, str]], Counter, int]:
    """Mine the prompts i of the split with i % world == rank: ((prompt index, JSON line) per pair,
    outcome counts, prompts in the split). A prompt's answers, seeds and injection draws depend on its
    index alone, so N ranks together mine what one process mines."""
    from tqdm import tqdm

    from tifaforge.data.conversations import check_file, select_split, to_chat
    from tifaforge.engine.generate import Request
    from tifaforge.rewards.literary import LogicReward, reward_with_user

    records, _ = check_file(prompts_path, "prompts")
    records = select_split(records, cfg.split, prompts_path, "mining.split")
    reward = LogicReward(reward_with_user(reward, cfg.user_name))  # the run's `reward` section
    if cfg.slop_list:
        from tifaforge.eval.heldout import read_slop_list
        from tifaforge.utils import resolve_path

        cfg = dataclasses.replace(cfg, slop_list=tuple(read_slop_list(resolve_path(cfg.slop_list))))
    mine = dataclasses.replace(sampling, temperature=cfg.temperature, top_p=cfg.top_p,
                               repetition_penalty=cfg.repetition_penalty, max_new_tokens=cfg.max_new_tokens)
    lines, outcomes = [], Counter()
    per_call = max(1, ROWS_PER_CALL // cfg.k)  # several prompts' K answers decode together
    mine_idx = list(range(rank, len(records), world))
    bar = tqdm(total=len(mine_idx), desc="mining", unit="prompt", disable=not progress)
    for start in range(0, len(mine_idx), per_call):
        batch = mine_idx[start:start + per_call]
        chats = [to_chat(records[i], cfg.user_name) for i in batch]
        reqs = [Request(engine.render(chat), dataclasses.replace(mine, seed=cfg.seed + i * cfg.k + j))
                for i, chat in zip(batch, chats) for j in range(cfg.k)]
        texts = [r.text for r in engine.generate(reqs)]
        for at, (i, chat) in enumerate(zip(batch, chats)):
            rec, answers = records[i], texts[at * cfg.k:(at + 1) * cfg.k]
            ctx = reward.context(chat, rec.card.to_dict() if rec.card is not None else None)
            pairs, outcome = pick_pairs(reward, ctx, answers, cfg, random.Random(cfg.seed * 1_000_003 + i))
            outcomes[outcome] += 1
            outcomes["pairs"] += len(pairs)
            lines += [(i, json.dumps({"id": rec.id, "messages": chat, **pair}, ensure_ascii=False)) for pair in pairs]
        bar.update(len(chats))
    bar.close()
    return lines, outcomes, len(records)


def summary(outcomes: Counter, n: int) -> dict:
    why = {k.split(":", 1)[1]: v for k, v in outcomes.items() if k.startswith("impossible:")}
    return {"prompts": n, "pairs": outcomes["pairs"], "natural": outcomes["natural"], "synthetic": outcomes["synthetic"],
            "impossible": sum(why.values()), "why_impossible": why}


def inject_repetition(answer: str, rng: random.Random) -> str:
    """A looping version of a good answer, the two ways models loop (as in DITTO): half the time one
    of its sentences restated several times after it, otherwise a short phrase from somewhere in it
    repeated until the end (the stuck n-gram loop, 「一个一个一个……」).

    The think block is kept as it is; only the answer after `</think>` loops, which is where the
    repetition rule looks.
    """
    from tifaforge.chat.template import THINK_CLOSE
    from tifaforge.rewards.rules import sentences

    head, sep, body = answer.rpartition(THINK_CLOSE)
    sents = [s for _, s in sentences(body) if len(s.strip()) >= 4]
    text = body.rstrip()
    if sents and rng.random() < 0.5:
        s = rng.choice(sents).strip()
        return head + sep + text + "\n\n" + "\n\n".join([s] * 3)
    if len(text.strip()) < 6:
        return head + sep + text + (text.strip() or "……") * 6
    start = len(text) - len(text.lstrip())
    pos = rng.randrange(start, len(text) - 2)
    piece = text[pos:pos + rng.randint(2, 4)]
    return head + sep + text[:pos] + piece * 10


def slop_of(ctx, answer: str, cfg: MiningConfig) -> float:
    """The answer's slop-phrase hits per 100 units (0 without a slop list; `cfg.slop_list` read into phrases)."""
    if not cfg.slop_list:
        return 0.0
    from tifaforge.chat.template import split_reasoning
    from tifaforge.eval.heldout import slop_rate

    phrases = cfg.slop_list
    if isinstance(phrases, str):  # a path not yet read (mine_shard reads it once into a tuple of phrases)
        from tifaforge.eval.heldout import read_slop_list
        from tifaforge.utils import resolve_path

        phrases = read_slop_list(resolve_path(phrases))
    return slop_rate(split_reasoning(answer, started_in_think=ctx.started_in_think)[1], phrases)


def classify(reward, ctx, answer: str, cfg: MiningConfig) -> str:
    """'bad' (repetitive, or slop with a slop list), 'good' (passes repetition and format, no slop) or 'neither'."""
    from tifaforge.rewards import rules

    rep = rules.repetition(ctx, answer).score
    slop = slop_of(ctx, answer, cfg)
    if (rep is not None and rep < cfg.bad_below) or (cfg.slop_list and slop >= cfg.slop_above):
        return "bad"
    if rep is not None and rep >= cfg.good_at_least and rules.think_format(ctx, answer).score == 1.0:
        return "good"
    return "neither"


def pick_pair(reward, ctx, answers: list[str], cfg: MiningConfig, rng: random.Random) -> tuple[dict | None, str]:
    """(pair or None, outcome): natural, synthetic, or impossible:<why> (the first of `pick_pairs`)."""
    pairs, outcome = pick_pairs(reward, ctx, answers, dataclasses.replace(cfg, pairs_per_prompt=1), rng)
    return (pairs[0] if pairs else None), outcome


def pick_pairs(reward, ctx, answers: list[str], cfg: MiningConfig, rng: random.Random) -> tuple[list[dict], str]:
    """(pairs, outcome) for one prompt's answers: up to `pairs_per_prompt` natural pairs, the most
    repetitive answer against the least repetitive good one, the next against the next (no answer used
    twice); where there is no repetitive answer, one synthetic pair; or none and why."""
    from tifaforge.rewards import rules

    kinds = [classify(reward, ctx, a, cfg) for a in answers]
    from tifaforge.chat.template import split_reasoning

    rep = {a: (rules.repetition(ctx, a).score,
               rules.ngram_repetition_rate(split_reasoning(a, started_in_think=ctx.started_in_think)[1], 4),
               slop_of(ctx, a, cfg))
           for a in set(answers)}
    good = sorted({a for a, k in zip(answers, kinds) if k == "good"},
                  key=lambda a: (rep[a][1], rep[a][2], answers.index(a)))
    bad = sorted({a for a, k in zip(answers, kinds) if k == "bad"},
                 key=lambda a: (rep[a][0], -rep[a][1], -rep[a][2], answers.index(a)))
    if good and bad:
        n = min(len(good), len(bad), cfg.pairs_per_prompt)
        return [{"chosen": c, "rejected": r, "synthetic": False} for c, r in zip(good[:n], bad[:n])], "natural"
    if not good:
        return [], "impossible:no answer passes the repetition and format rules"
    if not cfg.synthesize:
        return [], "impossible:no repetitive answer (synthesis off)"
    rejected = inject_repetition(good[0], rng)
    if classify(reward, ctx, rejected, cfg) != "bad":
        return [], "impossible:injected repetition did not fail the rule"
    return [{"chosen": good[0], "rejected": rejected, "synthetic": True}], "synthetic"
