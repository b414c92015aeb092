"""The logic rewards: every rule passes a good answer and fails a bad one (Chinese, and English where
the rule is language-neutral) with a message that quotes the offence; the composite's vetoes, caps
and missing scores; the judge against a real local HTTP server; `score_file` on a temp JSONL."""

from __future__ import annotations

import dataclasses
from collections import Counter
import io
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tifaforge.errors import ConfigError, TifaError
from tifaforge.rewards import (
    RULES, LogicReward, RewardConfig, RewardContext, RuleResult, combine, cross_turn_overlap, distinct_n,
    ngram_repetition_rate, repeated_sentences, score_command, score_file,
)
from tifaforge.rewards import rules as R
from tifaforge.rewards.judge import parse_score

ZH_USER = [{"role": "user", "content": "你现在是流浪武士楚夜，正站在长安城屋顶上。我悄悄跟在你身后。"}]
EN_USER = [{"role": "user", "content": "You are Chu Ye, a wandering swordsman on the rooftops of Chang'an."}]
CARD_ZH = {"spec": "chara_card_v2", "data": {"name": "楚夜"}}
CARD_EN = {"spec": "chara_card_v2", "data": {"name": "Chu Ye"}}

ZH_BODY = (
    "夜风掠过长安城的屋脊，檐角的铜铃发出细碎的叮当声。楚夜立在瓦片上，衣袂被吹得猎猎作响，月光在他的刀鞘上流淌成一道冷白的线。\n"
    "他没有回头，只是微微侧过脸，嗓音低沉而沙哑：“你跟了我三条街，不累吗？”\n"
    "远处的更鼓声隐约传来，空气里混着雨后泥土的腥味。他的指尖搭在刀柄上，冰凉的金属让他的心绪慢慢沉静下来。\n"
    "“有话就说。”他淡淡道，“天亮之前，我还要去城南见一个人。”"
)
ZH_GOOD = "<think>\n楚夜孤傲，话少；先写屋顶的夜色，再让他开口，语气冷峻。\n</think>\n" + ZH_BODY
EN_BODY = (
    "The night wind slid across the rooftops of Chang'an, and the bronze bells under the eaves gave a thin, "
    "broken chime. Chu Ye stood on the tiles, his sleeves snapping in the wind, moonlight running along his "
    "scabbard in a pale line.\nHe did not turn. \"You've followed me for three streets. Aren't you tired?\"\n"
    "Somewhere far off a drum marked the hour, and the air still smelled of wet earth after the rain. His "
    "fingers rested on the hilt; the cold metal steadied him.\n\"Say what you came to say,\" he said. "
    "\"Before dawn I have to meet someone in the south of the city.\""
)
EN_GOOD = "<think>\nKeep him terse; open with the rooftop at night, then one line of dialogue.\n</think>\n" + EN_BODY


def zh(**kw) -> RewardContext:
    return dataclasses.replace(LogicReward().context(ZH_USER, CARD_ZH), **kw)


def en(**kw) -> RewardContext:
    return dataclasses.replace(LogicReward().context(EN_USER, CARD_EN), **kw)


def think(body: str, plan: str = "先写夜色，再让他开口，语气冷峻。") -> str:
    return f"<think>\n{plan}\n</think>\n{body}"


# ---------------------------------------------------------------------------------------------
# Context


def test_import_is_light():
    code = "import sys, tifaforge.rewards; print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'httpx', 'numpy'}))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_context_from_messages_and_card():
    ctx = zh()
    assert (ctx.character, ctx.language) == ("楚夜", "zh")
    assert en().language == "en"
    assert RewardContext.from_messages(ZH_USER, {"name": "楚夜"}).character == "楚夜"  # V1 card
    hist = ZH_USER + [{"role": "assistant", "content": "<think>x</think>他点头。"}, ZH_USER[0]]
    assert RewardContext.from_messages(hist).previous_answers == ["他点头。"]


