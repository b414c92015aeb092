import json
import random

import pytest

from tifaforge.config import MiningConfig, RewardConfig, SamplingConfig
from tifaforge.stages.mining import classify, inject_repetition, mine_pairs, pick_pair, pick_pairs
from tifaforge.rewards import rules
from tifaforge.rewards.literary import LogicReward
from tifaforge.utils import REPO_ROOT as ROOT

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



def test_a_slop_list_rejects_answers_full_of_its_phrases(reward, ctx, tmp_path):
    """With mining.slop_list, an answer that does not loop but leans on the listed phrases is the
    rejected side of a natural pair, and the chosen side is the clean answer."""
    sloppy = ("<think>\n他想起了往事。\n</think>\n\n沈青崖的眼中闪过一丝狡黠，嘴角勾起一抹微笑。"
              "窗外的雨声中，他的眼中闪过一丝寒意，心中涌起一股暖流。")
    (tmp_path / "slop.json").write_text(json.dumps({"phrases": [{"phrase": "闪过一丝"}, {"phrase": "勾起一抹"},
                                                                {"phrase": "涌起一股"}]}, ensure_ascii=False))
    plain = MiningConfig(synthesize=False)
    assert classify(reward, ctx, sloppy, plain) == "good"  # no loop: repetition alone passes it
    cfg = MiningConfig(synthesize=False, slop_list=str(tmp_path / "slop.json"))
    assert classify(reward, ctx, sloppy, cfg) == "bad" and classify(reward, ctx, GOOD, cfg) == "good"
    pairs, outcome = pick_pairs(reward, ctx, [sloppy, GOOD], cfg, random.Random(0))
    assert outcome == "natural" and pairs[0]["chosen"] == GOOD and pairs[0]["rejected"] == sloppy
    assert pick_pairs(reward, ctx, [sloppy, GOOD], plain, random.Random(0))[1].startswith("impossible")

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


def test_pick_pairs_several_per_prompt_worst_against_best(reward, ctx):
    """With pairs_per_prompt = 2: the most repetitive answer against the least repetitive good one, then
    the next two; no answer is used twice, and no more pairs than either side has."""
    good2 = "<think>\n他想起了往事。\n</think>\n\n沈青崖笑了笑，把剑横在膝上。“雨停之前，谁也别走。”"
    loop2 = "<think>\n想。\n</think>\n\n他说好的好的，他说好的好的，他说好的好的，他说好的好的，然后走进雨里。"
    assert max(rules.repetition(ctx, a).score for a in (LOOP, loop2)) < MiningConfig().bad_below
    assert rules.ngram_repetition_rate(LOOP) > rules.ngram_repetition_rate(loop2)  # LOOP is the worse one
    cfg, rng = MiningConfig(pairs_per_prompt=2), random.Random(0)
    pairs, outcome = pick_pairs(reward, ctx, [loop2, GOOD, LOOP, good2], cfg, rng)
    assert outcome == "natural" and len(pairs) == 2
    assert [p["rejected"] for p in pairs] == [LOOP, loop2]  # the worst first
    assert {p["chosen"] for p in pairs} == {GOOD, good2} and not any(p["synthetic"] for p in pairs)
    assert len(pick_pairs(reward, ctx, [loop2, GOOD, LOOP], cfg, rng)[0]) == 1  # one good answer: one pair
    assert len(pick_pairs(reward, ctx, [loop2, GOOD, LOOP, good2], MiningConfig(), rng)[0]) == 1  # the default


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
    cfg = MiningConfig(k=8, max_new_tokens=40, synthesize=False, temperature=1.0, top_p=1.0)
    summary = mine_pairs(Engine.load(looping_model, device="cpu"), prompts, tmp_path / "pairs.jsonl", cfg,
                         SamplingConfig(), progress=False)
    pairs = [json.loads(x) for x in (tmp_path / "pairs.jsonl").read_text(encoding="utf-8").splitlines()]
    assert summary["natural"] >= 1 and len(pairs) == summary["pairs"] == summary["natural"] + summary["synthetic"]
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
    summary = mine_pairs(engine, ROOT / "data/demo/prompts.jsonl", tmp_path / "p.jsonl", cfg, SamplingConfig(), progress=False)
    assert summary["prompts"] == 25
    assert summary["natural"] + summary["synthetic"] + summary["impossible"] == 25
    assert sum(summary["why_impossible"].values()) == summary["impossible"]


# ---------------------------------------------------------------------------------------------
# The DPO stage (stages/dpo.py)


