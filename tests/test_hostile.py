"""Hostile and broken input: every command that reads files gets a table of bad files, and the running
server gets property-based request bodies. Each ends in one clear line (or a documented acceptance),
never a traceback, a hang or unbounded memory.

    pytest tests/test_hostile.py

The CLI runs in-process (`cli.main`), so the table is quick; only the classes that could hang or
exhaust memory (FIFOs, devices, zip bombs) and those that need their own mounts (a full disk, a
read-only file system) run as subprocesses, under a timeout and with their peak RSS read back.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tifaforge import cli
from tifaforge.data.novels import read as novel_read

ROOT = Path(__file__).resolve().parents[1]


def one_line_error(capsys, argv: list[str]) -> str:
    """Run `tifa ARGV` in-process: non-zero status, no traceback, exactly one `tifa: error:` line."""
    rc = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("tifa: error:")]
    assert rc != 0 and "Traceback" not in err and len(lines) == 1, (rc, err)
    return lines[0]


# --- hostile model folders ------------------------------------------------------------------

def _weights(d: Path) -> Path:
    return d / "model.safetensors"


MODEL_DAMAGE = {
    "truncated weights": (lambda d: _weights(d).write_bytes(_weights(d).read_bytes()[:100_000]), "model.safetensors"),
    "empty weights": (lambda d: _weights(d).write_bytes(b""), "model.safetensors"),
    "huge header": (lambda d: _weights(d).write_bytes(struct.pack("<Q", 1 << 60) + _weights(d).read_bytes()[8:]),
                    "model.safetensors"),
    "same-size corrupted header": (lambda d: _weights(d).write_bytes(
        _weights(d).read_bytes()[:8] + b"\x00" * 32 + _weights(d).read_bytes()[40:]), "model.safetensors"),
    "config.json not JSON": (lambda d: (d / "config.json").write_text("{not json"), "config.json"),
    "config.json a list": (lambda d: (d / "config.json").write_text("[1, 2]"), "config.json"),
    "config.json 10,000 deep": (lambda d: (d / "config.json").write_text("[" * 10_000 + "]" * 10_000), "config.json"),
    "config.json binary": (lambda d: (d / "config.json").write_bytes(os.urandom(4096)), "config.json"),
}


@pytest.fixture(scope="module")
def damaged_models(tiny_model_dir, tmp_path_factory):
    out = {}
    for name, (damage, _) in MODEL_DAMAGE.items():
        d = tmp_path_factory.mktemp("model")
        shutil.copytree(tiny_model_dir, d, dirs_exist_ok=True)
        damage(d)
        out[name] = d
    return out


@pytest.mark.parametrize("damage", list(MODEL_DAMAGE))
def test_a_damaged_model_folder_is_one_line_naming_the_file(damage, damaged_models, tmp_path, capsys):
    folder, file = damaged_models[damage], MODEL_DAMAGE[damage][1]
    for argv in (["chat", folder, "--once", "hi"], ["export", "gguf", folder, "--out", tmp_path / "x.gguf"],
                 ["export", "unroll", folder, "--out", tmp_path / "u"]):
        assert f"{folder / file}:" in one_line_error(capsys, argv)
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("head", [b"GGUF" + b"\x07" * 60, b"GGUF\x03\x00\x00\x00" + b"\xff" * 16, b"not a gguf"])
def test_a_damaged_gguf_is_one_line_naming_the_file(head, tmp_path, capsys):
    f = tmp_path / "m.gguf"
    f.write_bytes(head)
    for argv in (["chat", f, "--once", "hi"], ["export", "gguf", "--check", f]):
        assert f"{f}:" in one_line_error(capsys, argv)


def test_doctor_reports_damaged_weights_as_a_problem(damaged_models, capsys):
    assert cli.main(["doctor", str(damaged_models["truncated weights"])]) == 1
    out = capsys.readouterr().out
    assert "PROBLEM" in out and "model.safetensors" in out and "truncated or corrupted" in out


# --- hostile files for the commands that read JSON, JSONL, YAML and cards ---------------------

def _png_truncated(p: Path) -> None:
    from tifaforge.chat.cards import Card, write_card_png

    write_card_png(Card(data={"name": "x"}), p)
    p.write_bytes(p.read_bytes()[:40])


BAD_FILES = {  # name -> (file name, how to make it, words the error must hold)
    "10,000-deep JSON": ("deep.json", lambda p: p.write_text("[" * 10_000 + "]" * 10_000), "nested deeper"),
    "10,000-deep object": ("deepo.json", lambda p: p.write_text('{"a": ' * 10_000 + "1" + "}" * 10_000), "nested deeper"),
    "binary": ("bin.json", lambda p: p.write_bytes(b"\x89\xff\x00\x9a" * 500), ""),
    "lone surrogate": ("sur.json", lambda p: p.write_text('{"messages": [{"role": "user", "content": "\\ud800"}], '
                                                          '"prompt": "\\ud800", "data": {"name": "\\ud800"}}'), ""),
    "empty": ("empty.json", lambda p: p.write_bytes(b""), ""),
    "a folder": ("folder.json", lambda p: p.mkdir(), "folder"),
    "a dangling symlink": ("dangling.json", lambda p: p.symlink_to(p.parent / "nowhere"), "dangling symlink"),
}
JSONL_COMMANDS = [["data", "check", "{f}", "--kind", "sft"], ["data", "check", "{f}", "--kind", "prompts"],
                  ["data", "check", "{f}", "--kind", "prefs"], ["reward", "score", "{f}"]]


@pytest.mark.parametrize("bad", list(BAD_FILES))
def test_bad_jsonl_is_one_line_naming_the_file(bad, tmp_path, capsys):
    name, make, words = BAD_FILES[bad]
    f = tmp_path / name.replace(".json", ".jsonl")
    make(f)
    for argv in JSONL_COMMANDS:
        line = one_line_error(capsys, [a.replace("{f}", str(f)) for a in argv])
        assert str(f) in line and words in line, line


def test_a_lone_surrogate_names_the_field(tmp_path, capsys):
    f = tmp_path / "s.jsonl"
    f.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok\\udfff"}]}\n')
    line = one_line_error(capsys, ["data", "check", f, "--kind", "sft"])
    assert f"{f}:1" in line and "messages[1].content" in line and "surrogate" in line


@pytest.mark.parametrize("bad", list(BAD_FILES))
def test_bad_card_is_one_line_naming_the_file(bad, tmp_path, tiny_model_dir, capsys):
    name, make, words = BAD_FILES[bad]
    f = tmp_path / name
    make(f)
    line = one_line_error(capsys, ["chat", tiny_model_dir, "--card", f, "--once", "hi"])
    assert str(f) in line and words in line, line


def test_truncated_png_card(tmp_path, tiny_model_dir, capsys):
    f = tmp_path / "card.png"
    _png_truncated(f)
    assert "truncated PNG" in one_line_error(capsys, ["chat", tiny_model_dir, "--card", f, "--once", "hi"])


BAD_YAML = {
    "binary": lambda p: p.write_bytes(os.urandom(3000).replace(b"\n", b"")),
    "10,000-deep": lambda p: p.write_text("a: " + "[" * 10_000 + "]" * 10_000 + "\n"),
    "a list": lambda p: p.write_text("- 1\n- 2\n"),
    "tabs": lambda p: p.write_text("cpt:\n\tsteps: 3\n"),
    "over the size cap": lambda p: p.write_text("# " + "x" * (5 << 20) + "\n"),
}


@pytest.mark.parametrize("bad", list(BAD_YAML))
def test_bad_config_is_one_line_naming_the_file(bad, tmp_path, capsys):
    f = tmp_path / "c.yaml"
    BAD_YAML[bad](f)
    for argv in (["config", f], ["train", "cpt", f, "--out", tmp_path / "o"], ["plan", f, "--gpus", "0"],
                 ["pipeline", f, "--name", "x"]):
        assert str(f) in one_line_error(capsys, argv)
    assert not (tmp_path / "o").exists()


def test_a_set_value_nested_too_deep_is_one_line(capsys):
    assert "nested too deep" in one_line_error(capsys, ["config", "--set", "cpt.steps=" + "[" * 5000 + "]" * 5000])


# --- outputs that cannot be written ---------------------------------------------------------

def test_out_below_a_file_is_one_line(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "afile").write_text("x")
    novels = ROOT / "src/tifaforge/assets/demo/novel_zh.txt"
    for argv in (["init-model", "tiny", "--out", tmp_path / "afile/m"],
                 ["data", "novels", novels, "--out", tmp_path / "afile/n", "--tokenizer", tiny_model_dir],
                 ["data", "demo", "--out", tmp_path / "afile/d"],
                 ["export", "gguf", tiny_model_dir, "--out", tmp_path / "afile/x.gguf"]):
        line = one_line_error(capsys, argv)
        assert "afile" in line and ("is a file" in line or "in the way" in line), line


def _in_own_mount(size: str, options: str, script: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run `script` (sh) with a fresh tmpfs at $M, in a mount namespace of its own (root can; nothing
    leaks to the host): a real full disk or read-only file system, not a simulated one."""
    cmd = f'M=$(mktemp -d) && mount -t tmpfs -o size={size},{options} tmpfs "$M" && {script}'
    return subprocess.run(["unshare", "-m", "sh", "-c", cmd], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})


