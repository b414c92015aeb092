"""Training data for the stages: the CPT packed dataset (checked against the tokenizer) and SFT examples.

    tifa train cpt configs/tiny-cpt.yaml     # cpt.data: a `tifa data novels` folder, or raw novels

Both come out as `input_ids` + `labels` rows that TRL's SFTTrainer takes as they are
(`skip_prepare_dataset`): nothing is re-tokenised or copied. The CPT dataset stays memory-mapped
(TRL's own preparation would write a second copy, with labels, next to the user's shards); its labels
are its input ids. SFT labels are -100 except on the final assistant turn (think block, answer, end
tag), as the chat template's training form marks it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from tifaforge.errors import TifaError

log = logging.getLogger(__name__)

ROUND_TRIP_BLOCKS = 4
ROUND_TRIP_TOKENS = 256
ROUND_TRIP_MIN = 0.6  # same tokenizer: ~0.95-1.0; another one: well under 0.3


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary (token -> id, added tokens included): equal iff ids mean the same."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------
# CPT


def is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def cpt_dataset(spec: str, tokenizer, max_length: int, ingest_dir: Path, dedup_threshold: float = 0.8,
                pack: str = "stream"):
    """The packed dataset at `spec` (or raw novels there, ingested once into `ingest_dir`), checked."""
    from datasets import load_from_disk

    path = Path(spec)
    if not path.exists():
        raise TifaError(f"cpt.data: {path}: no such dataset folder or novels file/folder")
    if not is_saved_dataset(path):
        path = _ingest(path, tokenizer, max_length, ingest_dir, dedup_threshold, pack)
    if not _state(path).get("_data_files"):  # datasets cannot even open an empty saved dataset
        raise TifaError(f"{path}: the dataset is empty (0 blocks)")
    try:
        ds = load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - surfaced as one line naming the folder
        raise TifaError(f"{path}: cannot open the dataset: {e}") from None
    check_cpt_dataset(ds, path, tokenizer, max_length)
    return ds.select_columns(["input_ids"])


def _ingest(path: Path, tokenizer, block_size: int, out: Path, threshold: float, pack: str = "stream") -> Path:
    """Raw novels -> `out` (once: ingest renames its output into place only when complete)."""
    from tifaforge.data.novels import ingest_novels

    if is_saved_dataset(out):
        log.info("using the novels already ingested in %s", out)
        return out
    if os.environ.get("RANK", "0") != "0":  # rank 0 ingests; the others wait for its atomic rename
        return _await_dataset(out)
    log.info("ingesting %s into %s (%s of %d tokens)", path, out,
             "rows of whole chapters up to" if pack == "chapters" else "blocks", block_size)
    ingest_novels([path], out, tokenizer, block_size=block_size, near_dup_threshold=threshold, pack=pack)
    return out


def _await_dataset(out: Path, seconds: float = 3600) -> Path:
    deadline = time.monotonic() + seconds
    while not is_saved_dataset(out):
        if time.monotonic() > deadline:
            raise TifaError(f"{out}: rank 0 did not finish ingesting the novels within {seconds:.0f} s")
        time.sleep(1)
    return out


def check_cpt_dataset(ds, path: Path, tokenizer, max_length: int) -> None:
    """Empty, wrong columns, too long, or built with another tokenizer -> one clear error."""
    import pyarrow.compute as pc

    if "input_ids" not in ds.column_names:
        raise TifaError(f"{path}: no 'input_ids' column (columns: {', '.join(ds.column_names)}); "
                        "build CPT data with `tifa data novels`")
    if len(ds) == 0:
        raise TifaError(f"{path}: the dataset is empty (0 blocks)")
    col = ds.data.column("input_ids")
    longest = pc.max(pc.list_value_length(col)).as_py()
    if longest > max_length:
        raise TifaError(f"{path}: blocks of {longest} tokens are longer than cpt.max_length={max_length}: "
                        f"set cpt.max_length: {longest}, or rebuild with `tifa data novels --block-size {max_length}`")
    _check_tokenizer(ds, path, tokenizer, pc.max(pc.list_flatten(col)).as_py())


def _check_tokenizer(ds, path: Path, tokenizer, max_id: int) -> None:
    another = "the dataset was built with another tokenizer; rebuild it with `tifa data novels ... --tokenizer MODEL`"
    if max_id >= len(tokenizer):
        raise TifaError(f"{path}: token id {max_id} is outside this tokenizer's {len(tokenizer)} ids: {another}")
    stats = _stats(path)
    if "tokenizer_sha256" in stats and stats["tokenizer_sha256"] != tokenizer_fingerprint(tokenizer):
        raise TifaError(f"{path}: stats.json's tokenizer fingerprint differs from this model's: {another}")
    sep = stats.get("separator") or {}
    if sep and tokenizer.convert_tokens_to_ids(sep.get("token")) != sep.get("id"):
        raise TifaError(f"{path}: the document separator {sep.get('token')!r} was id {sep.get('id')}, "
                        f"this tokenizer has it as {tokenizer.convert_tokens_to_ids(sep.get('token'))}: {another}")
    agreement = round_trip_agreement(ds, tokenizer)
    if agreement < ROUND_TRIP_MIN:
        raise TifaError(f"{path}: decoding and re-encoding blocks with this tokenizer gives back only "
                        f"{agreement:.0%} of the ids: {another}")


def _stats(path: Path) -> dict[str, Any]:
    return _read_json(path / "stats.json")


def _state(path: Path) -> dict[str, Any]:
    return _read_json(path / "state.json")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def round_trip_agreement(ds, tokenizer) -> float:
    """Mean similarity of ids vs encode(decode(ids)) over a few blocks: ids from another tokenizer
    decode to different text that re-encodes to different ids."""
    import difflib

    n = len(ds)
    picks = sorted({i * n // ROUND_TRIP_BLOCKS for i in range(ROUND_TRIP_BLOCKS)})
    scores = []
    for i in picks:
        ids = list(ds[i]["input_ids"][:ROUND_TRIP_TOKENS])
        again = tokenizer(tokenizer.decode(ids), add_special_tokens=False).input_ids
        scores.append(difflib.SequenceMatcher(None, ids, again, autojunk=False).ratio())
    return sum(scores) / len(scores)


def cpt_sample_prompts(ds, tokenizer, count: int, tokens: int = 32) -> list[str]:
    """Openings of blocks spread through the dataset, as text the model continues."""
    n = len(ds)
    texts = [tokenizer.decode(ds[i * n // count]["input_ids"][:tokens]) for i in range(min(count, n))]
    return [t.strip("\ufffd") or t for t in texts]  # a block may start or end inside a character


# ---------------------------------------------------------------------------------------------
# Length curriculum (CPT and SFT): shorter sequences first, in a fixed order the trainer keeps


def check_curriculum(lengths: list[int], max_length: int, name: str) -> None:
    """`lengths` must rise strictly and stay under max_length (the last phase trains at max_length)."""
    for a, b in zip(lengths, lengths[1:]):
        if b <= a:
            raise TifaError(f"{name}: {lengths}: the lengths must rise ({a} then {b})")
    if lengths and not 8 <= lengths[0]:
        raise TifaError(f"{name}: {lengths}: the shortest phase must be at least 8 tokens")
    if lengths and lengths[-1] >= max_length:
        raise TifaError(f"{name}: {lengths}: every phase must be shorter than max_length={max_length} "
                        "(the last phase trains at max_length)")


def cpt_curriculum(ds, lengths: list[int], max_length: int, seed: int, cache_dir: Path):
    """The CPT rows reordered for a length curriculum: the rows (shuffled with `seed`) are split into
    len(lengths) + 1 equal shares of tokens; the rows of share i are cut into pieces of lengths[i]
    tokens (the last share stays whole), and each share's pieces are shuffled. The trainer then reads
    them in this order (`train_sampling_strategy="sequential"`), so early steps are short sequences.
    Returns (dataset, phases) with each phase's length, rows and tokens. Written once, by the first
    process (the others read the same cache file)."""
    import numpy as np
    import pyarrow.compute as pc
    from accelerate import PartialState

    if not lengths:
        return ds, []
    sizes = np.asarray(pc.list_value_length(ds.data.column("input_ids")), dtype=np.int64)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(ds))
    ordered = sizes[perm]  # row sizes in the shuffled order the phases are cut from
    cum = np.cumsum(ordered)
    shares = len(lengths) + 1
    phase_of = np.minimum((cum - 1) * shares // max(int(cum[-1]), 1), shares - 1)  # monotonic in the order
    phase_len = np.array([*lengths, max_length], dtype=np.int64)
    pieces = -(-ordered // phase_len[phase_of])  # rows each one becomes
    cut_len = phase_len[phase_of]

    def split(batch, indices):
        out = []
        for ids, i in zip(batch["input_ids"], indices):
            n = int(cut_len[i])
            out += [ids[a:a + n] for a in range(0, len(ids), n)]
        return {"input_ids": out}

    key = hashlib.sha256(json.dumps([ds._fingerprint, lengths, max_length, seed]).encode()).hexdigest()[:16]
    cache_dir.mkdir(parents=True, exist_ok=True)
    with PartialState().local_main_process_first():
        cut = ds.select(perm).map(split, batched=True, with_indices=True, new_fingerprint=key,
                                  cache_file_name=str(cache_dir / f"curriculum-{key}.arrow"),
                                  desc="length curriculum")
    order, phases, start = [], [], 0
    for p in range(shares):
        rows = int(pieces[phase_of == p].sum())
        order.append(start + rng.permutation(rows))
        phases.append({"length": int(phase_len[p]), "rows": rows, "tokens": int(ordered[phase_of == p].sum())})
        start += rows
    return cut.select(np.concatenate(order)), phases


def sft_curriculum(ds, lengths: list[int], max_length: int, seed: int):
    """The SFT examples reordered for a length curriculum: those up to lengths[0] tokens first, then
    up to lengths[1], ..., then the rest; shuffled within each phase with `seed`."""
    import numpy as np

    if not lengths:
        return ds, []
    sizes = np.array([len(x) for x in ds["input_ids"]])
    bounds = np.array([*lengths, max_length])
    phase_of = np.searchsorted(bounds, sizes)  # the first phase whose length holds the example
    rng = np.random.default_rng(seed)
    order, phases = [], []
    for p, n in enumerate(bounds):
        rows = np.flatnonzero(phase_of == p)
        order.append(rows[rng.permutation(len(rows))])
        phases.append({"length": int(n), "rows": int(len(rows)), "tokens": int(sizes[rows].sum())})
    return ds.select(np.concatenate(order)), phases


def log_curriculum(phases: list[dict], stage: str, out: Path) -> None:
    from tifaforge.utils import atomic_write_json

    if phases:
        atomic_write_json(out / "curriculum.json", {"phases": phases})
        log.info("%s length curriculum: %s", stage, ", then ".join(
            f"{p['rows']} rows up to {p['length']} tokens ({p['tokens']:,} tokens)" for p in phases))


# ---------------------------------------------------------------------------------------------
# SFT


def sft_examples(path: str | Path, tokenizer, sc) -> tuple[Any, list[list[dict]]]:
    """(dataset of input_ids + labels, the chats) from an SFT JSONL; see `SFTConfig` for the options."""
    from datasets import Dataset
    from tqdm import tqdm

    from tifaforge.chat.template import check_template, training_tokens
    from tifaforge.data.conversations import check_file, expand_turns, to_chat

    problems = check_template(tokenizer)
    if problems:
        raise TifaError(f"chat template of the model: {problems[0]}")
    records, _ = check_file(path, "sft")
    examples = [e for r in records for e in (expand_turns(r) if sc.per_turn else expand_turns(r)[-1:])]
    if not examples:
        raise TifaError(f"{path}: no training examples (no assistant turn answering a user turn)")
    rows: dict[str, list] = {"input_ids": [], "labels": []}
    chats, dropped, trimmed = [], [], 0
    for ex in tqdm(examples, desc="sft examples", unit="ex", disable=len(examples) < 500):
        chat = to_chat(ex, sc.user_name)
        ids, mask = training_tokens(chat, tokenizer)
        if len(ids) > sc.max_length and sc.too_long == "trim":
            chat, ids, mask = _trim_history(chat, tokenizer, sc.max_length)
            trimmed += len(ids) <= sc.max_length
        if len(ids) > sc.max_length:
            if sc.too_long == "error":
                raise TifaError(f"{path}: line {ex.line}: {len(ids)} tokens, longer than sft.max_length={sc.max_length}")
            dropped.append(ex.line)
            continue
        rows["input_ids"].append(ids)
        rows["labels"].append([t if m else -100 for t, m in zip(ids, mask)])
        chats.append(chat)
    _report_dropped(path, dropped, len(examples), sc.max_length)
    if trimmed:
        log.info("%s: %d of %d examples longer than sft.max_length=%d lost their oldest turns to fit",
                 path, trimmed, len(examples), sc.max_length)
    return Dataset.from_dict(rows), chats


def _trim_history(chat: list[dict], tokenizer, max_length: int):
    """Drop the oldest turns after the system prompt, a user turn and what answers it at a time, until
    the example fits (the final exchange always stays): what a long session looks like to the model
    when `tifa chat` or the server trims it to the context."""
    from tifaforge.chat.template import training_tokens

    head = 1 if chat and chat[0]["role"] == "system" else 0
    ids, mask = training_tokens(chat, tokenizer)
    while len(ids) > max_length:
        rest = chat[head + 1:]
        nxt = next((i for i, m in enumerate(rest) if m["role"] == "user"), None)
        if nxt is None or head + 1 + nxt >= len(chat) - 1:  # only the final exchange is left
            break
        chat = chat[:head] + rest[nxt:]
        ids, mask = training_tokens(chat, tokenizer)
    return chat, ids, mask


def _report_dropped(path, dropped: list[int], total: int, max_length: int) -> None:
    if not dropped:
        return
    if len(dropped) == total:
        raise TifaError(f"{path}: all {total} examples are longer than sft.max_length={max_length}")
    lines = ", ".join(map(str, sorted(set(dropped))[:10]))
    log.warning("%s: %d of %d examples longer than sft.max_length=%d were dropped (lines %s%s)",
                path, len(dropped), total, max_length, lines, ", ..." if len(set(dropped)) > 10 else "")


def sft_sample_prompts(chats: list[list[dict]], tokenizer, count: int) -> list[str]:
    """The contexts of the first few examples, rendered up to the assistant tag."""
    from tifaforge.chat.template import render

    return [render(c[:-1], tokenizer, add_generation_prompt=True) for c in chats[:count]]
