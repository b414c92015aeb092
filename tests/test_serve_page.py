"""The web chat page in headless Chromium (Debian's chromium + chromium-driver, driven by selenium).

    .venv/bin/python -m pytest tests/test_serve_page.py -q

A real browser against the real server: pick a card, stream a reply with its think block collapsed,
upload a PNG card, edit, regenerate, export; markup in a card or a reply must stay text.
"""

import shutil
import time
from pathlib import Path

import pytest

from tifaforge.chat.cards import load_card
from tifaforge.serve.app import create_app
from test_serve import KEY, live
from test_serve import PAGE_CARD, think_dir  # noqa: F401  (fixture)

EVIL = '<img src=x onerror="document.title=\'pwned\'"><script>document.title="pwned"</script><b>粗</b>'
DEMO_PNG = Path(__file__).resolve().parents[1] / "data/demo/cards/lin_xiaoman.png"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1200,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(shutil.which("chromedriver")))
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page_url(think_dir):
    from tifaforge.engine.generate import Engine

    evil_card = {"spec": "chara_card_v2", "spec_version": "2.0",
                 "data": {"name": "坏人" + EVIL, "description": EVIL, "first_mes": "你好" + EVIL}}
    cards = [PAGE_CARD, evil_card]
    with live(create_app(Engine.load(think_dir, device="cpu"), api_key=KEY, cards=cards)) as base:
        yield base


def wait(cond, seconds=90):
    deadline = time.monotonic() + seconds
    while not (value := cond()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)
    return value


def messages(driver):
    return driver.execute_script("return state.messages.map(m => ({...m}))")


@pytest.mark.slow
def test_chat_page_in_headless_chromium(browser, page_url, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    d = browser
    d.get(page_url + "/")
    wait(lambda: "401" in d.find_element(By.ID, "status").text)  # the page asks for the key
    d.find_element(By.ID, "key").send_keys(KEY)
    d.execute_script("document.getElementById('key').dispatchEvent(new Event('change'))")
    wait(lambda: len(Select(d.find_element(By.ID, "card")).options) == 2)
    wait(lambda: "何事" in d.find_element(By.ID, "log").text)

    # send, stream, think block collapsed
    d.find_element(By.ID, "input").send_keys("你好")
    d.find_element(By.ID, "send").click()
    wait(lambda: len(messages(d)) == 3 and not d.execute_script("return state.abort"))
    reply = messages(d)[-1]
    assert reply["content"] and "think>" not in reply["content"] and reply["reasoning"]
    details = d.find_elements(By.CSS_SELECTOR, ".msg.assistant details")[-1]
    assert details.get_attribute("open") is None and reply["content"] in d.find_element(By.ID, "log").text
    assert reply["reasoning"] not in d.find_element(By.ID, "log").text  # collapsed: not shown
    details.click()
    assert reply["reasoning"] in d.find_element(By.ID, "log").text
    d.save_screenshot(str(tmp_path / "chat.png"))
    assert (tmp_path / "chat.png").stat().st_size > 1000

    # edit the reply, regenerate it
    d.find_elements(By.CSS_SELECTOR, ".msg.assistant .edit")[-1].click()
    editor = d.find_element(By.CSS_SELECTOR, ".editor")
    editor.clear()
    editor.send_keys("改过的回答")
    d.find_element(By.CSS_SELECTOR, ".save").click()
    assert messages(d)[-1]["content"] == "改过的回答"
    d.find_element(By.ID, "regen").click()
    wait(lambda: messages(d)[-1]["content"] not in ("改过的回答", "") and not d.execute_script("return state.abort"))
    assert len(messages(d)) == 3

    # export
    exported = d.execute_script("return exportChat()")
    assert [m["role"] for m in exported["messages"]] == ["assistant", "user", "assistant"]
    assert exported["character"] == "沈青崖"

    # upload a PNG card
    d.find_element(By.ID, "upload").send_keys(str(DEMO_PNG))
    name = load_card(DEMO_PNG).name
    wait(lambda: d.execute_script("return state.name") == name)

    # markup in a card stays text
    Select(d.find_element(By.ID, "card")).select_by_index(1)
    wait(lambda: d.execute_script("return state.name").startswith("坏人"))
    time.sleep(0.3)
    assert EVIL in d.find_element(By.ID, "log").text
    assert not d.find_elements(By.CSS_SELECTOR, "#log img, #log script, #log b")
    assert d.title != "pwned"
    d.save_screenshot(str(tmp_path / "evil.png"))