TIFA = f"{sys.executable} -m tifaforge.cli"


def test_disk_full_and_read_only_say_so_and_keep_nothing_half_written():
    full = _in_own_mount("2m", "rw", f'{TIFA} init-model tiny --out "$M/m"; echo "rc=$?"; ls -A "$M"')
    assert "tifa: error: no space left on the device" in full.stderr and "Traceback" not in full.stderr, full.stderr
    assert "rc=1" in full.stdout and full.stdout.strip().endswith("rc=1"), full.stdout  # nothing left in $M
    ro = _in_own_mount("2m", "ro", f'{TIFA} init-model tiny --out "$M/m"; echo "rc=$?"')
    assert "read-only file system" in ro.stderr and "Traceback" not in ro.stderr and "rc=1" in ro.stdout, ro.stderr


# --- hangs and memory: subprocesses under a timeout -----------------------------------------

PEAK = """
import atexit, sys
def peak():
    sys.stderr.write("PEAK " + next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")) + "\\n")
atexit.register(peak)
from tifaforge.cli import main
sys.exit(main(sys.argv[1:]))
"""


def tifa_subprocess(argv: list, timeout: int = 90) -> tuple[int, str, int]:
    """(status, stderr, peak RSS in bytes) of `tifa ARGV` in a child; a hang fails on the timeout."""
    r = subprocess.run([sys.executable, "-c", PEAK, *map(str, argv)], capture_output=True, text=True, timeout=timeout)
    peak = int(next(line.split()[1] for line in r.stderr.splitlines() if line.startswith("PEAK ")))
    return r.returncode, r.stderr, peak * 1024


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe.json"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("source", ["fifo", "/dev/zero"])
def test_fifos_and_devices_are_refused_without_waiting(source, fifo, tmp_path, tiny_model_dir):
    path = fifo if source == "fifo" else Path(source)
    kind = "FIFO" if source == "fifo" else "character device"
    for argv in (["config", path], ["data", "check", path, "--kind", "sft"], ["reward", "score", path],
                 ["chat", tiny_model_dir, "--card", path, "--once", "hi"],
                 ["data", "novels", path, "--out", tmp_path / "n", "--tokenizer", "tiny"]):
        rc, err, _ = tifa_subprocess(argv)
        assert rc == 2 and f"tifa: error: {path}: is a {kind}" in err and "Traceback" not in err, err