def test_good_answers_pass_every_rule():
    for ctx, answer in ((zh(), ZH_GOOD), (en(), EN_GOOD)):
        for name, rule in RULES.items():
            assert rule(ctx, answer) == RuleResult(1.0), (ctx.language, name, rule(ctx, answer))


# ---------------------------------------------------------------------------------------------
# The rules, one by one


def test_think_format():
    assert R.think_format(zh(started_in_think=True), "先写夜色。\n</think>\n" + ZH_BODY).score == 1.0
    cases = {
        ZH_BODY: "缺少<think>",
        think(ZH_BODY) + "<think>再想想</think>又一段": "有2个思考块",
        "楚夜冷笑。" + ZH_GOOD: "思考部分之前有正文「楚夜冷笑。」",
        "<think>\n想了很久……": "没有用</think>结束",
        "<think>\n想好了。\n</think>\n  ": "</think>之后没有正文",
        "想好了。\n</think>\n" + ZH_BODY: "缺少开头的<think>",
        "</think>" + ZH_BODY + "<think>": "</think>出现在<think>之前",
    }
    for answer, expected in cases.items():
        r = R.think_format(zh(), answer)
        assert r.score == 0.0 and expected in r.message, (answer, r)
    assert R.think_format(en(), EN_BODY).message == "no <think>…</think> block"


def test_think_length():
    r = R.think_length(zh(), think(ZH_BODY, "好。"))
    assert r.score == pytest.approx(0.2) and "思考太短（2字，至少10字）：「好。」" == r.message
    r = R.think_length(zh(think_band=(10, 20)), think(ZH_BODY, "想" * 30))
    assert r.score == pytest.approx(0.5) and "思考太长（30字，最多20字）" == r.message
    r = R.think_length(en(), think(EN_BODY, "Short."))
    assert r.score == pytest.approx(0.2) and r.message == 'thinking too short (1 words, at least 5): "Short."'


def test_in_character():
    r = R.in_character(zh(), think("作为一个AI，我无法拥有真正的情感，但我可以陪你聊天。"))
    assert r.score == 0.0 and r.message.startswith("跳出了角色：「作为一个AI，我无法拥有真正的情感") and "…」" in r.message
    r = R.in_character(zh(), think("<李四>\n“楚夜，你站住！”"))
    assert r.score == 0.0 and r.message == "以「李四」而不是「楚夜」的身份说话"
    assert R.in_character(zh(), think("<楚夜>\n" + ZH_BODY)).score == 1.0
    # the think block's planning voice in the answer is out of character; in the think block it is fine
    r = R.in_character(zh(), think("用户问这学期的课，楚夜想了想。"))
    assert r.score == 0.0 and r.message == "在回答里谈论“用户”，跳出了角色：「用户问这学期的课，楚夜想了想。」"
    assert R.in_character(zh(), think(ZH_BODY, plan="用户问我为什么跟着他，要冷一点。")).score == 1.0
    for prose in ("这款软件的用户说明书写得很清楚。", "平台有用户说这功能不好用，他笑了。", "He read the user manual twice."):
        assert R.in_character(zh(), think(prose)).score == 1.0, prose
    r = R.in_character(en(), think("The user wants a duel, so Chu Ye draws."))
    assert r.score == 0.0 and r.message.startswith('talks about "the user" in the answer')
    r = R.in_character(en(), think("As an AI language model, I don't have feelings."))
    assert r.score == 0.0 and r.message.startswith('breaks character: "As an AI language model')


def test_user_lines():
    r = R.user_lines(zh(user="小林"), think(ZH_BODY + "\n小林：“那我就陪你去城南吧。”"))
    assert r.score == 0.0 and r.message == "替用户说了话：「小林：“那我就陪你去城南吧。”」"
    r = R.user_lines(zh(), think(ZH_BODY + "\n你笑道：“我才不累呢。”"))
    assert r.score == 0.0 and "「你笑道：“我才不累呢。”」" in r.message
    # the character quoting the user in dialogue, or narration about "你", is fine
    assert R.user_lines(zh(), think("“你说什么？”他皱眉。\n你推开了门，冷风灌了进来。")).score == 1.0
    r = R.user_lines(en(user="Alex"), think(EN_BODY + "\nAlex: Fine, I'll come with you."))
    assert r.score == 0.0 and r.message == 'writes the user\'s lines: "Alex: Fine, I\'ll come with you."'



