"""`tifa data novels`: decoding, normalisation, chapters, boilerplate, dedup, packing, stats.

    .venv/bin/python -m pytest tests/test_novels.py -q
"""

from __future__ import annotations

import argparse
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tifaforge.data import novels
from tifaforge.data import text as tx
from tifaforge.data.novels import Deduper, FileReport, file_chapters, ingest_novels, pack, read
from tifaforge.errors import TifaError

# Adapted from the bundled tokenizer corpus (written for this project). 𠮷 (U+20BB7) and 𡈽 (U+2123D)
# are 4-byte characters in GB18030.
REF = (
    "第一章 雨夜\n"
    "暮色压着青石镇的屋檐，细雨从黄昏一直下到掌灯时分。客栈的灯笼被风吹得左右摇晃，昏黄的光在湿漉漉的"
    "石板路上碎成一片一片。沈青崖推门进来的时候，堂中原本低声说话的几桌客人忽然都静了。\n"
    "“掌柜的，一壶热酒，两个小菜。”他把斗笠搁在桌角，声音不高，却让柜台后打瞌睡的伙计一下子醒了。\n"
    "第二章 山门\n"
    "云岚宗的山门立在九百级石阶之上。晨雾未散，白鹤从松林间掠过，翅尖扫落一串露水。林小满背着一只竹篓，"
    "一步一喘地往上爬。她问：“师兄，还有多远？”师兄笑道：“不远了，再走三百级！”\n"
)
RARE = "吉野家的𠮷字和𡈽字，都是四字节的字。\n"
REF_TRAD = (  # REF in Traditional characters, all of them in Big5
    "第一章 雨夜\n"
    "暮色壓著青石鎮的屋檐，細雨從黃昏一直下到掌燈時分。客棧的燈籠被風吹得左右搖晃，昏黃的光在溼漉漉的"
    "石板路上碎成一片一片。沈青崖推門進來的時候，堂中原本低聲說話的幾桌客人忽然都靜了。\n"
    "「掌櫃的，一壺熱酒，兩個小菜。」他把斗笠擱在桌角，聲音不高，卻讓櫃檯後打瞌睡的夥計一下子醒了。\n"
    "第二章 山門\n"
    "雲嵐宗的山門立在九百級石階之上。晨霧未散，白鶴從松林間掠過，翅尖掃落一串露水。林小滿揹著一隻竹簍，"
    "一步一喘地往上爬。她問：「師兄，還有多遠？」師兄笑道：「不遠了，再走三百級！」\n"
)


def traditional(s: str) -> str:
    from opencc import OpenCC

    return OpenCC("s2t").convert(s)


def chapters_of(path: Path, encoding: str | None = None) -> tuple[str, FileReport]:
    report = FileReport(str(path), path.stat().st_size)
    return "".join(file_chapters(path, encoding, report)), report


# ---------------------------------------------------------------------------------------------
# Decoding


@pytest.mark.parametrize(
    "codec, text, expected",
    [
        ("utf-8", REF + RARE, "utf-8"),
        ("utf-8-sig", REF + RARE, "utf-8"),
        ("utf-16", REF + RARE, None),  # Python writes the platform's BOM order
        ("utf-16-le+bom", REF + RARE, "utf-16-le"),
        ("utf-16-be+bom", REF + RARE, "utf-16-be"),
        ("gb18030", REF + RARE, "gb18030"),
        ("gbk", REF, "gb18030"),
        ("gb2312", REF, "gb18030"),
        ("big5", "trad", "cp950"),
        ("cp950", "trad", "cp950"),
    ],
)
def test_each_encoding_round_trips(tmp_path, codec, text, expected):
    text = REF_TRAD if text == "trad" else text
    path = tmp_path / "book.txt"
    if codec.endswith("+bom"):
        import codecs as c

        bom = c.BOM_UTF16_LE if "le" in codec else c.BOM_UTF16_BE
        path.write_bytes(bom + text.encode(codec[:9]))
    else:
        path.write_bytes(text.encode(codec))
    got, report = chapters_of(path)
    assert got == tx.normalise(text)
    native = "utf-16-le" if text.encode("utf-16").startswith(b"\xff\xfe") else "utf-16-be"
    assert report.encoding == (expected or native)
    assert report.bad_bytes == 0


def test_forced_gbk_still_decodes_four_byte_characters(tmp_path):
    path = tmp_path / "rare.txt"
    path.write_bytes((REF + RARE).encode("gb18030"))
    got, report = chapters_of(path, encoding="GBK")
    assert "𠮷" in got and "𡈽" in got and report.encoding == "gb18030"
    assert report.decided_by == "forced GBK"


def test_forced_encoding_tells_big5_from_gb(tmp_path):
    path = tmp_path / "big5.txt"
    path.write_bytes(REF_TRAD.encode("big5"))
    assert chapters_of(path, encoding="big5")[0] == tx.normalise(REF_TRAD)
    # the same bytes forced as GB decode without a single error, into nonsense: why detection is statistical
    garbled, report = chapters_of(path, encoding="gb18030")
    assert garbled != tx.normalise(REF_TRAD) and report.bad_bytes == 0


