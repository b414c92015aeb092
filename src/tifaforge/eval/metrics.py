"""Role-play evaluation: generate on held-out prompts through the engine, measure, bootstrap.

    tifa eval models/tiny --out runs/eval-tiny

Per answer (then averaged with bootstrap 95% intervals): think-format rate, the logic reward and
each rule's score, character n-gram repetition, cross-turn overlap with earlier assistant turns,
refusal rate, in-character rate, answer length, and the held-out metrics no rule trains on
(eval/heldout.py: MATTR, self-overlap among a prompt's answers; slop is added by the report, over
every model at once); over all answers: distinct-1/2 and the compression ratio; and perplexity on
held-out novel text. Generation uses the seed's sampling with a fixed seed (per prompt), so two
evaluations of one model give the same numbers.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from tifaforge.config import EvalConfig
from tifaforge.utils import resolve_path



PER_ANSWER = ("think_format", "reward", "repetition_4gram", "cross_turn_overlap", "refusal", "in_character",
              "answer_length", "mattr", "self_overlap", "slop")


def bootstrap_ci(values: list[float], n: int = 1000, seed: int = 0,
                 groups: list | None = None) -> tuple[float, float, float]:
    """(mean, low, high): the mean and a percentile-bootstrap 95% interval.

    `groups` (one label per value, e.g. the prompt each answer came from): resample whole groups, so
    several answers to one prompt do not pass for independent evidence (a cluster bootstrap)."""
    if not values:
        return (math.nan, math.nan, math.nan)
    rng = random.Random(seed)
    clusters: dict = {}
    for i, v in enumerate(values):
        clusters.setdefault(i if groups is None else groups[i], []).append(v)
    sums = [(sum(c), len(c)) for c in clusters.values()]
    k = len(sums)
    means = []
    for _ in range(n):
        total = count = 0
        for _ in range(k):
            s_, c_ = sums[rng.randrange(k)]
            total, count = total + s_, count + c_
        means.append(total / count)
    means.sort()
    return (sum(values) / len(values), means[int(0.025 * (n - 1))], means[int(0.975 * (n - 1))])


def answer_metrics(reward, ctx, answer: str) -> dict[str, float]:
    """Per-answer metrics of one generated text (think block included) in its context."""
    from tifaforge.chat.template import split_reasoning
    from tifaforge.eval.heldout import mattr
    from tifaforge.rewards import rules

    res = reward.score(ctx, answer)
    _, content = split_reasoning(answer, started_in_think=ctx.started_in_think)
    out = {
        "think_format": float(rules.think_format(ctx, answer).score == 1.0),
        "reward": res.total,
        "repetition_4gram": rules.ngram_repetition_rate(content, 4),
        "cross_turn_overlap": rules.cross_turn_overlap(content, ctx.previous_answers),
        "refusal": float((rules.refusal(ctx, answer).score or 0.0) < 0.5),
        "in_character": float(rules.in_character(ctx, answer).score == 1.0),
        "answer_length": float(len(rules.units(content))),
        "mattr": mattr(content),
    }
    out.update({f"rule/{name}": r.score for name, r in res.rules.items() if r.score is not None})
    return out


def summarise(rows: list[dict[str, float]], contents: list[str], n_boot: int, seed: int = 0,
              groups: list | None = None) -> dict:
    """Means with 95% intervals for every per-answer metric (resampling `groups`, one label per row,
    when given); corpus-level distinct-n and compression ratio."""
    from tifaforge.eval.heldout import compression_ratio
    from tifaforge.rewards.rules import distinct_n

    keys = sorted({k for r in rows for k in r})
    out = {}
    for k in keys:
        have = [i for i, r in enumerate(rows) if k in r]
        mean, lo, hi = bootstrap_ci([rows[i][k] for i in have], n_boot, seed,
                                    None if groups is None else [groups[i] for i in have])
        out[k] = {"mean": mean, "low": lo, "high": hi}
    for n in (1, 2):
        out[f"distinct_{n}"] = {"mean": distinct_n(contents, n)}
    out["compression_ratio"] = {"mean": compression_ratio(contents)}
    return out


def add_self_overlap(rows: list[dict], samples: list[dict], contents: list[str], groups: list) -> None:
    """Each answer's self-overlap with the other answers to its prompt (eval.samples > 1), in place."""
    from tifaforge.eval.heldout import self_overlap

    by_prompt: dict = {}
    for i, g in enumerate(groups):
        by_prompt.setdefault(g, []).append(i)
    for idx in by_prompt.values():
        if len(idx) < 2:
            continue
        for i, v in zip(idx, self_overlap([contents[i] for i in idx])):
            rows[i]["self_overlap"] = samples[i]["self_overlap"] = v


def perplexity(model, tokenizer, text: str, window: int = 512) -> float:
    """Token perplexity of `text` in non-overlapping windows (exp of the mean next-token loss)."""
    import torch

    ids = tokenizer(text, add_special_tokens=False).input_ids
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, max(1, len(ids) - 1), window):
            chunk = torch.tensor([ids[start:start + window + 1]], device=model.device)
            if chunk.shape[1] < 2:
                break
            loss = model(input_ids=chunk[:, :-1], labels=None).logits.float().log_softmax(-1)
            nll = -loss.gather(-1, chunk[:, 1:, None]).squeeze(-1)  # (1, T)
            total, count = total + nll.sum().item(), count + nll.numel()
    return math.exp(total / count) if count else math.nan