@pytest.mark.parametrize("lang", ["zh", "en"])
def test_the_users_name_is_read_from_the_transcript_when_not_configured(lang):
    """The user speaks as 旅人/Traveler (their turns open with the name) and no config names them: an
    answer that writes the traveller's lines scores below a clean one, and the summary says why."""
    reward = LogicReward(RewardConfig())
    if lang == "zh":
        msgs = [{"role": "user", "content": "旅人：楚夜，这座城为什么没有人？"}]
        body, line = ZH_BODY, "\n旅人：原来如此，那你为何留下？"
    else:
        msgs = [{"role": "user", "content": "Traveler: Chu Ye, why is this town empty?"}]
        body, line = EN_BODY, "\nTraveler: I see. Then why did you stay?"
    ctx = reward.context(msgs, CARD_ZH if lang == "zh" else CARD_EN)
    assert ctx.user == ("旅人" if lang == "zh" else "Traveler")
    clean, lines = reward.score(ctx, think(body)), reward.score(ctx, think(body + line))
    assert lines.total < clean.total and lines.rules["user_lines"].score == 0.0
    assert ("替用户说了话：「旅人：原来如此" if lang == "zh" else 'writes the user\'s lines: "Traveler: I see.') in lines.summary


def test_infer_user_name_sources():
    assert R.infer_user_name([{"role": "user", "name": "Bob", "content": "hi"}]) == "Bob"  # SillyTavern's name field
    assert R.infer_user_name([{"role": "system", "content": "你是楚夜，正在与小林进行角色扮演。"}]) == "小林"
    st_main = "Write Seraphina's next reply in a fictional chat between Seraphina and Alex."
    assert R.infer_user_name([{"role": "system", "content": st_main}], "Seraphina") == "Alex"
    # the prefix must open at least half of the user's turns, and never names the character
    turns = [{"role": "user", "content": "注意：别出声。"}, {"role": "user", "content": "你听见了吗？"},
             {"role": "user", "content": "他来了。"}]
    assert R.infer_user_name(turns) == ""
    assert R.infer_user_name([{"role": "user", "content": "楚夜：我自言自语。"}], "楚夜") == ""
    for label in ("旁白：夜深了。", "我：你好。", "注意：别出声。", "OOC: keep it short.", "我看着她说：走吧。"):
        assert R.infer_user_name([{"role": "user", "content": label}]) == "", label
    # a configured name stays, and the transcript's name is caught too
    ctx = R.RewardContext.from_messages([{"role": "user", "content": "旅人：你好。"}], CARD_ZH, user="小林")
    assert ctx.user == "小林" and R.user_lines(ctx, think(ZH_BODY + "\n旅人：走吧。")).score == 0.0

def test_refusal():
    r = R.refusal(zh(), think("抱歉，我无法继续这个话题。"))
    assert r.score == 0.0 and r.message == "拒绝了请求：「抱歉，我无法继续这个话题。」"
    r = R.refusal(en(), think("I'm sorry, but I can't help with that request."))
    assert r.score == 0.0 and r.message.startswith('refuses: "I\'m sorry, but I can\'t')
    assert R.refusal(en(), think("I can't help with that.")).score == 0.0
    assert R.refusal(en(), think("I'm not able to assist with that.")).score == 0.0
    # a character declining inside the story is not a refusal
    assert R.refusal(zh(), think("“抱歉，我不能告诉你他的下落。”楚夜转身离开。")).score == 1.0
    assert R.refusal(en(), think("\"I'm sorry, but I can't stay,\" he said.")).score == 1.0