def test_a_forced_utf16_follows_the_bom_and_defaults_to_little_endian(tmp_path):
    (tmp_path / "be.txt").write_bytes(b"\xfe\xff" + REF.encode("utf-16-be"))
    (tmp_path / "le.txt").write_bytes(REF.encode("utf-16-le"))
    for name, codec in (("be.txt", "utf-16-be"), ("le.txt", "utf-16-le")):
        got, report = chapters_of(tmp_path / name, encoding="utf-16")
        assert got == tx.normalise(REF) and report.encoding == codec


def test_undecodable_bytes_are_dropped_and_reported_with_offsets(tmp_path, monkeypatch):
    monkeypatch.setattr(read, "READ_BLOCK", 64)  # many blocks: offsets must stay file offsets
    monkeypatch.setattr(tx, "DETECT_SAMPLE", 200)
    good = (REF * 3).encode("utf-8")
    bad_at = [len("第一章 雨".encode()), len((REF * 3)[:-10].encode())]  # on character boundaries
    data = bytearray(good)
    for n, at in enumerate(bad_at):
        data[at + n:at + n] = b"\xff"  # each insertion shifts the later offsets by one
    path = tmp_path / "bad.txt"
    path.write_bytes(bytes(data))
    got, report = chapters_of(path)
    assert got == tx.normalise(REF * 3)
    assert report.bad_bytes == 2
    assert [s["offset"] for s in report.bad_spans] == [bad_at[0], bad_at[1] + 1]
    assert all(s["bytes"] == "ff" for s in report.bad_spans)


def test_a_file_in_the_wrong_encoding_is_skipped_with_the_reason(tmp_path):
    path = tmp_path / "gbk.txt"
    path.write_bytes(REF.encode("gbk"))
    report = FileReport(str(path), path.stat().st_size)
    with pytest.raises(novels.SkipFile, match=r"undecodable sequences .* as utf-8, first at offset \d+"):
        list(file_chapters(path, "utf-8", report))


def test_line_cut_respects_code_units():
    data = "甲\n乙\r\n丙".encode("utf-16-le")
    cut = tx.line_cut(data, "utf-16-le")
    assert data[:cut].decode("utf-16-le") == "甲\n乙\r\n"
    assert tx.line_cut("ab\ncd".encode("gb18030"), "gb18030") == 3
    assert tx.line_cut(b"no break", "utf-8") == 0


# ---------------------------------------------------------------------------------------------
# Normalisation and chapters


def test_normalise_keeps_chinese_punctuation_and_cleans_whitespace():
    raw = "\ufeff\r\n\r\n　　他说：“你好！”\u200b（完）\r\n\r\n\r\n\r\n　　ＡＢＣ１２３，。？\t \r\n  a\u3000\u3000b  c\r\nend"
    assert tx.normalise(raw) == "他说：“你好！”（完）\n\nＡＢＣ１２３，。？\na b c\nend\n"
    assert tx.normalise("") == "" and tx.normalise("\n \u3000\n") == ""


def test_headings_split_chapters_and_a_volume_title_stays_with_its_chapter():
    text = tx.normalise(
        "书名：测试\n作者：某\n第一卷 风起\n第一章 初遇\n正文一。\n第2章\n正文二。\n【第十一回】 夜雨\n正文三。\n"
        "Chapter 4 The Road\nbody\n一、开端\n正文五。\n第三回合，他出拳了。\n序章里说的话，他记得。\n"
    )
    chapters = tx.split_chapters(text)
    assert [c.split("\n")[0] for c in chapters] == ["书名：测试", "第一卷 风起", "第2章", "【第十一回】 夜雨",
                                                   "Chapter 4 The Road", "一、开端"]
    assert chapters[1].startswith("第一卷 风起\n第一章 初遇\n")
    assert "".join(chapters) == text


LINES = st.sampled_from([
    "第一章 初遇", "第12回", "第三百二十节 风", "Chapter 7", "序章", "1. 开始", "二、山门", "第一卷", "正文 第5章",
    "他说：“好。”", "雨下了一夜，", "本章完", "求月票！", "a", "", " ", "\u3000\u3000", "\u200b", "\t",
])
ENDS = st.sampled_from(["\n", "\r\n", "\r", "\n\n", "\r\n\r\n\r\n"])


@st.composite
def raw_texts(draw):
    parts = draw(st.lists(st.tuples(LINES, ENDS), max_size=30))
    return "".join(a + b for a, b in parts) + draw(st.sampled_from(["", "尾巴"]))


def cut(text: str, points: list[int]) -> list[str]:
    points = sorted({p % (len(text) + 1) for p in points})
    return [text[a:b] for a, b in zip([0] + points, points + [len(text)])]


@settings(max_examples=300, deadline=None)
@given(raw_texts(), st.lists(st.integers(0, 10_000), max_size=6))
def test_chapter_invariant_and_streaming_equals_whole_text(raw, points):
    whole = tx.normalise(raw)
    chapters = tx.split_chapters(whole)
    assert "".join(chapters) == whole  # nothing lost, nothing duplicated
    assert all(tx.HEADING.match(c) for c in chapters[1:])  # every later chapter starts at a heading
    pieces = cut(raw, points)
    assert "".join(tx.normalise_stream(pieces)) == whole
    assert list(tx.split_chapters_stream(tx.normalise_stream(pieces))) == chapters
    assert tx.normalise(whole) == whole  # idempotent