def _epub(path: Path, members: dict[str, bytes | tuple[bytes, int]], container: bytes | tuple[bytes, int] | None = None) -> None:
    """An EPUB of `members` (bytes, or (bytes, n): written n times, streamed: a bomb is never held whole)."""
    names = [n for n in members if n.endswith(".xhtml")]
    opf = ('<?xml version="1.0"?><package xmlns="http://www.idpf.org/2007/opf"><manifest>'
           + "".join(f'<item id="i{i}" href="{n}"/>' for i, n in enumerate(names)) + "</manifest><spine>"
           + "".join(f'<itemref idref="i{i}"/>' for i in range(len(names))) + "</spine></package>")
    container = container or (b'<?xml version="1.0"?><container xmlns="urn:oasis:names:tc:opendocument:xmlns:container">'
                              b'<rootfiles><rootfile full-path="content.opf"/></rootfiles></container>')
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        for n, data in {"META-INF/container.xml": container, "content.opf": opf.encode(), **members}.items():
            chunk, times = data if isinstance(data, tuple) else (data, 1)
            with z.open(n, "w", force_zip64=True) as f:
                for _ in range(times):
                    f.write(chunk)


def _lie_about_size(path: Path, name: bytes, size: int) -> None:
    """Patch a member's declared uncompressed size in its local header and the central directory."""
    data = bytearray(path.read_bytes())
    for sig, name_at, size_at in ((b"PK\x03\x04", 30, 22), (b"PK\x01\x02", 46, 24)):
        pos = 0
        while (pos := data.find(sig, pos)) >= 0:
            if data[pos + name_at:pos + name_at + len(name)] == name:
                struct.pack_into("<I", data, pos + size_at, size)
            pos += 4
    path.write_bytes(bytes(data))