def test_repetition_repeated_sentence_across_paragraphs():
    body = "楚夜握紧了刀柄，目光冷冷地扫过屋檐。\n雨声渐密，他一步步逼近。楚夜握紧了刀柄，目光冷冷地扫过屋檐。"
    r = R.repetition(zh(), think(body))
    assert r.score < 1 and r.message == "第二段重复了第一段的句子「楚夜握紧了刀柄，目光冷冷地扫过屋檐。」"


def test_repetition_loop_and_english():
    r = R.repetition(zh(), think("他看着你，" * 30))
    assert r.score == 0.0 and "词句循环重复" in r.message and "「他看着你，他看着你" in r.message
    r = R.repetition(en(), think("He looked at you and smiled. " * 6))
    assert r.score == 0.0 and 'the sentence "He looked at you and smiled." is repeated' in r.message


def test_repetition_cross_turn():
    hist = ZH_USER + [{"role": "assistant", "content": ZH_GOOD}, {"role": "user", "content": "然后呢？"}]
    r = R.repetition(RewardContext.from_messages(hist, CARD_ZH), ZH_GOOD)
    assert r.score == 0.0 and r.message.startswith("与之前的回答重合100%，如「")
    assert R.repetition(RewardContext.from_messages(hist, CARD_ZH), think("他收刀入鞘，转身跃下屋顶，消失在巷口的雾气里。")).score == 1.0


def test_language_match():
    r = R.language_match(zh(), think("He turned away and said nothing at all, the wind howling."))
    assert r.score == 0.0 and r.message.startswith("没有用中文回答（中文仅占0%）：「He turned away") and "…」" in r.message
    r = R.language_match(en(), think("他转身离开，一句话也没有说。"))
    assert r.score == 0.0 and r.message == 'not written in English (100% Chinese): "他转身离开，一句话也没有说。"'
    assert R.language_match(zh(), think(ZH_BODY + "（OK）")).score == 1.0  # a stray Latin word is fine


def test_answer_length():
    r = R.answer_length(zh(), think("他点头。"))
    assert r.score == pytest.approx(4 / 50) and r.message == "回答太短（4字，至少50字）：「他点头。」"
    r = R.answer_length(zh(answer_band=(10, 50)), think("夜" * 75))
    assert r.score == pytest.approx(0.5) and r.message == "回答太长（75字，最多50字）"
    r = R.answer_length(en(), think("He nodded."))
    assert r.message == 'answer too short (2 words, at least 30): "He nodded."'


def test_texture():
    flat = think("他走了过去。他坐了下来。他想了一会儿。他站了起来。他又走了出去。他在街上走着。他回到了家里。")
    r = R.texture(zh(), flat)
    assert r.score < 0.75 and r.message == "缺少感官描写（光影、声音、气味、触感）"
    r = R.texture(zh(), think("“月光真冷。”\n“是啊，风也大。”\n“回去吧。”\n“再等一会儿。”"))
    assert r.message == "几乎全是对白，缺少叙述和描写"
    stuffed = think("月光阳光烛光微光冰凉温热芬芳清香低语呢喃沙沙轰鸣苦涩甘甜柔软滚烫湿润刺骨" * 2)
    r = R.texture(zh(), stuffed)
    assert r.score < 0.2 and r.message.startswith("感官词堆砌：「月光」「阳光」「烛光」「微光」")
    r = R.texture(en(), think("pale cold rain whisper smoke glow shiver damp " * 4))
    assert r.score < 0.2 and r.message.startswith("stuffed sensory words: pale, cold, rain, whisper")
    assert R.texture(zh(), think("")) == R.RuleResult(0.0, "没有正文")  # nothing to quote, no 「」
    assert R.texture(en(), "<think>\nplan\n</think>\n  ") == R.RuleResult(0.0, "no answer text")