@settings(max_examples=40, deadline=None)
@given(raw_texts(), st.sampled_from(["utf-8", "gb18030", "utf-16-le", "big5"]))
def test_chapter_invariant_through_files_read_in_small_blocks(tmp_path_factory, raw, codec):
    assume(raw)
    if codec == "big5":
        raw = traditional(raw).replace("\u200b", "")  # Big5 has no zero-width space
    path = tmp_path_factory.mktemp("inv") / "book.txt"
    path.write_bytes((b"\xff\xfe" if codec == "utf-16-le" else b"") + raw.encode(codec))
    old = read.READ_BLOCK, tx.DETECT_SAMPLE
    read.READ_BLOCK = tx.DETECT_SAMPLE = 7  # blocks of a few bytes: every cut position gets tried
    try:
        got, _ = chapters_of(path, encoding=codec)
    finally:
        read.READ_BLOCK, tx.DETECT_SAMPLE = old
    assert got == tx.normalise(raw)


def test_a_text_without_headings_is_cut_into_bounded_parts():
    text = tx.normalise("他走了很久。\n" * 1000)
    parts = list(tx.split_chapters_stream(tx.normalise_stream([text[i:i + 700] for i in range(0, len(text), 700)]),
                                          max_chars=2000))
    assert "".join(parts) == text and max(map(len, parts)) < 2000 + 700 and len(parts) > 1


# ---------------------------------------------------------------------------------------------
# Boilerplate


def test_boilerplate_lines_are_removed_and_counted():
    story_line = "他攥着那张写满月票数字的纸条，站在雨里想了很久，终究没有把它交给任何人，只是折好放进了怀里，转身离开了这座城。"
    chapter = tx.normalise(
        "第三章 夜行\n他走进雨里。\n笔趣阁 最快更新 无弹窗\nhttps://www.example.com/book/1.html\n"
        "夜色很深（请记住本站域名 www.example.com）。\n" + story_line + "\n本章完\n求月票！求推荐票！\n"
        "今天两更，晚点还有一更。\nPS：感谢书友的打赏。\n"
    )
    cleaned, removed = tx.clean_chapter(chapter)
    assert cleaned == f"第三章 夜行\n他走进雨里。\n夜色很深。\n{story_line}\n"
    assert removed == {"site_ad": 1, "url": 1, "inline_ad": 1, "chapter_end": 1, "vote_request": 1,
                       "update_notice": 1, "author_note": 1}


def test_traditional_to_simplified_before_cleaning():
    cleaned, removed = tx.clean_chapter("第一章 開端\n他說：「請記住本站域名」\n他們走了。\n", simplify=True)
    assert cleaned == "第一章 开端\n他们走了。\n" and removed == {"site_ad": 1}


# ---------------------------------------------------------------------------------------------
# Duplicates


def near_copy(text: str) -> str:
    return text.replace("细雨", "小雨").replace("九百级", "八百级")


@pytest.mark.parametrize("on_disk", [False, True], ids=["memory", "disk"])
def test_dedup_drops_exact_and_near_copies_and_keeps_a_different_chapter(on_disk, tmp_path):
    a, b = tx.split_chapters(tx.normalise(REF))
    d = Deduper(threshold=0.8, on_disk=tmp_path / "i" if on_disk else None)
    assert d.check(a, owner=0) is None
    assert d.check(a, owner=1) == ("exact", 0)
    assert d.check(near_copy(a), owner=2) == ("near", 0)
    assert d.check(b, owner=3) is None
    loose = Deduper(threshold=1.0, on_disk=tmp_path / "j" if on_disk else None)  # 1.0: exact copies only
    assert loose.check(a, 0) is None and loose.check(near_copy(a), 1) is None and loose.check(a, 2) == ("exact", 0)
    if on_disk:  # nothing held in memory
        assert not d.exact and not d.owner and not d.signatures and d.bands is None
        d.close()
        assert not (tmp_path / "i" / "dedup.sqlite").exists()


def test_dedup_on_disk_gives_the_in_memory_verdicts(tmp_path):
    """The same LSH bands and candidate order: every verdict equal, on chapters edited by 0-60%
    (around the threshold) with repeats."""
    rng = np.random.default_rng(1)
    words = list("山水风雨云剑酒月花雪城人江湖客栈夜灯门窗")
    bases = ["".join(rng.choice(words, 400)) for _ in range(12)]
    chapters = []
    for i in range(150):
        base = bases[rng.integers(len(bases))]
        edit = rng.uniform(0, 0.6)
        cut = int(len(base) * (1 - edit))
        chapters.append(base[:cut] + "".join(rng.choice(words, len(base) - cut)) if rng.random() < 0.9 else base)
    memory, disk = Deduper(0.7), Deduper(0.7, on_disk=tmp_path)
    verdicts = [(memory.check(c, i), disk.check(c, i)) for i, c in enumerate(chapters)]
    assert all(m == d for m, d in verdicts)
    kinds = {m[0] if m else None for m, _ in verdicts}
    assert kinds == {None, "near", "exact"}
    disk.close()
    # The in-memory band tables find what datasketch's MinHashLSH finds, for every indexed signature.
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=0.7, num_perm=128)
    perms = MinHash(num_perm=128).permutations
    sigs = [np.frombuffer(raw, np.uint32) for raw in memory.signatures]
    for key, sig in enumerate(sigs):
        lsh.insert(key, MinHash(hashvalues=sig, permutations=perms, scheme="affine32"))
    for sig in sigs:
        raw, width = sig.tobytes(), 4 * memory.rows
        ours = set().union(*(t.get(raw[i * width:(i + 1) * width], ()) for i, t in enumerate(memory.bands)))
        assert ours == set(lsh.query(MinHash(hashvalues=sig, permutations=perms, scheme="affine32")))
    assert (len(memory.bands), memory.rows) == (lsh.b, lsh.r)


