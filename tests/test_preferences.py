import json
import random

import pytest

from tifaforge.config import SamplingConfig
from tifaforge.data.preferences import MiningConfig, classify, inject_repetition, mine_pairs, pick_pair
from tifaforge.rewards import rules
from tifaforge.rewards.literary import LogicReward, RewardConfig

GOOD = "<think>\n他想起了往事。\n</think>\n\n沈青崖放下酒杯，望向窗外的雨。“这雨下得正好。”他低声说，“能洗掉路上的血腥气。”"
LOOP = "<think>\n想。\n</think>\n\n走吧走吧走吧走吧走吧走吧走吧走吧走吧走吧走吧走吧走吧走吧"


@pytest.fixture(scope="module")
def reward():
    return LogicReward(RewardConfig())


@pytest.fixture(scope="module")
def ctx(reward):
    return reward.context([{"role": "user", "content": "外面下雨了。"}])


def test_classify(reward, ctx):
    cfg = MiningConfig()
    assert classify(reward, ctx, GOOD, cfg) == "good"
    assert classify(reward, ctx, LOOP, cfg) == "bad"
    assert classify(reward, ctx, "没有思考块的回答，平平常常。", cfg) == "neither"


def test_injected_repetition_fails_the_rule(reward, ctx):
    for seed in range(5):
        looped = inject_repetition(GOOD, random.Random(seed))
        assert looped.startswith("<think>\n他想起了往事。\n</think>")  # the think block is untouched
        assert rules.repetition(ctx, looped).score < MiningConfig().bad_below
        assert rules.repetition(ctx, looped).message  # and the rule says why


def test_pick_pair_natural_synthetic_impossible(reward, ctx):
    cfg, rng = MiningConfig(), random.Random(0)
    pair, outcome = pick_pair(reward, ctx, [GOOD, LOOP], cfg, rng)
    assert outcome == "natural" and pair == {"chosen": GOOD, "rejected": LOOP, "synthetic": False}
    pair, outcome = pick_pair(reward, ctx, [GOOD, GOOD], cfg, rng)
    assert outcome == "synthetic" and pair["synthetic"] and pair["chosen"] == GOOD
    assert rules.repetition(ctx, pair["rejected"]).score < rules.repetition(ctx, pair["chosen"]).score
    _, outcome = pick_pair(reward, ctx, [GOOD], MiningConfig(synthesize=False), rng)
    assert outcome == "impossible:no repetitive answer (synthesis off)"
    _, outcome = pick_pair(reward, ctx, [LOOP, "平平常常。"], cfg, rng)
    assert outcome.startswith("impossible:no answer passes")


@pytest.fixture(scope="module")
def looping_model(tiny_model_dir, tmp_path_factory):
    """The tiny preset trained on replies that loop a quarter of the time: sampling gives both kinds."""
    from tifaforge.chat.template import render
    from tifaforge.models.load import load_tokenizer
    from tifaforge.models.presets import warm_up

    tok = load_tokenizer(tiny_model_dir)
    rng = random.Random(0)
    words = ["雨", "剑", "酒", "灯", "风", "月", "江", "山"]
    texts = []
    for i in range(400):
        w = rng.choice(words)
        answer = f"{w}走吧" * 12 if i % 4 == 0 else f"他看着{w}，想起了{rng.choice(words)}和{rng.choice(words)}的往事。"
        chat = [{"role": "user", "content": f"说说{w}。"}, {"role": "assistant", "content": f"<think>\n想{w}。\n</think>\n\n{answer}"}]
        texts.append(render(chat, tok, training=True))
    return warm_up(tiny_model_dir, tmp_path_factory.mktemp("loop") / "model", texts, steps=120, seq_len=64)


@pytest.mark.slow
def test_mining_a_looping_model_gives_natural_pairs(looping_model, tmp_path):
    from tifaforge.engine.generate import Engine

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "messages": [{"role": "user", "content": f"说说{w}。"}],
                                           "split": "train"}, ensure_ascii=False) + "\n"
                               for i, w in enumerate("雨剑酒")), encoding="utf-8")
    cfg = MiningConfig(k=8, max_new_tokens=40, synthesize=False, temperature=1.0)
    summary = mine_pairs(Engine.load(looping_model, device="cpu"), prompts, tmp_path / "pairs.jsonl", cfg,
                         SamplingConfig(), progress=False)
    pairs = [json.loads(x) for x in (tmp_path / "pairs.jsonl").read_text(encoding="utf-8").splitlines()]
    assert summary["natural"] >= 1 and len(pairs) == summary["natural"] + summary["synthetic"]
    reward = LogicReward(RewardConfig())
    for p in pairs:
        c = reward.context(p["messages"])
        assert rules.ngram_repetition_rate(p["rejected"]) > rules.ngram_repetition_rate(p["chosen"])
        assert rules.repetition(c, p["rejected"]).score < rules.repetition(c, p["chosen"]).score
    from tifaforge.data.conversations import check_file

    records, report = check_file(tmp_path / "pairs.jsonl", "prefs")  # the output is a valid prefs file
    assert len(records) == len(pairs)


def test_mining_reports_every_prompt(trained_tiny_dir, tmp_path, engine):
    cfg = MiningConfig(k=2, max_new_tokens=8, split="eval")
    from tifaforge.eval.metrics import ROOT

    summary = mine_pairs(engine, ROOT / "data/demo/prompts.jsonl", tmp_path / "p.jsonl", cfg, SamplingConfig(), progress=False)
    assert summary["prompts"] == 10
    assert summary["natural"] + summary["synthetic"] + summary["impossible"] == 10
    assert sum(summary["why_impossible"].values()) == summary["impossible"]