def test_blocklist():
    r = R.blocklist(zh(blocklist=("鲜血",)), think("刀光一闪，鲜血溅上了青瓦。"))
    assert r.score == 0.0 and r.message == "出现了屏蔽词「鲜血」：「刀光一闪，鲜血溅上了青瓦。」"
    assert R.blocklist(zh(blocklist=("鲜血",)), think(ZH_BODY, "不要写鲜血")).score == 1.0  # think may name it
    r = R.blocklist(en(blocklist=("Blood",)), think("The blood ran down the tiles."))
    assert r.score == 0.0 and r.message.startswith('blocked word "Blood"')


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(list("他她说。！？…“”「」\n ab.<>/AI作为") + ["<think>", "</think>", "As an AI"]),
                max_size=40).map("".join))
def test_every_rule_scores_in_unit_interval_on_any_text(text):
    for ctx in (zh(), en(started_in_think=True)):
        for name, rule in RULES.items():
            r = rule(ctx, text)
            assert r.score is not None and 0.0 <= r.score <= 1.0, (name, text, r)
            assert (r.message is None) == (r.score == 1.0) or name == "texture", (name, text, r)


# ---------------------------------------------------------------------------------------------
# Repetition metrics (reused by eval and DPO mining)


def test_repetition_metrics():
    assert ngram_repetition_rate("春眠不觉晓处处闻啼鸟") == 0.0
    assert ngram_repetition_rate("我爱你" * 20) > 0.9
    assert ngram_repetition_rate("the cat sat on the mat " * 5) > 0.7 and ngram_repetition_rate("") == 0.0
    reps = repeated_sentences("她笑了笑说好的。\n她笑了笑说好的。天黑了。")
    assert [(r.sentence, r.first, r.again) for r in reps] == [("她笑了笑说好的。", 0, 1)]
    assert repeated_sentences("好。好。好。") == []  # too short to count
    assert cross_turn_overlap("他收刀入鞘，转身离开。", ["他收刀入鞘，转身离开。"]) == 1.0
    assert cross_turn_overlap("他收刀入鞘，转身离开。", []) == 0.0
    assert distinct_n("他他他他", 1) == 0.25 and distinct_n("a b a b", 1) == 0.5 and distinct_n(["一二三", "一二三"], 2) == 0.5


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from([*"他她说了看着你我", "。", "，", " ab "]), min_size=12, max_size=60).map("".join))
def test_repeating_a_text_never_raises_its_diversity(text):
    assume(len(R.units(text)) >= 8)
    looped = "\n".join([text] * 3)
    assert 0.0 <= ngram_repetition_rate(text) <= 1.0 and 0.0 <= distinct_n(text) <= 1.0
    assert distinct_n(looped, 2) <= distinct_n(text, 2) + 1e-9
    assert ngram_repetition_rate(looped) >= 0.4


# ---------------------------------------------------------------------------------------------
# The composite


def test_composite_veto_zeroes_the_total():
    reward = LogicReward(RewardConfig(blocklist=["铜铃"]))
    r = reward.score(reward.context(ZH_USER, CARD_ZH), ZH_GOOD)
    assert r.total == 0.0 and r.vetoed and r.summary.startswith("- 出现了屏蔽词「铜铃」")
    r = reward.score(reward.context(ZH_USER, CARD_ZH), think("抱歉，我无法满足这个请求。"))
    assert r.vetoed and r.summary.splitlines()[0] == "- 拒绝了请求：「抱歉，我无法满足这个请求。」"


def test_composite_good_answer_scores_one_and_summary_is_worst_first():
    reward = LogicReward()
    ctx = reward.context(ZH_USER, CARD_ZH)
    good = reward.score(ctx, ZH_GOOD)
    assert good.total == 1.0 and not good.vetoed and good.summary == ""
    body = "楚夜握紧了刀柄，目光冷冷地扫过屋檐。\n" * 3 + "作为一个AI，我不会累。"
    bad = reward.score(ctx, body)
    lines = bad.summary.splitlines()
    assert 0 < bad.total < good.total and not bad.vetoed
    assert lines[0].startswith("- 第二段重复了第一段的句子")  # repetition has the largest weighted loss
    assert any("缺少<think>" in x for x in lines) and any("跳出了角色" in x for x in lines)
    assert len(lines) == len(set(lines))  # think_format and think_length say the same thing once


