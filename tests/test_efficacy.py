"""Does the recipe make a better model, and can the evidence be trusted: the held-out metrics on
hand-made texts with known answers, the pairwise judge against a real local endpoint (a scripted one
for the position swap and malformed replies, `tifa serve` for the real thing), per-rule reward
normalisation, effects pooled over seeds, and `tifa ablate` at tiny size.

    .venv/bin/python -m pytest tests/test_efficacy.py
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from tifaforge.config import EvalConfig, SamplingConfig, load_config
from tifaforge.errors import TifaError
from tifaforge.eval import heldout as H
from test_rewards import judge_server  # noqa: F401  (fixture)

LOOP = "她笑了笑说好的。" * 12
DIVERSE = ("夜风掠过长安城的屋脊，檐角铜铃细碎作响。楚夜立在瓦上，衣袂猎猎，月光沿着刀鞘流成一道冷白的线。"
           "远处更鼓隐约，空气里混着雨后泥土的腥味；他指尖搭在刀柄上，冰凉的金属让心绪慢慢沉静。")


# ---------------------------------------------------------------------------------------------
# Held-out metrics on texts with known answers


def test_mattr_and_compression_tell_a_loop_from_diverse_prose():
    assert H.mattr(DIVERSE) > 0.75 > 0.3 > H.mattr(LOOP)
    assert H.mattr("a b c d") == 1.0 and H.mattr("") == 0.0
    # MATTR does not fall with length the way a plain type-token ratio does
    assert abs(H.mattr(DIVERSE) - H.mattr(DIVERSE + DIVERSE[::-1])) < 0.1
    assert H.compression_ratio([LOOP]) > 3 * H.compression_ratio([DIVERSE])
    assert H.compression_ratio([]) == 0.0


def test_self_overlap_measures_how_much_a_prompt_s_answers_repeat_each_other():
    same = H.self_overlap([DIVERSE, DIVERSE, "完全不同的一句话，写的是山里的清晨和鸟叫声。"])
    assert same[0] == same[1] == 1.0 and same[2] == 0.0
    assert H.self_overlap(["一二三四五", "六七八九十"]) == [0.0, 0.0]


def test_slop_finds_the_phrase_a_model_overuses_against_human_prose(tmp_path):
    ref = tmp_path / "novels"
    ref.mkdir()
    (ref / "a.txt").write_text(DIVERSE * 30, encoding="utf-8")
    counts, units = H.reference_counts([ref])
    assert units > 1000 and counts[tuple("屋脊")] == 0 and counts[tuple("长安城")] == 30
    answers = [f"她的眼中闪过一丝狡黠。{DIVERSE[i * 5:i * 5 + 20]}" for i in range(6)] + [DIVERSE[:40]] * 2
    found = H.slop_list(answers, counts, units)
    phrases = [x["phrase"] for x in found]
    assert "闪过一丝" in phrases and all("长安" not in p for p in phrases)  # human prose uses 长安城 as often
    top = next(x for x in found if x["phrase"] == "闪过一丝")
    assert top["count"] == 6 and top["answers"] == 6 and top["ratio"] >= H.SLOP_RATIO
    # a phrase only one answer repeats is repetition, not slop
    assert not [x for x in H.slop_list(["反反复复反反复复" * 5], counts, units)]
    assert H.slop_rate("她的眼中闪过一丝狡黠。", ["闪过一丝"]) == pytest.approx(100 / 10)
    assert H.slop_rate(DIVERSE, ["闪过一丝"]) == 0.0
    (tmp_path / "slop.json").write_text(json.dumps({"phrases": found}, ensure_ascii=False), encoding="utf-8")
    assert H.read_slop_list(tmp_path / "slop.json")[:len(phrases)] == phrases
    (tmp_path / "bad.json").write_text('{"phrases": [{"phrase": 3}]}', encoding="utf-8")
    with pytest.raises(TifaError, match=r"bad.json: phrases\[0\]"):
        H.read_slop_list(tmp_path / "bad.json")


def test_the_report_marks_what_the_run_trained_on_and_shows_held_out_metrics():
    from tifaforge.config import RewardConfig
    from tifaforge.eval.report import format_table, trained_metrics

    trained = trained_metrics(RewardConfig(weights={"think_format": 1.0}, vetoes=[]))
    assert trained == {"think_format", "reward"}
    assert {"repetition_4gram", "refusal"} <= trained_metrics(None)  # the defaults weigh repetition, veto refusals
    res = {"m": {"n": 1, "metrics": {"reward": {"mean": 0.5}, "mattr": {"mean": 0.8}, "slop": {"mean": 2.0}}}}
    table = format_table(res, 16, None, RewardConfig(weights={"think_format": 1.0}, vetoes=[]))
    assert "| mean logic reward ↑ | 0.5 | yes |" in table and "| MATTR (lexical diversity) ↑ | 0.8 |  |" in table
    assert "| slop phrases per 100 units ↓ | 2 |  |" in table


def test_effects_pooled_over_seeds_hold_only_when_every_seed_agrees():
    from tifaforge.eval.report import format_pooled, pooled_effects

    def model(values):
        return {"samples": [{"id": f"p{i}", "sample": 0, "reward": v} for i, v in enumerate(values)]}

    base = [0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6]
    seeds_up = [{"a": model(base), "b": model([v + d for v in base])} for d in (0.05, 0.04, 0.06)]
    up = pooled_effects(seeds_up, keys=("reward",), n_boot=300)["b vs a"]["reward"]
    assert up["mean"] == pytest.approx(0.05) and up["low"] > 0 and up["holds"]
    assert up["per_seed"] == pytest.approx([0.05, 0.04, 0.06]) and up["sd"] == pytest.approx(0.01)
    # one seed goes the other way: pooled it may exclude 0, but it does not hold
    mixed = [{"a": model(base), "b": model([v + d for v in base])} for d in (0.08, 0.08, -0.01)]
    m = pooled_effects(mixed, keys=("reward",), n_boot=300)["b vs a"]["reward"]
    assert m["low"] > 0 and not m["holds"]
    assert "| b vs a | mean logic reward | +0.05 [" in format_pooled({"b vs a": {"reward": up}}, ("reward",))


# ---------------------------------------------------------------------------------------------
# Per-rule normalisation (GDPO)


def test_per_rule_normalisation_keeps_a_small_spread_rule_s_signal():
    """Rule A swings 0/1, rule B only 0.9/1.0. Summed, the advantage is almost all A's; per rule, B's
    difference counts as much as A's: (A=1, B=0.9) and (A=0, B=1) tie."""
    from tifaforge.rl.losses import group_advantages, per_rule_values

    rules = [{"a": 1.0, "b": 0.9}, {"a": 0.0, "b": 0.9}, {"a": 1.0, "b": 1.0}, {"a": 0.0, "b": 1.0}]
    weights = {"a": 1.0, "b": 1.0}
    summed, _ = group_advantages(torch.tensor([(r["a"] + r["b"]) / 2 for r in rules]), 4)
    assert summed[0] - summed[3] > 1.5  # A's swing hides B's
    values = per_rule_values(rules, [False] * 4, weights, {}, 4)
    adv, zero = group_advantages(values, 4)
    assert adv[0].item() == pytest.approx(adv[3].item(), abs=0.01) and not zero.any()  # equal but for std + eps
    assert adv[2] > adv[0] > adv[1]
    # a missing score (a judge timeout) is the group's mean for that rule, not 0; a veto is last
    rules[1]["b"] = None
    values = per_rule_values(rules, [False, False, False, True], weights, {}, 4)
    assert values[3] < min(values[:3]) and values[1] < values[0]
    # every rule tied: no signal (the group is counted as zero-spread)
    _, zero = group_advantages(per_rule_values([{"a": 1.0, "b": 0.5}] * 4, [False] * 4, weights, {}, 4), 4)
    assert zero.all()