PARA = "<p>天色已晚，她推开门，看见雪落在院子里。</p>\n".encode()
MB = PARA * ((1 << 20) // len(PARA))
BOMBS = {  # an EPUB of a few hundred KB that inflates past the caps, and what the report must say of it
    "a member lying about its size": (
        lambda p: (_epub(p, {"c.xhtml": (MB, 300)}), _lie_about_size(p, b"c.xhtml", 1000)), "unreadable member"),
    "a 300 MB container.xml": (
        lambda p: _epub(p, {"c.xhtml": PARA * 10}, container=(b" " * (1 << 20), 300)),
        "no usable OPF spine (over 4,194,304 bytes"),
    "many members under the member cap": (lambda p: _epub(p, {f"c{i}.xhtml": (MB, 16) for i in range(5)}), None),
}


@pytest.mark.slow
@pytest.mark.parametrize("bomb", list(BOMBS))
def test_epub_bombs_stay_within_the_memory_bound(bomb, tmp_path):
    """The peak RSS of `tifa data novels` on any EPUB stays under 2x the total-uncompressed cap."""
    make, words = BOMBS[bomb]
    (tmp_path / "in").mkdir()
    make(tmp_path / "in" / "b.epub")
    rc, err, peak = tifa_subprocess(["data", "novels", tmp_path / "in", "--out", tmp_path / "o", "--tokenizer", "tiny",
                                     "--block-size", "64"], timeout=240)
    assert peak <= 2 * novel_read.MAX_EPUB_TOTAL, (peak, err)
    assert "Traceback" not in err
    if words is None:  # the many members: all read, within the bound
        assert rc == 0, err
        stats = json.loads((tmp_path / "o" / "stats.json").read_text())
        assert stats["files"][0]["problems"] == [] and stats["chapters"]["found"] >= 5
    else:
        assert words in err, err  # the reason is in the file's warning (and stats.json when text was kept)


def test_epub_total_cap_stops_reading_and_says_where(tmp_path, monkeypatch):
    """Past the total budget the rest of the book is not read, and the report says from which member."""
    from tifaforge.data.novels.read import FileReport, file_chapters

    monkeypatch.setattr(novel_read, "MAX_EPUB_TOTAL", 3 * 200_000)
    path = tmp_path / "b.epub"
    _epub(path, {f"c{i}.xhtml": b"<p>" + "雪".encode() * 66_000 + b"</p>" for i in range(5)})
    report = FileReport(str(path), path.stat().st_size)
    chapters = list(file_chapters(path, None, report))
    assert 2 <= sum(c.count("雪") for c in chapters) // 66_000 <= 3
    assert any("cap on what one EPUB may inflate to" in p and "documents after it not read" in p
               for p in report.problems), report.problems


# --- novels folders: what is not read is said -----------------------------------------------

def test_novels_folder_reports_what_it_does_not_read(tmp_path, capsys):
    books = tmp_path / "books"
    books.mkdir()
    text = (ROOT / "src/tifaforge/assets/demo/novel_zh.txt").read_text(encoding="utf-8")
    (books / os.fsdecode(b"\xb5\xda\xd5\xc2.txt")).write_text(text)  # 第章 in GBK: not UTF-8
    (books / "gone.txt").symlink_to(tmp_path / "nowhere.txt")
    os.mkfifo(books / "pipe.txt")
    assert cli.main(["data", "novels", str(books), "--out", str(tmp_path / "o"), "--tokenizer", "tiny",
                     "--block-size", "64"]) == 0
    out = capsys.readouterr().out
    stats = json.loads((tmp_path / "o" / "stats.json").read_text(encoding="utf-8"))
    assert stats["files"][0]["path"].endswith("\\xb5\\xda\\xd5\\xc2.txt") and stats["chapters"]["kept"] > 0
    assert {Path(e["path"]).name: e["reason"] for e in stats["entries_not_read"]} == {
        "gone.txt": "a dangling symlink", "pipe.txt": "is a FIFO (named pipe), not a regular file"}
    assert "not read" in out and "pipe.txt" in out


def test_an_unexpected_error_is_one_line_and_the_traceback_comes_with_v(tmp_path, capsys, monkeypatch):
    """A bug of ours still ends in one line; -v shows the traceback for the report."""
    from tifaforge.data import demo

    def broken(out):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(demo, "demo_command", broken)
    assert "unexpected ZeroDivisionError: boom; rerun with -v" in one_line_error(capsys, ["data", "demo"])
    assert cli.main(["-v", "data", "demo"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("tifa: error: unexpected ZeroDivisionError")


# --- the server: property-based request bodies ----------------------------------------------

@pytest.fixture(scope="module")
def fuzz_url(tiny_model_dir):
    from test_serve import live

    from tifaforge.engine.generate import Engine
    from tifaforge.serve.app import create_app

    engine = Engine.load(tiny_model_dir, device="cpu")
    with live(create_app(engine, max_concurrency=4, model_name="tiny")) as base:
        yield base


TEXT = st.text(st.characters(codec=None), max_size=40) | st.lists(  # lone surrogates and role tags, often
    st.sampled_from(["\ud800", "\udfff", "a", "<|User|>", "<|Assistant|>", "<|end▁of▁sentence|>", "<think>"]),
    max_size=6).map("".join)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70), st.integers(-3, 8),
                    st.floats(allow_nan=False, allow_infinity=False), TEXT)
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", "bogus"]) | JSON_VALUES,
                                 "content": TEXT | JSON_VALUES})