def test_signature_estimates_jaccard():
    rng = np.random.default_rng(0)
    words = ["山", "水", "风", "雨", "云", "剑", "酒", "月", "花", "雪", "城", "人"]
    base = "".join(rng.choice(words, 3000))
    for keep in (0.2, 0.5, 0.9):
        other = base[: int(len(base) * keep)] + "".join(rng.choice(words, int(len(base) * (1 - keep))))
        sa, sb = (set(novels.shingle_hashes(t).tolist()) for t in (base, other))
        true = len(sa & sb) / len(sa | sb)
        est = float(np.mean(novels.signature(base, 256) == novels.signature(other, 256)))
        assert abs(est - true) < 0.1, (keep, true, est)
    short = novels.signature("短短的一句话", 128)  # fewer shingles than bins: densified, still deterministic
    assert short.shape == (128,) and (short == novels.signature("短短的一句话", 128)).all()


# ---------------------------------------------------------------------------------------------
# Packing, the dataset and stats.json


def ingest(inputs, out, tok, **kw):
    return ingest_novels([str(p) for p in inputs], out, tok, progress=False, **kw)


def test_blocks_are_the_token_stream_with_eot_between_documents(tmp_path, tiny_tokenizer):
    import datasets

    docs = ["他走了。\n" * 30, "“你好！”她说。\n" * 17 + "最后一行。\n", "夜深了，灯还亮着。\n" * 23]
    for i, d in enumerate(docs):
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / "in" / f"{i}.txt").write_text(d, encoding="utf-8")
    stats = ingest([tmp_path / "in"], tmp_path / "out", tiny_tokenizer, block_size=16, shard_blocks=5)
    eot = tiny_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    stream = []
    for d in docs:
        stream += tiny_tokenizer(d, add_special_tokens=False)["input_ids"] + [eot]
    ds = datasets.load_from_disk(str(tmp_path / "out"))
    blocks = [row["input_ids"] for row in ds]
    tail = len(stream) % 16
    assert tail and len(blocks) == stats["blocks"] + 1 and stats["blocks"] == len(stream) // 16
    assert all(len(b) == 16 for b in blocks[:-1]) and len(blocks[-1]) == tail == stats["tail_block_tokens"]
    assert sum(blocks, []) == stream  # every token the user gave, the last ones in a shorter row
    assert stats["tokens"] == len(stream) and stats["tokens_dropped_tail"] == 0
    assert len(stats["shards"]) == -(-len(blocks) // 5) > 1
    dropped = ingest([tmp_path / "in"], tmp_path / "out2", tiny_tokenizer, block_size=16, drop_tail=True)
    assert dropped["tokens_dropped_tail"] == tail and dropped["tail_block_tokens"] == 0  # only when asked
    assert sum(datasets.load_from_disk(str(tmp_path / "out2"))["input_ids"], []) == stream[: len(stream) - tail]
    assert stats["separator"] == {"token": "<|endoftext|>", "id": eot}


def test_chapters_packing_keeps_every_chapter_that_fits_whole_in_one_row(tmp_path, tiny_tokenizer):
    """--pack chapters: the same tokens in the same order as the stream, but a row boundary falls only
    between chapters (a document's separator stays with its last chapter); only a chapter longer than a
    block is cut; a row is closed only when the next chapter does not fit (greedy)."""
    import datasets

    B = 64
    sizes = [[1, 4, 2, 40], [3, 1, 5], [30, 2]]  # 40 and 30 sentences: longer than a block
    docs = [[f"第{i}章\n" + "他走了，又回来。" * n + "\n" for i, n in enumerate(d)] for d in sizes]
    eot = tiny_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    units = []  # what must stay together: each chapter, the separator with the document's last one
    for d in docs:
        ids = [tiny_tokenizer(tx.clean_chapter(c, False)[0], add_special_tokens=False)["input_ids"] for c in d]
        ids[-1] = ids[-1] + [eot]
        units += ids
    writer = pack.ShardWriter(tmp_path / "rows", B, shard_blocks=3)
    with pack.Packer(tiny_tokenizer, eot, B, writer, pack.Timers(), pack="chapters") as packer:
        for d in docs:
            for c in d:
                packer.add(c)
            packer.end_document()
    writer.finish()
    rows = [r["input_ids"] for r in datasets.load_from_disk(str(tmp_path / "rows"))]
    assert sum(rows, []) == sum(units, [])  # nothing lost, nothing reordered
    assert all(0 < len(r) <= B for r in rows) and packer.blocks == len(rows)
    starts = {0}
    for r in rows:
        starts.add(max(starts) + len(r))
    at = 0
    cut = 0
    for u in units:
        inside = [s for s in starts if at < s < at + len(u)]
        if len(u) <= B:
            assert not inside, f"a chapter of {len(u)} tokens was cut"
        else:
            cut += 1
            assert len(inside) == (len(u) - 1) // B or len(inside) == len(u) // B
        at += len(u)
    assert cut == packer.chapters_cut >= 2 and cut < len(units) - 3
    flat_starts = sorted(starts)
    unit_starts = {sum(len(x) for x in units[:i]): len(u) for i, u in enumerate(units)}
    for r, start in zip(rows[:-1], flat_starts[1:]):
        if start in unit_starts and unit_starts[start] <= B:  # greedy: the next chapter did not fit
            assert len(r) + unit_starts[start] > B
    stream = [tiny_tokenizer(tx.clean_chapter(c, False)[0], add_special_tokens=False)["input_ids"] for d in docs for c in d]
    assert len(sum(rows, [])) == len(sum(stream, [])) + len(docs)


def test_chapters_packing_through_the_command(tmp_path, tiny_model_dir, capsys):
    write_mixed_folder(tmp_path / "in")
    parser = argparse.ArgumentParser()
    novels.novels_arguments(parser)
    args = parser.parse_args([str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--tokenizer",
                              str(tiny_model_dir), "--block-size", "256", "--pack", "chapters", "--no-progress"])
    assert novels.novels_command(args) == 0
    out = capsys.readouterr().out
    stats = json.loads((tmp_path / "out" / "stats.json").read_text(encoding="utf-8"))
    assert stats["pack"] == "chapters" and 0 < stats["fill"] <= 1 and "rows of whole chapters up to 256" in out
    stream = ingest([tmp_path / "in"], tmp_path / "stream", tiny_model_dir, block_size=256)
    assert stats["tokens"] == stream["tokens"] and stats["blocks"] >= stream["blocks"]
    with pytest.raises(TifaError, match="--drop-tail: only with --pack stream"):
        ingest([tmp_path / "in"], tmp_path / "bad", tiny_model_dir, block_size=256, pack="chapters", drop_tail=True)


def test_a_fake_separator_in_the_text_is_removed_and_counted(tmp_path, tiny_tokenizer):
    (tmp_path / "a.txt").write_text("他写下<|endoftext|>几个字。\n" * 20, encoding="utf-8")
    stats = ingest([tmp_path / "a.txt"], tmp_path / "out", tiny_tokenizer, block_size=8)
    eot = tiny_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    import datasets

    ids = sum(datasets.load_from_disk(str(tmp_path / "out"))["input_ids"], [])
    assert stats["special_token_strings_removed"] == 20
    assert ids.count(eot) == 1  # only the real separator, kept in the last block


def write_mixed_folder(folder: Path) -> dict[str, str]:
    """Four novels in four encodings plus a near copy and an exact copy; returns name -> marker."""
    (folder / "sub").mkdir(parents=True)
    markers = {"utf8.txt": "甲书独有的一句话。", "gbk.txt": "乙书独有的一句话。", "big5.txt": "丙書獨有的一句話。",
               "utf16.txt": "丁书独有的一句话。"}
    body = {n: tx.split_chapters(tx.normalise(REF))[i % 2] for i, n in enumerate(markers)}
    texts = {
        "utf8.txt": ("第一章 甲\n" + markers["utf8.txt"] + RARE + body["utf8.txt"] * 2, "utf-8"),
        "gbk.txt": ("第一章 乙\n" + markers["gbk.txt"] + "\n" + REF + "求月票！\n", "gbk"),
        "big5.txt": ("第一章 丙\n" + markers["big5.txt"] + "\n" + REF_TRAD, "big5"),
        "utf16.txt": ("第一章 丁\n" + markers["utf16.txt"] + "\n山高水长。" * 40 + "\n", "utf-16"),
    }
    for name, (text, codec) in texts.items():
        (folder / ("sub" if codec == "big5" else "") / name).write_bytes(text.encode(codec))
    (folder / "sub" / "copy.txt").write_text(near_copy(REF), encoding="utf-8")  # near copy of gbk.txt's chapters
    (folder / "sub" / "notes.md").write_text("not a novel", encoding="utf-8")
    write_epub(folder / "sub" / "book.epub")
    (folder / "zz_last.txt").write_text("风吹过原野。\n" * 20, encoding="utf-8")  # the shorter last block holds it
    return markers


def test_mixed_encoding_folder_end_to_end(tmp_path, tiny_tokenizer):
    import datasets

    markers = write_mixed_folder(tmp_path / "in")
    stats = ingest([tmp_path / "in"], tmp_path / "out", tiny_tokenizer, block_size=8)
    files = {Path(f["path"]).name: f for f in stats["files"]}
    assert {n: f["encoding"] for n, f in files.items()} == {
        "utf8.txt": "utf-8", "gbk.txt": "gb18030", "big5.txt": "cp950", "utf16.txt": "utf-16-le", "copy.txt": "utf-8",
        "book.epub": "utf-8", "zz_last.txt": "utf-8"}
    assert files["copy.txt"]["chapters_kept"] == 0 and stats["chapters"]["near_duplicates"] >= 2
    assert list(files["copy.txt"]["duplicate_of"]) == [files["gbk.txt"]["path"]]
    ids = sum(datasets.load_from_disk(str(tmp_path / "out"))["input_ids"], [])
    decoded = tiny_tokenizer.decode(ids)
    assert all(m in decoded for m in markers.values()) and "𠮷" in decoded and "求月票" not in decoded
    assert "第二章 离开\n他走了。" in decoded  # the EPUB
    assert stats["removed_lines"] == {"vote_request": 1}
    on_disk = json.loads((tmp_path / "out" / "stats.json").read_text(encoding="utf-8"))
    assert on_disk == json.loads(json.dumps(stats))


def test_t2s_makes_a_traditional_copy_a_duplicate(tmp_path, tiny_tokenizer):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text(REF, encoding="utf-8")
    (tmp_path / "in" / "b.txt").write_bytes(REF_TRAD.encode("big5"))
    plain = ingest([tmp_path / "in"], tmp_path / "o1", tiny_tokenizer, block_size=8)
    simplified = ingest([tmp_path / "in"], tmp_path / "o2", tiny_tokenizer, block_size=8, to_simplified=True)
    assert plain["chapters"]["kept"] == 4 and simplified["chapters"]["kept"] == 2
    assert simplified["chapters"]["near_duplicates"] == 2  # though the copy quotes with 「」 and keeps 著


def test_stats_json_contents(tmp_path, tiny_tokenizer):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text(REF + "本章完\n", encoding="utf-8")
    (tmp_path / "in" / "b.txt").write_text(REF, encoding="utf-8")  # exact copies of a's chapters
    damaged = "第一章 残页\n纸页被水泡过，字迹模糊。\n"
    (tmp_path / "in" / "bad.txt").write_bytes(b"\xef\xbb\xbf" + damaged.encode() + b"\xff\xfe\n")
    (tmp_path / "in" / "empty.txt").write_bytes(b"")
    stats = ingest([tmp_path / "in"], tmp_path / "out", tiny_tokenizer, block_size=4)
    s = json.loads((tmp_path / "out" / "stats.json").read_text(encoding="utf-8"))
    assert s == json.loads(json.dumps(stats))
    assert s["inputs"] == 4 and s["files_skipped"] == 1 and s["documents"] == 2
    assert s["chapters"] == {"found": 5, "kept": 3, "empty_after_cleaning": 0,
                             "exact_duplicates": 2, "near_duplicates": 0}
    assert s["removed_lines"] == {"chapter_end": 1}
    assert s["blocks"] * 4 + s["tail_block_tokens"] == s["tokens"] and s["tokens_dropped_tail"] == 0
    assert s["characters"] == len(tx.normalise(REF) + damaged) and s["bytes"] == sum(f["bytes"] for f in s["files"])
    files = {Path(f["path"]).name: f for f in s["files"]}
    assert files["empty.txt"]["skipped"] == "empty file"
    assert files["bad.txt"]["bad_bytes"] == 2 and files["bad.txt"]["bad_spans"] == [
        {"offset": 3 + len(damaged.encode()), "bytes": "fffe"}]
    assert files["bad.txt"]["decided_by"] == "utf-8 BOM"
    assert files["b.txt"]["duplicate_of"] == {files["a.txt"]["path"]: 2}
    assert set(s["seconds"]) == {"total", "decode_clean", "dedup", "tokenise", "pack_write"}
    assert s["encodings"] == {"utf-8": 3} and s["t2s"] is False and len(s["fingerprint"]) == 32


def test_dedup_on_disk_ingest_equals_in_memory(tmp_path, tiny_tokenizer):
    write_mixed_folder(tmp_path / "in")
    mem = ingest([tmp_path / "in"], tmp_path / "mem", tiny_tokenizer, block_size=8)
    disk = ingest([tmp_path / "in"], tmp_path / "disk", tiny_tokenizer, block_size=8, dedup_on_disk=True)
    assert disk["fingerprint"] == mem["fingerprint"] and disk["chapters"] == mem["chapters"]
    assert disk["chapters"]["near_duplicates"] >= 1 and disk["chapters"]["exact_duplicates"] >= 1  # found on disk too
    assert [f.get("duplicate_of") for f in disk["files"]] == [f.get("duplicate_of") for f in mem["files"]]
    assert disk["dedup"]["on_disk"] and not mem["dedup"]["on_disk"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "in", "mem"]  # the scratch index is gone


def test_same_input_same_fingerprint(tmp_path, tiny_tokenizer):
    (tmp_path / "a.txt").write_text(REF * 3, encoding="utf-8")
    one = ingest([tmp_path / "a.txt"], tmp_path / "o1", tiny_tokenizer, block_size=8)
    two = ingest([tmp_path / "a.txt"], tmp_path / "o2", tiny_tokenizer, block_size=8)
    assert one["fingerprint"] == two["fingerprint"]


def test_fast_encode_path_matches_the_tokenizer_call(tiny_tokenizer):
    texts = ["第一章 雨夜\n他说：“你好。”\n", "Chapter 1\nHe said hi.\n\n", "𠮷"]
    packer = novels.Packer(tiny_tokenizer, 0, 8, writer=None, timers=novels.Timers())
    try:
        assert packer.encoder.cache is not None  # the word cache reproduces the tiny preset
        assert packer.encode_texts(texts) == tiny_tokenizer(texts, add_special_tokens=False)["input_ids"]
    finally:
        packer.pool.shutdown()


# Texts where a pre-tokenizer can go wrong: contractions (and 'ſ, which case-folds to 's), digits, runs of
# spaces before a word or a line break, CR/LF, full-width spaces, added tokens (the think tags are added but
# not special) inside and around words, emoji, 4-byte CJK, and characters newer than one regex engine's
# Unicode tables (U+0558, an Armenian letter of Unicode 16; U+3D000, CJK Extension J).
TRICKY = [
    "He's 'S THE man's 'll 'VE 12345 3.14  \t\n\n  x  \n", "ſ 'ſ 'K K ǅ ß", "a\r\n\r\n  b\r c\u3000\u3000d\xa0e",
    "<think>想一想</think>好<think>", "x</think>y<|endoftext|>", "emoji 😀🎉 和 𠮷𡈽 字", "\u0558a \U0003d000字 \u0558",
    "", " ", "\n", "  ", "第1章 「你好」——他说……！？", "\x1c\x1d\x85\u2028\u2029 \u200b\ufeff",
] + [REF, REF_TRAD, RARE]


def _rust_ids(backend, texts):
    return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]


