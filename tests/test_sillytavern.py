"""A real SillyTavern (npm `sillytavern`, pinned in the Makefile) against `tifa serve`, offline on
127.0.0.1, driven in headless Chromium: what its browser code builds (chat, Continue, Impersonate,
token probabilities, Stop) reaches the server and is rendered as it means.

    pytest tests/test_sillytavern.py

The server records each body SillyTavern forwards, so the tests check both what was sent and what
the server made of it (the prompt rendered from that body).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from test_serve import live, think_dir, think_engine  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
ST_VERSION = "1.19.0"  # the Makefile's ST_VERSION
ST_DIR = ROOT / ".cache" / "sillytavern" / "node_modules" / "sillytavern"
CONTINUE = "[Continue your last message without repeating its original content.]"


class Recorder:
    """ASGI wrapper: keeps every chat-completion body the server receives, in order."""

    def __init__(self, app):
        self.app, self.bodies = app, []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].endswith("/chat/completions"):
            return await self.app(scope, receive, send)
        chunks: list[bytes] = []

        async def recorded():
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    self.bodies.append(json.loads(b"".join(chunks)))
            return message

        return await self.app(scope, recorded, send)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _install() -> Path:
    """`make setup` installs it; a checkout without it installs it here (npm, a minute)."""
    if not (ST_DIR / "server.js").exists():
        subprocess.run(["npm", "install", "--prefix", str(ST_DIR.parents[1]), f"sillytavern@{ST_VERSION}",
                        "--no-audit", "--no-fund", "--loglevel=error"], check=True, timeout=600)
    return ST_DIR


@pytest.fixture(scope="module")
def tavern(think_engine, tmp_path_factory):
    """(SillyTavern's URL, the server's Recorder, the server's URL): our server on the think fixture,
    SillyTavern configured for it as its research notes say (offline, no CSRF for scripting,
    Custom OpenAI-compatible source, streaming, token probabilities on)."""
    import yaml

    from tifaforge.serve.app import create_app

    st_dir, data = _install(), tmp_path_factory.mktemp("st-data")
    port = _free_port()
    config = yaml.safe_load((st_dir / "default" / "config.yaml").read_text(encoding="utf-8"))
    config.update(dataRoot=str(data), port=port, listen=False, disableCsrfProtection=True,
                  enableDownloadableTokenizers=False, enableServerPluginsAutoUpdate=False)
    config["browserLaunch"]["enabled"] = False
    config["extensions"]["autoUpdate"] = False
    (data / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    recorder = Recorder(create_app(think_engine, model_name="tiny-think", max_concurrency=4))
    log = open(data / "st.log", "w")
    with live(recorder) as ours:
        st = subprocess.Popen(["node", "server.js", "--configPath", str(data / "config.yaml")], cwd=st_dir,
                              stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                assert st.poll() is None, (data / "st.log").read_text()
                try:
                    if httpx.get(base + "/", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "SillyTavern did not start"
                time.sleep(0.5)
            settings_file = data / "default-user" / "settings.json"
            settings = json.loads(settings_file.read_text(encoding="utf-8"))
            settings.update(firstRun=False, main_api="openai")
            settings["oai_settings"].update(chat_completion_source="custom", custom_url=ours + "/v1",
                                            custom_model="tiny-think", stream_openai=True, openai_max_tokens=80,
                                            show_thoughts=True, temp_openai=0,  # greedy: the fixture's own lines
                                            # through Additional Parameters: think 4 tokens, then answer (10 tokens at least)
                                            custom_include_body="reasoning_budget: 4\nmin_tokens: 10")
            settings["power_user"].update(auto_connect=True, request_token_probabilities=True)
            settings_file.write_text(json.dumps(settings), encoding="utf-8")
            yield base, recorder, ours
        finally:
            st.terminate()
            st.wait(30)
            log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900",
                f"--user-data-dir={tmp_path_factory.mktemp('st-chromium')}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    yield driver
    driver.quit()


class Page:
    """SillyTavern's page, driven as a user would: the input box, Enter, the options menu. Each action
    waits for its request to reach the server (`sent()` counts them), then for the page to be idle."""

    def __init__(self, driver, sent=lambda: 0):
        self.d, self.sent = driver, sent

    def find(self, css):
        from selenium.webdriver.common.by import By

        return self.d.find_elements(By.CSS_SELECTOR, css)

    def idle(self, timeout: float = 60) -> None:
        """Wait until no generation runs (the send button is back)."""
        deadline = time.monotonic() + timeout
        while not self.find("#send_but")[0].is_displayed():
            assert time.monotonic() < deadline, "generation did not end"
            time.sleep(0.2)

    def _after(self, before: int, act) -> None:
        """Do `act`, wait until a new request reached the server, then until generation ended."""
        act()
        deadline = time.monotonic() + 60
        while self.sent() <= before:
            assert time.monotonic() < deadline, "no request reached the server"
            time.sleep(0.1)
        time.sleep(0.3)
        self.idle()

    def send(self, text: str, generates: bool = True) -> None:
        from selenium.webdriver.common.keys import Keys

        box = self.find("#send_textarea")[0]
        box.clear()
        if not generates:  # a slash command: no request to wait for
            box.send_keys(text, Keys.ENTER)
            time.sleep(1)
            return
        self._after(self.sent(), lambda: box.send_keys(text, Keys.ENTER))

    def option(self, name: str) -> None:
        self.find("#options_button")[0].click()
        time.sleep(0.3)
        self._after(self.sent(), lambda: self.find(f"#option_{name}")[0].click())

    def messages(self) -> list[str]:
        return [m.text for m in self.find("#chat .mes .mes_text")]


def _rendered(body: dict, engine) -> str:
    """The prompt the server made of a body SillyTavern sent."""
    from tifaforge.serve.app import _Server, continues
    from tifaforge.serve.protocol import ChatRequest, Limits
    from tifaforge.config import SamplingConfig

    req = ChatRequest.model_validate(body)
    server = _Server(engine, None, Limits(), SamplingConfig(), "x", True)
    return engine.tokenizer.decode(server.chat_ids(req.messages, continues(req)))


def test_sillytavern_chat_continue_impersonate_logprobs_and_stop(tavern, browser, think_engine):
    base, recorder, ours = tavern
    page = Page(browser, lambda: len(recorder.bodies))
    browser.get(base + "/")
    deadline = time.monotonic() + 60
    while "Type a message" not in (page.find("#send_textarea") or [None])[0].get_attribute("placeholder") or "":
        assert time.monotonic() < deadline, "SillyTavern never connected to the server"
        time.sleep(0.5)
    page.send("/go Seraphina", generates=False)  # the character SillyTavern ships

    # A 3-turn chat: replies appear, think blocks stay in their fold and never go back in the history.
    for turn, text in enumerate(["你好", "今天天气如何", "讲个故事"]):  # lines the think fixture was taught
        page.send(text)
        if not page.messages()[-1].strip():
            r = httpx.post(ours + "/v1/chat/completions", json={**recorder.bodies[-1], "stream": False}).json()
            raise AssertionError(f"turn {turn}: no reply shown; {json.dumps(r, ensure_ascii=False)[:1500]}")
    sent = recorder.bodies[-1]["messages"]
    answers = [m["content"] for m in sent if m["role"] == "assistant"][1:]  # after the card's greeting
    assert len(answers) == 2 and all("<think>" not in a and a.strip() for a in answers), answers
    dialogues = [[m for m in b["messages"] if m["role"] != "system"] for b in recorder.bodies[-3:]]
    for earlier, later in zip(dialogues, dialogues[1:]):  # each turn adds the visible answer and the new line
        assert later[:len(earlier)] == earlier and [m["role"] for m in later[len(earlier):]] == ["assistant", "user"]
    prompt = _rendered(recorder.bodies[-1], think_engine)
    assert all(f"<|Assistant|>{a}<|end▁of▁sentence|>" in prompt for a in answers)
    assert "先想一想" not in prompt  # the reasoning stays out of the prompt

    # Token probabilities: asked for, answered, and shown in SillyTavern's viewer.
    assert recorder.bodies[-1].get("logprobs") is True and recorder.bodies[-1].get("top_logprobs") == 5
    page.find("#options_button")[0].click()
    time.sleep(0.3)
    page.find("#option_toggle_logprobs")[0].click()
    time.sleep(1)
    assert page.find("#logprobs_generation_output .logprobs_output_token"), "the viewer shows no tokens"
    page.find("#logprobsViewerClose")[0].click()

    # Continue: SillyTavern's instruction comes last, on the user side; the message grows in place.
    before = page.messages()[-1]
    n = len(page.messages())
    page.option("continue")
    body = recorder.bodies[-1]["messages"]
    assert body[-1] == {"role": "system", "content": CONTINUE} and body[-2]["role"] == "assistant"
    assert _rendered(recorder.bodies[-1], think_engine).endswith(f"<|User|>{CONTINUE}<|Assistant|>")
    assert len(page.messages()) == n and page.messages()[-1].startswith(before.strip()[:4])

    # Impersonate: its instruction last too, so the model writes the user's line.
    page.option("impersonate")
    body = recorder.bodies[-1]["messages"]
    assert body[-1]["role"] == "system" and body[-1]["content"].startswith("[Write your next reply from the point of view")
    assert _rendered(recorder.bodies[-1], think_engine).endswith(f"{body[-1]['content']}<|Assistant|>")
    assert "<|User|>" + body[-1]["content"] in _rendered(recorder.bodies[-1], think_engine)

    # Stop: a long answer (ignore_eos through SillyTavern's Additional Parameters) is cut by its Stop
    # button, and the server stops generating for it.
    browser.execute_script("const s = SillyTavern.getContext().chatCompletionSettings; "
                           "s.custom_include_body = 'ignore_eos: true\\nreasoning_budget: 6'; s.openai_max_tokens = 4000;")
    box = page.find("#send_textarea")[0]
    box.clear()
    from selenium.webdriver.common.keys import Keys

    box.send_keys("讲个很长的故事", Keys.ENTER)
    deadline = time.monotonic() + 30
    while not httpx.get(ours + "/health").json()["running"]:  # generating 4,000 tokens: half a minute or more
        assert time.monotonic() < deadline, "the long request never started"
        time.sleep(0.1)
    time.sleep(1)
    page.find("#mes_stop")[0].click()
    page.idle(30)
    deadline = time.monotonic() + 8
    while httpx.get(ours + "/health").json()["running"]:
        assert time.monotonic() < deadline, "the server kept generating after Stop"
        time.sleep(0.2)
    assert recorder.bodies[-1].get("ignore_eos") is True
