import json
import os
import pty
import select
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tifaforge.rl.revise import answer_revised
from tifaforge.serve.session import ChatSession
from tifaforge.chat.template import ThinkStreamSplitter, split_reasoning
from tifaforge.config import SamplingConfig
from tifaforge.errors import TifaError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
text_st = st.text(alphabet=st.sampled_from(list("想答案，。ab \n<>/thinkq")), max_size=20)


def feed_in_chunks(text, cuts, started=False):
    sp, parts, last = ThinkStreamSplitter(started), [], 0
    for c in sorted(set(cuts)) + [len(text)]:
        parts += sp.feed(text[last:c])
        last = c
    parts += sp.feed("", final=True)
    r = "".join(t for k, t in parts if k == "reasoning")
    return (r if r or any(k == "reasoning" for k, _ in parts) else None), "".join(t for k, t in parts if k == "content")


@settings(max_examples=300, deadline=None)
@given(text_st.filter(lambda s: "<think>" not in s and "</think>" not in s and s.strip()),
       text_st.filter(lambda s: "<think>" not in s and "</think>" not in s and s.strip()),
       st.lists(st.integers(0, 60), max_size=8), st.booleans())
def test_stream_splitter_agrees_with_split_reasoning(think, answer, cuts, started):
    """However the text is cut into deltas, the stream splits it like the finished text."""
    text = ("" if started else "<think>") + "\n" + think + "\n</think>\n\n" + answer
    r, c = feed_in_chunks(text, [x for x in cuts if x < len(text)], started)
    er, ec = split_reasoning(text, started_in_think=started)
    assert (r or "").strip("\n") == (er or "").strip("\n") and c == ec


@pytest.mark.parametrize("text, expected", [("直接回答", (None, "直接回答")), ("<think>\n想到一半", ("想到一半", ""))])
def test_stream_splitter_plain_and_cut_off(text, expected):
    assert feed_in_chunks(text, [1, 3, 5]) == expected


def test_session_keeps_think_out_of_history_and_round_trips(engine, tmp_path):
    s = ChatSession(engine, system="你是沈青崖。", sampling=SamplingConfig(max_new_tokens=12, seed=1))
    deltas = list(s.say("你好"))
    assert deltas[-1].finish_reason in ("stop", "length")
    assert [m["role"] for m in s.history] == ["user", "assistant"] and "</think>" not in s.history[-1]["content"]
    s.history[-1]["content"] = "好。"
    s.save(tmp_path / "c.json")
    t = ChatSession(engine)
    t.load(tmp_path / "c.json")
    assert t.messages() == s.messages()
    list(t.regenerate())
    assert [m["role"] for m in t.history] == ["user", "assistant"]


def test_session_trims_oldest_turns_keeping_the_card(engine):
    s = ChatSession(engine, system="卡片：沈青崖。", sampling=SamplingConfig(max_new_tokens=8, seed=1))
    engine_ctx = engine.context
    try:
        engine.context = 160
        for i in range(12):
            s.history += [{"role": "user", "content": f"第{i}句话，说点什么吧。"}, {"role": "assistant", "content": "好的，我听着。"}]
        list(s.say("最后一句"))
    finally:
        engine.context = engine_ctx
    assert s.notices and "trimmed" in s.notices[0]
    assert s.messages()[0] == {"role": "system", "content": "卡片：沈青崖。"}
    assert s.history[-2]["content"] == "最后一句" and len(s.history) < 26


def test_load_rejects_a_bad_chat_file(engine, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"history": [{"role": "wizard", "content": "x"}]}), encoding="utf-8")
    with pytest.raises(TifaError, match=r"history\[0\]"):
        ChatSession(engine).load(bad)


def run_in_pty(args, inputs=(), prompt="> ", timeout=240):
    """Run `tifa` in a pseudo-terminal (a real TTY, as a user would), answering each prompt in turn."""
    import re

    pid, fd = pty.fork()
    if pid == 0:
        os.execv(sys.executable, [sys.executable, "-m", "tifaforge.cli", *args])
    out, sent, deadline = b"", 0, time.time() + timeout
    while time.time() < deadline:
        r, _, _ = select.select([fd], [], [], 0.5)
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        shown = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", out.decode("utf-8", "replace"))
        if sent < len(inputs) and shown.count(prompt) > sent:
            os.write(fd, (inputs[sent] + "\n").encode())
            sent += 1
    else:
        os.kill(pid, 9)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out.decode("utf-8", "replace")