def test_word_cache_gives_the_tokenizer_s_ids(tiny_tokenizer):
    backend = tiny_tokenizer.backend_tokenizer
    cache = novels.WordCacheEncoder.build(backend)
    assert cache is not None and cache.pattern == novels.QWEN2_SPLIT
    from tifaforge.models.presets import QWEN2_SPLIT

    assert novels.QWEN2_SPLIT == QWEN2_SPLIT
    for _ in range(2):  # cold, then every word cached
        assert [ids.tolist() for ids in cache.encode(TRICKY)] == _rust_ids(backend, TRICKY)
    assert {"\u0558", "\U0003d000"} <= set(cache.disputed_chars)  # sent to the Rust tokenizer whole
    cache.MAX_WORDS = 10  # emptied past the cap, same ids after
    assert [ids.tolist() for ids in cache.encode(TRICKY[::-1])] == _rust_ids(backend, TRICKY[::-1])
    assert len(cache.words) < 200


def test_word_cache_gpt2_layout_and_unsupported_layouts(tiny_tokenizer):
    from tokenizers import Tokenizer, normalizers, pre_tokenizers

    gpt2 = Tokenizer.from_str(tiny_tokenizer.backend_tokenizer.to_str())
    gpt2.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    cache = novels.WordCacheEncoder.build(gpt2)
    assert cache is not None and cache.pattern == novels.GPT2_SPLIT
    assert [ids.tolist() for ids in cache.encode(TRICKY)] == _rust_ids(gpt2, TRICKY)
    nfc = Tokenizer.from_str(tiny_tokenizer.backend_tokenizer.to_str())
    nfc.normalizer = normalizers.NFC()
    assert novels.WordCacheEncoder.build(nfc) is None
    encoder = novels.TextEncoder(nfc)  # falls back to the Rust batch call
    assert [ids.tolist() for ids in encoder.encode(TRICKY)] == _rust_ids(nfc, TRICKY)