def _prompts_file(path, words, split):
    path.write_text("".join(json.dumps({"id": f"{split}{i}", "messages": [{"role": "user", "content": f"说说{w}。"}],
                                        "split": split}, ensure_ascii=False) + "\n" for i, w in enumerate(words)),
                    encoding="utf-8")
    return path


def _dpo_cfg(*sets):
    from tifaforge.config import load_config

    base = ["dpo.steps=6", "dpo.batch_size=2", "dpo.max_length=96", "dpo.learning_rate=0.001", "dpo.warmup=0",
            "dpo.lr_scheduler=constant", "dpo.log_every=1", "dpo.save_every=3", "dpo.samples_every=1000",
            "dpo.sample_max_new_tokens=8", "eval.ppl_text=", "eval.bootstrap=10"]
    return load_config(None, [*base, *sets])


def test_dpo_step_lowers_the_loss_and_widens_the_margin(trained_tiny_dir, tmp_path):
    """A hand-built pair, plain DPO (no SFT term): the loss falls and the chosen-rejected margin widens."""
    from tifaforge.stages import dpo
    from tifaforge.train.metrics import JsonlLog

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"messages": [{"role": "user", "content": "外面下雨了。"}], "chosen": GOOD,
                                 "rejected": LOOP}, ensure_ascii=False) + "\n", encoding="utf-8")
    cfg = _dpo_cfg("dpo.mine=false", f"dpo.pairs={pairs}", "dpo.sft_weight=0", "dpo.report=false", "dpo.batch_size=1")
    model = dpo.run_stage(cfg, trained_tiny_dir, tmp_path / "04-dpo")
    rows = [r for r in JsonlLog(tmp_path / "04-dpo" / "metrics.jsonl").rows() if "loss" in r and "rewards/margins" in r]
    assert len(rows) == 6
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.1, rows
    assert rows[-1]["rewards/margins"] > rows[0]["rewards/margins"] + 0.5, rows
    assert (model / "config.json").exists() and (tmp_path / "04-dpo" / "plots" / "rewards_margins.png").exists()
    assert json.loads((tmp_path / "04-dpo" / "data_report.json").read_text()) == {"pairs": 1, "used": 1, "dropped": []}


def test_dpo_bad_pairs_are_reported_per_line(tmp_path, tiny_tokenizer):
    from tifaforge.errors import TifaError
    from tifaforge.stages.dpo import pair_dataset, user_pairs

    def line(chosen, rejected, user="外面下雨了。"):
        return json.dumps({"messages": [{"role": "user", "content": user}], "chosen": chosen, "rejected": rejected},
                          ensure_ascii=False) + "\n"

    same = tmp_path / "same.jsonl"
    same.write_text(line(GOOD, LOOP) + line(GOOD, GOOD), encoding="utf-8")
    with pytest.raises(TifaError, match=r"same\.jsonl:2: rejected: identical to chosen"):
        user_pairs(str(same), "小林")
    empty = tmp_path / "empty.jsonl"
    empty.write_text(line(GOOD, "<think>\n想。\n</think>\n\n  "), encoding="utf-8")
    with pytest.raises(TifaError, match=r"empty\.jsonl:1: rejected: empty answer"):
        user_pairs(str(empty), "小林")
    long = tmp_path / "long.jsonl"
    long.write_text(line(GOOD, LOOP) + line(GOOD, LOOP, user="雨" * 200), encoding="utf-8")
    pairs = user_pairs(str(long), "小林")
    cfg = _dpo_cfg("dpo.max_length=64").dpo
    ds, dropped = pair_dataset(pairs, tiny_tokenizer, cfg)
    assert len(ds) == 1 and len(dropped) == 1 and "long.jsonl:2: messages: the prompt is" in dropped[0]
    cfg.too_long = "error"
    with pytest.raises(TifaError, match=r"long\.jsonl:2: messages: the prompt is \d+ tokens, it fills dpo.max_length"):
        pair_dataset(pairs, tiny_tokenizer, cfg)


