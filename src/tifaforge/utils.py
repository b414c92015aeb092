"""Small shared helpers: atomic writes, JSONL reading with file:line errors."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tifaforge.errors import TifaError


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename: readers never see a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes owner-only files; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def umask() -> int:
    """The process's file-creation mask (read by setting and restoring it: there is no getter)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_path(p: str | Path) -> Path:
    """A config's data path: as given when absolute or present, else under the checkout's root (the
    bundled demo data's defaults, e.g. `data/demo/prompts.jsonl`, work from any folder)."""
    path = Path(p)
    return path if path.is_absolute() or path.exists() else REPO_ROOT / path


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


@contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Fill a temp folder beside `out`, then swap it into place: a reader never sees half a folder,
    and a failure leaves the old `out` untouched. Files are made readable as the umask allows
    (mkdtemp and some writers create owner-only files; model folders are meant to be shared)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        yield tmp
        tmp.chmod(0o777 & ~umask())
        for f in tmp.rglob("*"):
            f.chmod((0o777 if f.is_dir() else 0o666) & ~umask())
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; a bad line is an error naming file:line."""
    path = Path(path)
    try:
        f = path.open(encoding="utf-8")
    except OSError as e:
        raise TifaError(f"{path}: cannot read: {e.strerror or e}") from None
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TifaError(f"{path}: line {n}: invalid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(obj, dict):
                raise TifaError(f"{path}: line {n}: expected a JSON object, got {type(obj).__name__}")
            yield n, obj