def load_prompts(cfg: EvalConfig):
    """(records, base folder) of the eval split; a missing file or empty split is an error."""
    from tifaforge.data.conversations import check_file, select_split

    path = resolve_path(cfg.prompts)
    records, _ = check_file(path, "prompts")
    chosen = select_split(records, cfg.split, path, "eval.split")
    return chosen[: cfg.limit or None], path.parent


def eval_key(model_dir: str | Path, cfg: EvalConfig, sampling, reward=None) -> str:
    """What an evaluation's numbers depend on, hashed: the eval settings, the sampling, the reward
    section, the package version and the model's weight files (name, size, mtime). Two evaluations with
    one key give the same numbers (fixed seeds), so a result carrying it can be reused (the DPO stage's
    before/after evaluations are the pipeline's final ones for those two models). The prompts and
    held-out text count by content, not by path."""
    import dataclasses
    import hashlib
    import json

    from tifaforge import __version__

    weights = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in Path(model_dir).iterdir()
                     if f.suffix in (".safetensors", ".bin", ".gguf", ".pt"))
    # what is measured after generation (the slop reference, the judge) is redone on every evaluation
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "slop_reference" and not k.startswith("judge")}
    what = {"eval": settings, "sampling": dataclasses.asdict(sampling),
            "reward": dataclasses.asdict(reward) if reward is not None else None, "version": __version__,
            "weights": weights,
            "files": {name: hashlib.sha256(resolve_path(f).read_bytes()).hexdigest() if f and resolve_path(f).is_file() else None
                      for name, f in (("prompts", cfg.prompts), ("ppl_text", cfg.ppl_text))}}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def evaluate(engine, cfg: EvalConfig, sampling, progress: bool = True, reward=None,
             shard: tuple[int, int] = (0, 1)) -> dict:
    """Generate on the eval prompts and measure; returns {"metrics", "samples", "n", ...}.

    `shard` (rank, world): on N processes each rank answers every N-th (prompt, sample) slot, the
    answers are gathered in slot order and every rank measures them all (seeds follow the slot)."""
    import dataclasses

    from tqdm import tqdm

    from tifaforge.data.conversations import to_chat
    from tifaforge.engine.generate import Request
    from tifaforge.rewards import rules
    from tifaforge.rewards.literary import LogicReward, reward_with_user

    records, _ = load_prompts(cfg)
    reward = LogicReward(reward_with_user(reward, cfg.user_name))  # the run's `reward` section, as MGRPO trains on
    # Answer j of prompt i has seed `seed + i + j * prompts`: with one answer each, prompt i's seed is seed + i.
    rank, world = shard
    slots = [(i, j) for j in range(cfg.samples) for i in range(len(records))]
    mine = list(range(rank, len(slots), world))
    jobs = [slots[k] for k in mine]
    rows, contents, samples, groups = [], [], [], []
    passes = [("", sampling)]
    if cfg.unpenalised:
        passes.append(("_unpenalised", dataclasses.replace(sampling, repetition_penalty=1.0, presence_penalty=0.0,
                                                           frequency_penalty=0.0, dry_multiplier=0.0)))
    bar = tqdm(total=len(jobs) * len(passes), desc="eval", unit="answer", disable=not progress)
    for suffix, setting in passes:
        for b in range(0, len(jobs), cfg.batch_size):
            batch = jobs[b:b + cfg.batch_size]
            chats = [to_chat(records[i], cfg.user_name) for i, _ in batch]
            reqs = [Request(engine.render(c), dataclasses.replace(setting, max_new_tokens=cfg.max_new_tokens,
                                                                  seed=cfg.seed + i + j * len(records)))
                    for (i, j), c in zip(batch, chats)]
            for at, ((i, j), chat, res) in enumerate(zip(batch, chats, engine.generate(reqs)), start=b):
                if suffix:  # the same answer slot, generated without penalties: its repetition only
                    rate = rules.ngram_repetition_rate(res.content, 4)
                    rows[at]["repetition_4gram" + suffix] = samples[at]["repetition_4gram" + suffix] = rate
                    continue
                rec = records[i]
                ctx = reward.context(chat, rec.card.to_dict() if rec.card is not None else None)
                m = answer_metrics(reward, ctx, res.text)
                rows.append(m)
                contents.append(res.content)
                groups.append(i)
                samples.append({"id": rec.id, "sample": j, "answer": res.text, "finish_reason": res.finish_reason, **m})
            bar.update(len(batch))
    bar.close()
    if world > 1:  # every rank's answers, back in slot order
        from tifaforge.train import distributed as dist

        parts = [x for part in dist.gather(list(zip(mine, rows, contents, samples, groups))) for x in part]
        _, rows, contents, samples, groups = (list(c) for c in zip(*sorted(parts, key=lambda x: x[0])))
    add_self_overlap(rows, samples, contents, groups)
    metrics = summarise(rows, contents, cfg.bootstrap, cfg.seed, groups)
    if cfg.ppl_text and resolve_path(cfg.ppl_text).exists():
        text = resolve_path(cfg.ppl_text).read_text(encoding="utf-8")
        metrics["perplexity"] = {"mean": perplexity(engine.model, engine.tokenizer, text)}
    return {"n": len(records), "samples_per_prompt": cfg.samples, "max_new_tokens": cfg.max_new_tokens,
            "metrics": metrics, "samples": samples}