def serial_ingest(folder: Path, tok, simplify: bool) -> list[int]:
    """The token stream the ingest must produce, the plain way: one chapter at a time, cleaned, checked
    for copies, fake special tokens cut, tokenised by the tokenizer's own call."""
    dedup, eot, specials = Deduper(0.8), novels.end_of_text(tok)[1], pack._special_pattern(tok)
    stream: list[int] = []
    for index, path in enumerate(novels.find_inputs([folder])):
        kept = False
        try:
            for chapter in file_chapters(path, None, FileReport(str(path), 0)):
                chapter, _ = tx.clean_chapter(chapter, simplify)
                if chapter.strip() and dedup.check(chapter, index) is None:
                    stream += tok(specials.sub("", chapter), add_special_tokens=False)["input_ids"]
                    kept = True
        except novels.SkipFile:
            pass
        if kept:
            stream.append(eot)
    return stream


@pytest.mark.parametrize("simplify", [False, True], ids=["plain", "t2s"])
def test_worker_processes_give_the_serial_ingest_s_stream(tmp_path, tiny_tokenizer, monkeypatch, simplify):
    """Chapters are cleaned, keyed and tokenised in worker processes and judged afterwards, in order: the
    same blocks for 1, 2 and 3 workers, and the same as the plain serial ingest, with exact and near
    copies, a chapter that cleaning empties, boilerplate, a fake separator and Traditional text."""
    import datasets

    monkeypatch.setattr(novels.Packer, "BATCH_CHARS", 300)  # many batches, so the processes start
    write_mixed_folder(tmp_path / "in")
    (tmp_path / "in" / "more.txt").write_text(REF * 5 + "".join(TRICKY), encoding="utf-8")
    (tmp_path / "in" / "sub" / "again.txt").write_text("本章完\n\n求月票！\n" + REF_TRAD + "\n第十章 尾\n"  # a preamble
                                                       "<|endoftext|>结束了。\n", encoding="utf-8")  # cleaning empties
    runs = {}
    for workers in (1, 2, 3):
        stats = ingest([tmp_path / "in"], tmp_path / f"out{workers}", tiny_tokenizer, block_size=8,
                       workers=workers, shard_blocks=50, to_simplified=simplify)
        stats.pop("seconds")
        rows = datasets.load_from_disk(str(tmp_path / f"out{workers}"))["input_ids"]
        runs[workers] = (json.dumps(stats, sort_keys=True), rows)
    assert runs[1] == runs[2] == runs[3]
    stats = json.loads(runs[1][0])
    c = stats["chapters"]
    assert c["exact_duplicates"] and c["near_duplicates"] and c["empty_after_cleaning"]
    assert stats["special_token_strings_removed"] >= 1
    rows = sum(runs[1][1], [])
    assert rows == serial_ingest(tmp_path / "in", tiny_tokenizer, simplify)[:len(rows)]
    text = tiny_tokenizer.decode(rows)
    assert "<think>" in text and "𠮷" in text
    with pytest.raises(TifaError, match="--workers 0"):
        ingest([tmp_path / "in"], tmp_path / "out0", tiny_tokenizer, workers=0)