def test_saturation_keyword_stuffing_does_not_beat_a_normal_answer():
    reward = LogicReward()
    ctx = reward.context(ZH_USER, CARD_ZH)
    stuffing = "\n月光下，冰凉温热的芬芳清香里，低语呢喃，沙沙轰鸣，苦涩甘甜，柔软滚烫，湿润刺骨，寒意微风。"
    normal, stuffed = reward.score(ctx, ZH_GOOD), reward.score(ctx, ZH_GOOD + stuffing)
    assert stuffed.total < normal.total
    assert "感官词堆砌" in stuffed.summary
    # above the cap, more texture earns nothing: a 0.8 texture gets full credit
    cfg = RewardConfig(weights={"texture": 1.0}, vetoes=[])
    assert combine({"texture": RuleResult(0.8)}, cfg) == combine({"texture": RuleResult(1.0)}, cfg) == (1.0, False)


def test_missing_score_is_counted_and_excluded_not_zero():
    cfg = RewardConfig(weights={"think_format": 1.0, "texture": 3.0}, vetoes=["texture"], caps={})
    results = {"think_format": RuleResult(0.5, "x"), "texture": RuleResult(None, "评审超时")}
    assert combine(results, cfg) == (0.5, False)  # a None veto does not veto, None weight not counted
    reward = LogicReward(cfg)
    r = reward.score(reward.context(ZH_USER), "没有思考")
    assert r.missing == [] and r.to_json()["rules"]["texture"]["score"] is not None


def test_unknown_rule_is_a_config_error_with_did_you_mean():
    with pytest.raises(ConfigError, match=r"reward.weights: unknown rule 'repetiton' \(did you mean 'repetition'\?\)"):
        LogicReward(RewardConfig(weights={"repetiton": 1.0}))
    with pytest.raises(ConfigError, match=r"reward.vetoes: unknown rule 'blocklst'"):
        LogicReward(RewardConfig(vetoes=["blocklst"]))
    with pytest.raises(ConfigError, match="needs reward.judge_url"):
        LogicReward(RewardConfig(weights={"judge": 1.0}))
    with pytest.raises(ConfigError, match="reward.caps.texture"):
        LogicReward(RewardConfig(caps={"texture": 0}))
    with pytest.raises(ConfigError, match="reward.answer_length_zh"):
        LogicReward(RewardConfig(answer_length_zh=[100, 10]))


def test_to_json_and_batch():
    reward = LogicReward()
    ctxs = [reward.context(ZH_USER, CARD_ZH), reward.context(EN_USER, CARD_EN)]
    results = reward.score_batch(ctxs, [ZH_GOOD, EN_BODY])
    assert results[0].total == 1.0 and results[1].total < 1.0
    assert "no <think>…</think> block" in results[1].summary  # English conversation, English summary
    row = json.loads(json.dumps(results[1].to_json("p1")))
    assert set(row) == {"id", "total", "vetoed", "rules"} and row["id"] == "p1"
    assert row["rules"]["think_format"] == {"score": 0.0, "message": "no <think>…</think> block"}
    assert set(results[0].to_json()) == {"total", "vetoed", "rules"}
    with pytest.raises(ValueError):
        reward.score_batch(ctxs, [ZH_GOOD])


# ---------------------------------------------------------------------------------------------
# The judge, against a real local HTTP server


class _Judge(BaseHTTPRequestHandler):
    reply, delay, status = "8\n画面感很强。", 0.0, 200  # reply: a text, or staticmethod(prompt -> text or None)
    calls = Counter()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert body["messages"][0]["role"] == "user"
        time.sleep(self.delay)
        self.calls["n"] += 1
        reply = self.reply(body["messages"][0]["content"]) if callable(self.reply) else self.reply
        if reply is None:  # a reply function's way to fail the call
            self.send_response(500)
            self.end_headers()
            return
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_server():
    servers = []

    def start(**attrs):
        handler = type("Handler", (_Judge,), attrs)
        srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        srv.daemon_threads = True
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_port}/v1"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _judged(url: str, timeout: float = 5.0):
    cfg = RewardConfig(weights={"think_format": 1.0, "judge": 1.0}, judge_url=url, judge_timeout=timeout)
    reward = LogicReward(cfg)
    return reward.score(reward.context(ZH_USER, CARD_ZH), ZH_GOOD)