def test_per_rule_normalisation_in_the_stage(trained_tiny_dir, tmp_path):
    """reward.normalize: per_rule trains (advantages from the per-rule values) and logs as before."""
    from test_mgrpo import stage_cfg

    from tifaforge.stages.mgrpo import run_stage

    cfg = stage_cfg("reward.normalize=per_rule", "mgrpo.steps=1", "reward.answer_length_zh=[200, 400]")
    run_stage(cfg, trained_tiny_dir, tmp_path / "m")
    rows = [json.loads(x) for x in (tmp_path / "m" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rows[0]["sampled"] == rows[0]["sampled_total"] == 2 * 3 + 2 * 3  # pass 1 and every revision


# ---------------------------------------------------------------------------------------------
# The pairwise judge against real endpoints


@pytest.fixture
def judge(judge_server):
    """start(verdict) -> (url, calls): a local endpoint answering verdict(prompt); None is an HTTP 500."""
    def start(verdict):
        calls = Counter()
        return judge_server(reply=staticmethod(verdict), calls=calls), calls

    return start


def _pair(url, before, after):
    from tifaforge.eval.judge import client, pairwise

    cfg = EvalConfig(judge_url=url, judge_timeout=5)
    chats = [[{"role": "user", "content": f"第{i}句"}] for i in range(len(before))]
    return pairwise(client(cfg), chats, ["zh"] * len(before), before, after, 4)


def test_pairwise_judge_swaps_positions_and_reports_agreement(judge):
    good, bad = DIVERSE, LOOP
    # a judge that reads the answers: prefers the one without the loop, in either position
    url, calls = judge(lambda p: "2" if p.split("回答2：")[1].startswith(DIVERSE[:8]) else "1")
    wins, info = _pair(url, [bad, good, bad], [good, bad, bad])
    assert wins == [1.0, 0.0, 0.5] and calls["n"] == 6 and info["calls"] == 6
    assert info["agreement"] == pytest.approx(2 / 3) and info["missing"] == 0
    # a judge that always says "1" follows the position: every slot splits, agreement 0
    url, _ = judge(lambda p: "1")
    wins, info = _pair(url, [bad, good], [good, bad])
    assert wins == [0.5, 0.5] and info["agreement"] == 0.0


def test_malformed_or_failing_judge_replies_are_missing_never_a_verdict(judge):
    from tifaforge.eval.judge import parse_verdict

    assert parse_verdict("回答2更好") == 2 and parse_verdict("1.5") is None and parse_verdict("12") is None
    url, _ = judge(lambda p: "两个都不错" if "第0句" in p else (None if "第1句" in p else "2"))
    wins, info = _pair(url, [LOOP] * 3, [DIVERSE] * 3)
    assert wins[:2] == [None, None] and wins[2] == 0.5 and info["missing"] == 2
    wins, info = _pair("http://127.0.0.1:9/v1", [LOOP], [DIVERSE])  # nothing listens: missing, not an error
    assert wins == [None] and info["agreement"] is None


def test_eval_with_tifa_serve_as_the_judge(trained_tiny_dir, tmp_path):
    """The real thing: `tifa serve`'s app on 127.0.0.1 judges two models' answers (rubric and pairwise).
    The tiny judge's replies are mostly not verdicts; those count as missing, and the report says how many."""
    from test_serve import live

    from tifaforge.engine.generate import Engine
    from tifaforge.eval.report import run_eval
    from tifaforge.serve.app import create_app

    run = tmp_path / "run"
    for stage in ("01-a", "02-b"):
        (run / stage).mkdir(parents=True)
        (run / stage / "model").symlink_to(trained_tiny_dir, target_is_directory=True)
    engine = Engine.load(trained_tiny_dir)
    with live(create_app(engine, max_concurrency=4, model_name="judge")) as base:
        cfg = EvalConfig(limit=2, samples=2, max_new_tokens=8, bootstrap=50, judge_url=base + "/v1",
                         judge_max_tokens=4, judge_concurrency=4)
        res = run_eval(run, tmp_path / "out", cfg, SamplingConfig(), progress=False)
    b = res["results"]["02-b"]
    assert b["judge"]["vs"] == "01-a" and b["judge"]["slots"] == 4 and b["judge"]["calls"] == 8
    assert b["judge_rubric"]["answers"] == 4
    assert 0 <= b["judge"]["missing"] <= 4 and "LLM judge, pairwise" in res["table"]
    assert "| 02-b vs 01-a |" in res["table"]
    saved = json.loads((tmp_path / "out" / "eval.json").read_text(encoding="utf-8"))
    assert saved["02-b"]["judge"]["wall_s"] >= 0 and (tmp_path / "out" / "slop.json").is_file()


# ---------------------------------------------------------------------------------------------
# tifa ablate


def test_ablation_runs_both_arms_on_the_same_prompts_and_seeds_at_an_equal_budget(trained_tiny_dir, tmp_path):
    from test_mgrpo import stage_cfg

    from tifaforge.ablate import run_ablation

    cfg = stage_cfg("mgrpo.pass2=below", "mgrpo.revise_below=1.0", "reward.answer_length_zh=[200, 400]",
                    "eval.limit=2", "eval.samples=2", "eval.max_new_tokens=8", "eval.bootstrap=50",
                    "eval.unpenalised=false", "mgrpo.save_every=100")
    budget = 7  # one update of pass 1 is 2 x 3 = 6 sequences
    summary = run_ablation(cfg, {0: trained_tiny_dir, 1: trained_tiny_dir}, ["grpo", "mgrpo"], [budget],
                           tmp_path / "ab", progress=False)
    out = tmp_path / "ab"
    for seed in (0, 1):
        g = [json.loads(x) for x in (out / f"seed-{seed}" / "grpo@7" / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
        m = [json.loads(x) for x in (out / f"seed-{seed}" / "mgrpo@7" / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
        first = lambda rows: [(r["prompt_id"], r["answer"]) for r in rows if r["step"] == 1]
        assert first(g) == first(m) and first(g)  # the same prompts and pass-1 samples at the first update
        gm = [json.loads(x) for x in (out / f"seed-{seed}" / "mgrpo@7" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
        assert all(r["sampled"] == r["sequences"] for r in gm)  # nothing resampled here: kept + revisions
    seqs = summary["sequences"]
    one_update = 6 + 6  # pass 1 plus a revision of each first answer
    for arm in ("grpo@7", "mgrpo@7"):
        assert all(budget <= n < budget + one_update for n in seqs[arm])
    assert seqs["grpo@7"] == [12, 12] and summary["updates"]["grpo@7"] == [2, 2]
    assert summary["updates"]["mgrpo@7"] == [1, 1]  # 12 per update: the budget buys fewer of them
    ev = {lb: json.loads(p.read_text(encoding="utf-8")) for lb, p in
          ((p.name, p) for p in (out / "evals").glob("*.json"))}
    slots = {tuple((s["id"], s["sample"]) for s in r["samples"]) for r in ev.values()}
    assert len(slots) == 1  # every model answered the same eval slots: paired
    assert "mgrpo@7 vs grpo@7" in summary["versus"] and "reward" in summary["versus"]["mgrpo@7 vs grpo@7"]
    assert (out / "plots" / "ablate.png").read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "| grpo@7 | 12, 12 | 2, 2 |" in report and "holds" in report
    # a rerun trains and evaluates nothing again
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    run_ablation(cfg, {0: trained_tiny_dir, 1: trained_tiny_dir}, ["grpo", "mgrpo"], [budget], out, progress=False)
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}


def test_ablate_refuses_bad_arms_and_budgets(trained_tiny_dir, tmp_path):
    from tifaforge.cli import main

    base = ["ablate", "configs/tiny.yaml", "--model", str(trained_tiny_dir), "--out", str(tmp_path / "x")]
    assert main([*base, "--arms", "grpo,dpo", "--budget", "100"]) == 2
    assert main([*base, "--arms", "grpo", "--budget", "100"]) == 2
    assert main([*base, "--budget", "10"]) == 2  # below one update: 4 prompts x 6 answers = 24
    assert main([*base, "--budget", "ten"]) == 2
    assert not (tmp_path / "x").exists()
    from tifaforge.ablate import check_budgets, parse_arms

    with pytest.raises(TifaError, match="unknown arm 'dpo'; arms: grpo, mgrpo, mgrpo-all"):
        parse_arms("grpo,dpo")
    with pytest.raises(TifaError, match=r"below one update \(4 prompts x 6 answers = 24 sequences\)"):
        check_budgets([10], load_config("configs/tiny.yaml").mgrpo)
