"""Small shared helpers: atomic writes, bounded reads of what users give, JSONL with file:line errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from itertools import accumulate
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


# --- bounded reads ----------------------------------------------------------------------------
# Every file a user names goes through these: a FIFO would block the open until some writer comes,
# /dev/zero never ends, a 5 GB "config" would be read whole, and JSON nested 10,000 deep overflows
# Python's parser (RecursionError). Each is refused up front, in one line naming the file.

MAX_CONFIG_BYTES = 4 << 20  # a YAML config, a model's config.json, a chat session
MAX_LINE_BYTES = 64 << 20  # one JSONL line (a conversation)
MAX_JSON_DEPTH = 100  # real data nests under 10 (a card's lorebook, a tool call's arguments)

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def printable_path(path: str | Path) -> str:
    """A path as text that can be written anywhere: bytes of a non-UTF-8 file name (kept by Python as
    lone surrogates, which no JSON or terminal encoder accepts) shown as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def unencodable_path(value, path: tuple = ()) -> tuple | None:
    """The key path of the first string (or key) in JSON data that UTF-8 cannot encode (a lone
    surrogate: JSON's escaped pairs decode to one code point, so what is left is lone), else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        found = unencodable_path(k, (*path, k)) if isinstance(k, str) else None
        if found is None:
            found = unencodable_path(v, (*path, k))
        if found is not None:
            return found
    return None


def file_kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def regular_file(path: str | Path, what: str = "file") -> os.stat_result:
    """The file's stat, or a one-line error when it is missing or is not a regular file."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise TifaError(f"{path}: no such {what}" + (" (a dangling symlink)" if path.is_symlink() else "")) from None
    except OSError as e:
        raise TifaError(f"{path}: cannot read: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise TifaError(f"{path}: is {file_kind(st.st_mode)}, not a regular file; give the {what} as a file")
    return st


def open_regular(path: str | Path, what: str = "file"):
    """Open a regular file for binary reading (see regular_file)."""
    regular_file(path, what)
    try:
        return Path(path).open("rb")
    except OSError as e:
        raise TifaError(f"{path}: cannot read: {e.strerror or e}") from None


def read_bounded(path: str | Path, cap: int, what: str = "file") -> bytes:
    """The whole file, refused when it is over `cap` bytes: by its size before reading, and by what
    is read (a file that grows meanwhile, or one whose size the kernel reports as 0, stops at the cap)."""
    st = regular_file(path, what)
    if st.st_size > cap:
        raise TifaError(f"{path}: {st.st_size:,} bytes, over the {cap:,}-byte cap for a {what}")
    with open_regular(path, what) as f:
        data = f.read(cap + 1)
    if len(data) > cap:
        raise TifaError(f"{path}: over the {cap:,}-byte cap for a {what}")
    return data


def read_text_bounded(path: str | Path, cap: int, what: str = "file") -> str:
    """read_bounded, decoded as UTF-8 (a BOM is allowed); other bytes are an error naming the line."""
    data = read_bounded(path, cap, what)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise TifaError(f"{path}: line {line}: not UTF-8 text (byte {e.start}); save the {what} as UTF-8") from None


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_DEPTH_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def json_depth(text: str) -> int:
    """How deep brackets nest in `text` outside strings: an upper bound, exact once it passes MAX_JSON_DEPTH."""
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return min(text.count("[") + text.count("{"), MAX_JSON_DEPTH)  # cannot nest deeper than it has brackets
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    return max(accumulate(map(_DEPTH_STEP.__getitem__, brackets)), default=0)


def loads_json(text: str, where: str) -> object:
    """json.loads with the depth capped before parsing; errors name `where` (file[:line]) and column."""
    if json_depth(text) > MAX_JSON_DEPTH:
        raise TifaError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise TifaError(f"{where}: invalid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None


def read_json_file(path: str | Path, cap: int = MAX_CONFIG_BYTES, what: str = "JSON file") -> object:
    return loads_json(read_text_bounded(path, cap, what), str(path))


def read_jsonl(path: str | Path, cap: int = MAX_LINE_BYTES) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; a bad line is an error naming file:line.
    Lines are read at most `cap` bytes at a time, so a giant line is refused, not read whole."""
    path = Path(path)
    with open_regular(path, "JSONL file") as f:
        n = 0
        while raw := f.readline(cap + 1):
            n += 1
            if len(raw) > cap and not raw.endswith(b"\n"):
                raise TifaError(f"{path}: line {n}: over the {cap:,}-byte cap for one line")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise TifaError(f"{path}: line {n}: not UTF-8 (byte {e.start} of the line)") from None
            if not line.strip():
                continue
            obj = loads_json(line, f"{path}: line {n}")
            if not isinstance(obj, dict):
                raise TifaError(f"{path}: line {n}: expected a JSON object, got {type(obj).__name__}")
            yield n, obj