# ---------------------------------------------------------------------------------------------
# EPUB


def write_epub(path: Path) -> None:
    opf = """<?xml version="1.0" encoding="utf-8"?>
<package xmlns="http://www.idpf.org/2007/opf" version="3.0"><manifest>
<item id="c2" href="text/b%20first.xhtml" media-type="application/xhtml+xml"/>
<item id="c1" href="text/z.xhtml" media-type="application/xhtml+xml"/>
</manifest><spine><itemref idref="c1"/><itemref idref="c2"/></spine></package>"""
    page = ('<?xml version="1.0" encoding="utf-8"?><html><head><title>标题不要</title><style>p{}</style></head>'
            "<body><h1>{h}</h1><p>　　{p}</p><p>甲&amp;乙&#x4E2D;<br/>下一行</p><script>x()</script></body></html>")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("mimetype", "application/epub+zip")
        z.writestr("META-INF/container.xml", '<?xml version="1.0"?><container xmlns="urn:oasis:names:tc:opendocument:'
                   'xmlns:container"><rootfiles><rootfile full-path="OEBPS/content.opf"/></rootfiles></container>')
        z.writestr("OEBPS/content.opf", opf)
        z.writestr("OEBPS/text/z.xhtml", page.replace("{h}", "第一章 开端").replace("{p}", "他来了。"))
        z.writestr("OEBPS/text/b first.xhtml", page.replace("{h}", "第二章 离开").replace("{p}", "他走了。"))


