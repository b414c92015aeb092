"""Checkpoints that can be trusted: complete-marker last, keep-last-N after, resume from the latest complete.

    tifa train cpt CONFIG --resume      # resumes from OUT/checkpoints/<latest complete>

transformers' Trainer writes `checkpoint-N/` in place (weights, optimizer, scheduler, RNG, trainer
state) and, with `save_total_limit`, deletes old ones *before* the new one is known good. So the
stages run it with no limit and `CheckpointCallback` owns the commit protocol, as PyTorch DCP's
`.metadata` and open-instruct's `COMPLETED` do:
1. after every rank has written its files (barrier), fsync them and the folder;
2. write `complete.json` (step, every file's size and SHA-256) atomically: the checkpoint now exists;
3. only then delete complete checkpoints beyond `keep_last` and torn ones older than the new one.
A folder without a valid marker, or whose files no longer have the recorded sizes, is torn; one
whose files changed content at the same size (a flipped byte, a disk error) is corrupt. Resume
checks both, skips such a folder with a message saying which file and why, and never loads it;
it falls back to the newest intact checkpoint. Rotation checks sizes only (hashing every kept
checkpoint at every save would cost a read of all of them).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from tifaforge.train import distributed
from tifaforge.utils import atomic_write_json, umask

log = logging.getLogger(__name__)

MARKER = "complete.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dirs(root: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `checkpoint-N` under root, oldest first, complete or not."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(found)


def torn_reason(folder: Path, verify: bool = False) -> str | None:
    """Why `folder` is not a complete, intact checkpoint, or None when it is. `verify`: also compare
    every file's SHA-256 with the one recorded when it was written (a read of the whole checkpoint)."""
    import json

    marker = folder / MARKER
    if not marker.exists():
        return "no completion marker (the save was interrupted)"
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
        files, hashes = record["files"], record.get("sha256", {})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"unreadable {MARKER}"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
        if verify and name in hashes and sha256(path) != hashes[name]:
            return f"{name} is corrupt: its content changed since it was written (SHA-256 differs, same size)"
    return None


def sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def latest_complete(root: str | Path, announce: bool = True) -> Path | None:
    """The newest complete, intact checkpoint under root (content verified); newer torn or corrupt
    ones are skipped with a message naming the file and why."""
    for step, folder in reversed(checkpoint_dirs(root)):
        reason = torn_reason(folder, verify=True)
        if reason is None:
            return folder
        if announce:
            log.warning("skipping torn checkpoint %s: %s", folder, reason)
    return None


def mark_complete(folder: Path, step: int) -> None:
    """fsync every file, then write the marker (sizes and SHA-256s): the checkpoint is complete from this
    rename on."""
    files, hashes = {}, {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER):
        path.chmod(0o666 & ~umask())  # safetensors writes owner-only files; run outputs are shared
        _fsync(path)
        name = path.relative_to(folder).as_posix()
        files[name], hashes[name] = path.stat().st_size, sha256(path)
    atomic_write_json(folder / MARKER, {"step": step, "files": files, "sha256": hashes})
    _fsync(folder)


def rotate(root: Path, keep_last: int) -> list[Path]:
    """Delete complete checkpoints beyond the newest `keep_last`, and torn ones older than the newest
    complete one (a torn folder newer than it may be a save in progress on another rank)."""
    dirs = checkpoint_dirs(root)
    complete = [(s, p) for s, p in dirs if torn_reason(p) is None]
    if not complete:
        return []
    newest = complete[-1][0]
    doomed = [p for _, p in complete[:-keep_last]] + [p for s, p in dirs if s < newest and (s, p) not in complete]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def discard_after(root: Path, step: int) -> list[Path]:
    """Remove checkpoints newer than the resume point (torn by definition): the resumed run writes
    those steps again, and stale files from the killed run must not mix in."""
    doomed = [p for s, p in checkpoint_dirs(root) if s > step]
    for p in doomed:
        log.warning("removing %s (newer than the resume point, not complete)", p)
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_callback(root: Path, keep_last: int):
    """A TrainerCallback running the commit protocol after each Trainer save (built lazily: transformers)."""
    from transformers import TrainerCallback

    class CheckpointCallback(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            distributed.barrier()  # every rank's files (per-rank RNG state) are written before the marker
            if state.is_world_process_zero:
                folder = root / f"checkpoint-{state.global_step}"
                mark_complete(folder, state.global_step)
                for p in rotate(root, keep_last):
                    log.info("deleted old checkpoint %s", p.name)
            distributed.barrier()

    return CheckpointCallback()