@pytest.mark.slow
def test_dpo_on_mined_pairs_lowers_repetition_on_held_out_prompts(looping_model, tmp_path):
    """End to end: mine the looping model's own answers, train DPO (+ SFT term), and the before/after
    report on held-out prompts shows less repetition."""
    from tifaforge.stages import dpo

    train = _prompts_file(tmp_path / "train.jsonl", "雨剑酒灯风月", "train")
    held = _prompts_file(tmp_path / "eval.jsonl", "江山雨剑酒灯", "eval")
    cfg = _dpo_cfg(f"dpo.prompts={train}", f"eval.prompts={held}", "eval.max_new_tokens=40", "eval.batch_size=6",
                   "mining.k=8", "mining.max_new_tokens=40", "mining.temperature=1.0", "mining.top_p=1.0", "mining.synthesize=true",
                   "sampling.temperature=1.0", "sampling.top_p=1.0", "sampling.repetition_penalty=1.0",
                   "dpo.steps=12", "dpo.max_length=128", "dpo.learning_rate=0.002", "dpo.beta=0.1",
                   "dpo.sft_weight=0.5")
    dpo.run_stage(cfg, looping_model, tmp_path / "04-dpo")
    out = tmp_path / "04-dpo"
    summary = json.loads((out / "pairs.summary.json").read_text())
    assert summary["natural"] >= 1 and summary["prompts"] == 6
    report = json.loads((out / "report.json").read_text())
    before, after = report["before"]["repetition_4gram"]["mean"], report["after"]["repetition_4gram"]["mean"]
    assert after < before, (before, after)
    text = (out / "report.md").read_text(encoding="utf-8")
    assert "4-gram repetition rate" in text and "distinct-2" in text
    assert ("Warning: distinct-2 dropped" in text) == report["distinct_2_dropped"]


def test_dpo_report_flags_a_distinct_2_drop(tmp_path):
    from tifaforge.stages.dpo import write_report

    def res(rep, d2):
        return {"n": 3, "max_new_tokens": 8, "metrics": {"repetition_4gram": {"mean": rep}, "distinct_1": {"mean": 0.5},
                                                        "distinct_2": {"mean": d2}}}

    text = write_report(tmp_path, res(0.4, 0.8), res(0.1, 0.6), 5, 5)
    assert "| 4-gram repetition rate ↓ | 0.4 | 0.1 | -0.3 (better) |" in text
    assert "Warning: distinct-2 dropped from 0.8 to 0.6" in text
    assert "Warning" not in write_report(tmp_path, res(0.4, 0.8), res(0.1, 0.9), 5, 5)


def test_dpo_with_lora_saves_a_merged_plain_model(trained_tiny_dir, tmp_path):
    """LoRA DPO (the reference is the model with its adapters off): model/ is a plain merged folder."""
    import torch
    from safetensors.torch import load_file

    from tifaforge.stages import dpo

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"messages": [{"role": "user", "content": "外面下雨了。"}], "chosen": GOOD,
                                 "rejected": LOOP}, ensure_ascii=False) + "\n", encoding="utf-8")
    cfg = _dpo_cfg("dpo.mine=false", f"dpo.pairs={pairs}", "dpo.report=false", "dpo.batch_size=1", "dpo.steps=2",
                   "dpo.lora.enabled=true", "dpo.lora.r=4", "dpo.lora.alpha=8", "dpo.learning_rate=0.01")
    model = dpo.run_stage(cfg, trained_tiny_dir, tmp_path / "04-dpo")
    assert not (model / "adapter_config.json").exists()
    a, b = load_file(trained_tiny_dir / "model.safetensors"), load_file(model / "model.safetensors")
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_mining_split_over_ranks_equals_mining_whole(looping_model, tmp_path):
    """Each rank mines every N-th prompt; merged in prompt order they are the one-process pairs and
    summary (a prompt's seeds and synthetic draws depend on its index alone)."""
    from tifaforge.engine.generate import Engine
    from tifaforge.stages.mining import mine_shard, write_pairs

    engine = Engine.load(looping_model, device="cpu")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "messages": [{"role": "user", "content": f"说说{w}。"}]},
                                          ensure_ascii=False) + "\n" for i, w in enumerate("雨剑酒灯风月江")),
                       encoding="utf-8")
    cfg = MiningConfig(k=4, max_new_tokens=24, temperature=1.0, top_p=1.0, split="")
    whole = mine_pairs(engine, prompts, tmp_path / "whole.jsonl", cfg, SamplingConfig(), progress=False)
    shards = [mine_shard(engine, prompts, cfg, SamplingConfig(), False, None, rank, 3) for rank in range(3)]
    assert {n for _, _, n in shards} == {whole["prompts"]} and [len(s[0]) > 0 for s in shards] == [True] * 3
    split = write_pairs(tmp_path / "split.jsonl", [s[0] for s in shards], [s[1] for s in shards], whole["prompts"])
    assert split == whole and whole["natural"] > 0 and whole["synthetic"] > 0
    assert (tmp_path / "split.jsonl").read_text(encoding="utf-8") == (tmp_path / "whole.jsonl").read_text(encoding="utf-8")