def test_epub_follows_the_spine_and_keeps_only_text(tmp_path):
    write_epub(tmp_path / "book.epub")
    got, report = chapters_of(tmp_path / "book.epub")
    page = "{h}\n{p}\n甲&乙中\n下一行\n"
    assert got == page.format(h="第一章 开端", p="他来了。") + "\n" + page.format(h="第二章 离开", p="他走了。")
    assert tx.split_chapters(got)[1].startswith("第二章 离开\n") and report.problems == []


# ---------------------------------------------------------------------------------------------
# Errors and the command


def test_bad_inputs_raise_tifa_errors_naming_the_path(tmp_path, tiny_tokenizer):
    (tmp_path / "empty").mkdir()
    (tmp_path / "fake.epub").write_bytes(b"not a zip")
    (tmp_path / "ok.txt").write_text(REF, encoding="utf-8")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    cases = [
        ([tmp_path / "missing.txt"], {}, "missing.txt: no such file"),
        ([tmp_path / "empty"], {}, "empty: no .txt or .epub files"),
        ([tmp_path / "fake.epub"], {}, "fake.epub: skipped: cannot read as EPUB"),
        ([tmp_path / "ok.txt"], {"encoding": "klingon"}, "--encoding klingon: unknown encoding"),
        ([tmp_path / "ok.txt"], {"block_size": 100000, "drop_tail": True}, "fewer than one block of 100000 and "
                                                                            "--drop-tail given"),
    ]
    for inputs, kw, message in cases:
        with pytest.raises(TifaError, match=message):
            ingest(inputs, tmp_path / "out", tiny_tokenizer, **kw)
        assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()
    with pytest.raises(TifaError, match="full: already exists"):
        ingest([tmp_path / "ok.txt"], tmp_path / "full", tiny_tokenizer)


def test_novels_command_with_parsed_arguments(tmp_path, tiny_model_dir, capsys):
    write_mixed_folder(tmp_path / "in")
    parser = argparse.ArgumentParser()
    novels.novels_arguments(parser)
    args = parser.parse_args([str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--tokenizer",
                              str(tiny_model_dir), "--block-size", "32", "--dedup-threshold", "0.9", "--t2s",
                              "--no-progress", "--workers", "2"])
    assert novels.novels_command(args) == 0
    out = capsys.readouterr().out
    assert "blocks of 32 tokens" in out and "details:" in out
    stats = json.loads((tmp_path / "out" / "stats.json").read_text(encoding="utf-8"))
    assert stats["t2s"] is True and stats["dedup"]["threshold"] == 0.9 and stats["tokenizer"] == str(tiny_model_dir)