def test_judge_scores_from_a_real_endpoint(judge_server):
    r = _judged(judge_server())
    assert r.rules["judge"] == RuleResult(7 / 9, None) and r.total == pytest.approx((1 + 7 / 9) / 2)
    r = _judged(judge_server(reply="3分\n人物性格前后矛盾。"))
    assert r.rules["judge"].message == "评审3分：人物性格前后矛盾。" and "评审3分" in r.summary


def test_judge_timeout_and_errors_are_missing_not_zero(judge_server):
    t0 = time.monotonic()
    r = _judged(judge_server(delay=2.0), timeout=0.3)
    assert time.monotonic() - t0 < 1.5
    assert r.rules["judge"] == RuleResult(None, "评审超时（0.3秒）")
    assert r.missing == ["judge"] and r.total == 1.0 and "评审超时" not in r.summary
    assert r.to_json()["rules"]["judge"] == {"score": None, "message": "评审超时（0.3秒）"}
    assert _judged(judge_server(status=500)).rules["judge"].message.startswith("评审接口出错")
    assert _judged(judge_server(reply="很好")).rules["judge"] == RuleResult(None, "评审回复里没有1-10的分数：「很好」")
    assert parse_score("8/10") == 8 and parse_score("评分：10分") == 10 and parse_score("9.5") is None


# ---------------------------------------------------------------------------------------------
# score_file / score_command


def _write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows) + "\n",
                    encoding="utf-8")


def test_score_file_and_command(tmp_path):
    (tmp_path / "card.json").write_text(json.dumps(CARD_ZH), encoding="utf-8")
    rc_line = {"id": "a", "card": "card.json", "messages": ZH_USER + [
        {"role": "assistant", "content": ZH_BODY, "reasoning_content": "先写夜色，再让他开口，语气冷峻。"}]}
    sharegpt = {"conversations": [{"from": "human", "value": EN_USER[0]["content"]}, {"from": "gpt", "value": EN_BODY}]}
    data = tmp_path / "d.jsonl"
    _write(data, [rc_line, "", sharegpt])
    rows = list(score_file(data, RewardConfig()))
    assert rows[0]["id"] == "a" and rows[0]["total"] == 1.0
    assert "id" not in rows[1] and rows[1]["rules"]["think_format"]["score"] == 0.0
    cfg = tmp_path / "reward.yaml"
    cfg.write_text("reward:\n  weights:\n    think_format: 1.0\n  vetoes: []\n", encoding="utf-8")
    out = io.StringIO()
    assert score_command(data, cfg, out=out) == 0
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [x["total"] for x in lines] == [1.0, 0.0] and set(lines[0]["rules"]) == {"think_format"}
    cfg.write_text("reward:\n  weights:\n    texure: 1.0\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="did you mean 'texture'"):
        score_command(data, cfg, out=io.StringIO())


def test_score_file_bad_lines_name_the_line(tmp_path):
    good = {"messages": ZH_USER + [{"role": "assistant", "content": ZH_GOOD}]}
    for bad, expected in [
        ("{not json", "line 3: invalid JSON"),
        (json.dumps({"messages": ZH_USER}), "line 3: the last message must be the assistant's answer"),
        (json.dumps({"text": "x"}), "line 3: no 'messages'"),
        (json.dumps({"card": "missing.json", **good}), "line 3: cannot read card: .*missing.json"),
    ]:
        data = tmp_path / "bad.jsonl"
        _write(data, [good, good, bad])
        it = score_file(data)
        assert next(it)["total"] == 1.0 and next(it)["total"] == 1.0
        with pytest.raises(TifaError, match=f"bad.jsonl: {expected}"):
            next(it)