def test_chat_once_in_a_terminal(trained_tiny_dir):
    card = os.path.join(ROOT, "data/demo/cards/shen_qingya.json")
    code, out = run_in_pty(["chat", str(trained_tiny_dir), "--once", "你好", "--card", card, "--set", "sampling.max_new_tokens=16"])
    assert code == 0, out
    assert "Traceback" not in out and len(out.strip()) > 0


def test_chat_interactive_commands(trained_tiny_dir, tmp_path):
    saved = tmp_path / "chat.json"
    code, out = run_in_pty(
        ["chat", str(trained_tiny_dir), "--user", "小林", "--set", "sampling.max_new_tokens=12"],
        ["/think off", "你好", "/save " + str(saved), "/regen", "/reset", "/quit"], prompt="小林> ",
    )
    assert code == 0, out
    assert "think blocks hidden" in out and "history cleared" in out
    history = json.loads(saved.read_text(encoding="utf-8"))["history"]
    assert [m["role"] for m in history] == ["user", "assistant"] and history[0]["content"] == "你好"


def test_revise_before_answering_shows_the_better_of_first_answer_and_rewrite(engine):
    """`say(text, reviser)`: the first answer is generated whole and scored; the rules' messages ask for
    a rewrite; the answer shown (one delta) and kept in the history is the better of the two."""
    from tifaforge.engine.generate import Engine
    from tifaforge.rewards.literary import LogicReward
    from tifaforge.config import RewardConfig

    class Recording(Engine):  # the real engine, remembering what it was asked
        def generate(self, requests):
            self.prompts = getattr(self, "prompts", []) + [r.prompt for r in requests]
            return super().generate(requests)

    # the answer scored by its length against a band far above what 24 tokens can reach: the rules
    # always complain, and a longer rewrite scores higher
    reward = LogicReward(RewardConfig(weights={"answer_length": 1.0}, vetoes=[], answer_length_zh=(200, 400)))
    shown = []
    for seed in range(6):
        eng = Recording(engine.model, engine.tokenizer)
        s = ChatSession(eng, system="你是沈青崖。", sampling=SamplingConfig(max_new_tokens=24, seed=seed, temperature=1.0,
                                                                       top_p=1.0))
        deltas = list(s.say("你好", (reward, None)))
        rev = s.last_revision
        assert len(deltas) == 1 and deltas[0].text == rev.final.text and deltas[0].finish_reason
        assert len(eng.prompts) == 2 and "回答太短" in eng.prompts[1] and "OOC" in eng.prompts[1]  # rules' messages
        assert rev.summary and rev.rewrite is not None
        assert rev.revised == (rev.rewrite_score > rev.first_score)
        assert rev.final is (rev.rewrite if rev.revised else rev.first)
        assert s.history[-1] == {"role": "assistant", "content": rev.final.text.split("</think>")[-1].lstrip()}
        assert ("采用重写" if rev.revised else "保留初稿") in rev.describe()
        shown.append(rev.revised)
        # the library call gives the same answer for the same seed
        assert answer_revised(engine, s.messages()[:-1], reward, s.sampling).final.text == rev.final.text
    assert any(shown), "in six seeds no rewrite scored higher"
    # nothing to fix: the first answer, no second generation
    lenient = LogicReward(RewardConfig(weights={"answer_length": 1.0}, vetoes=[], answer_length_zh=(1, 10_000)))
    eng = Recording(engine.model, engine.tokenizer)
    s = ChatSession(eng, sampling=SamplingConfig(max_new_tokens=8, seed=1))
    list(s.say("你好", (lenient, None)))
    assert len(eng.prompts) == 1 and not s.last_revision.revised and "没有发现问题" in s.last_revision.describe()


def test_chat_once_with_revise(trained_tiny_dir):
    code, out = run_in_pty(["chat", str(trained_tiny_dir), "--once", "你好", "--revise", "--set", "sampling.max_new_tokens=12",
                            "--set", "reward.weights={answer_length: 1.0}", "--set", "reward.answer_length_zh=[200, 400]",
                            "--set", "reward.vetoes=[]"])
    assert code == 0, out
    assert "自我修订：初稿" in out and "回答太短" in out and ("采用重写" in out or "保留初稿" in out), out
    assert "revised:" not in out  # one answer, shown after the revision


def test_chat_once_with_the_llamacpp_backend(trained_tiny_dir, tmp_path):
    from tifaforge.export.gguf import export_gguf

    gguf = tmp_path / "tiny-q8_0.gguf"
    export_gguf(trained_tiny_dir, gguf, "q8_0")
    code, out = run_in_pty(["chat", str(gguf), "--backend", "llamacpp", "--once", "你好", "--set", "sampling.max_new_tokens=12"])
    assert code == 0, out
    assert "Traceback" not in out