FIELDS = {"temperature": JSON_VALUES | st.floats(0, 2), "top_p": JSON_VALUES, "top_k": JSON_VALUES, "min_p": JSON_VALUES,
          "repetition_penalty": JSON_VALUES, "presence_penalty": JSON_VALUES, "frequency_penalty": JSON_VALUES,
          "seed": JSON_VALUES, "stop": JSON_VALUES | st.lists(TEXT, max_size=3),
          "stream": st.booleans() | JSON_VALUES, "n": st.integers(-1, 3) | JSON_VALUES, "logit_bias": JSON_VALUES,
          "logprobs": JSON_VALUES, "top_logprobs": JSON_VALUES, "user": JSON_VALUES, "model": JSON_VALUES,
          "unknown_field_of_another_backend": JSON_VALUES}


def _bodies(main: str, main_values) -> st.SearchStrategy:
    return st.fixed_dictionaries({main: main_values, "max_tokens": st.integers(-2, 6) | JSON_VALUES},
                                 optional={k: v for k, v in FIELDS.items()})


def _assert_clean(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        assert r.json()["error"]["message"], r.text


FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@FUZZ
@given(body=_bodies("messages", st.lists(MESSAGE, max_size=4) | JSON_VALUES))
def test_chat_bodies_never_500(fuzz_url, body):
    _assert_clean(httpx.post(fuzz_url + "/v1/chat/completions", content=json.dumps(body), timeout=60,
                             headers={"content-type": "application/json"}))


@settings(FUZZ, max_examples=60)
@given(body=_bodies("prompt", TEXT | st.lists(TEXT, max_size=3) | JSON_VALUES))
def test_completion_bodies_never_500(fuzz_url, body):
    _assert_clean(httpx.post(fuzz_url + "/v1/completions", content=json.dumps(body), timeout=60,
                             headers={"content-type": "application/json"}))


@settings(FUZZ, max_examples=60)
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_raw_bytes_never_500(fuzz_url, raw):
    for path in ("/v1/chat/completions", "/v1/completions"):
        _assert_clean(httpx.post(fuzz_url + path, content=raw, timeout=60, headers={"content-type": "application/json"}))


@pytest.mark.parametrize("body", ['{"messages": ' + "[" * 5000 + "]" * 5000 + "}",
                                  '{"messages": [{"role": "user", "content": "x"}], "max_tokens": NaN}',
                                  '{"messages": [{"role": "user", "content": "x"}], "temperature": Infinity}'])
def test_deep_or_non_standard_json_is_400(fuzz_url, body):
    r = httpx.post(fuzz_url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, r.text[:300]
    assert r.json()["error"]["message"]
