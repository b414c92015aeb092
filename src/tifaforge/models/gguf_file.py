"""A GGUF file's header, metadata and tensor table, read and validated before anything trusts them.

    python -c "from tifaforge.models.gguf_file import read_gguf; print(read_gguf('tiny-q8_0.gguf').metadata['general.architecture'])"

Why here: the llama.cpp engine backend reads a file before llama.cpp does (its context length and chat
template), and so do the export and its check; models/ lies below engine/ and export/, and the engine
must not import export/. `open_llama` and `default_threads` live here for the same reason.

Why a subclass of `gguf.GGUFReader` with checks rather than the reader alone: GGUFReader memory-maps
the file and believes every length in it. A read past the end comes back short instead of failing
(a truncated string is silently accepted), a claimed array length is looped over element by element,
nested arrays recurse without a limit, big-endian files are byte-swapped (llama.cpp here reads
little-endian only), and tensor offsets are not checked for alignment, overlap or the end of the file.
So every read is checked against the file's size, every count against the bytes left for it, and the
tensor table before GGUFReader builds its views: a hostile file fails with one line naming the file
and the fault, never a traceback from inside a library. One step is not GGUFReader's: it makes a numpy
view per array element, 300 bytes of memory for a one-byte number, so arrays are read in one piece
here (`_CheckedReader._get_field_parts`), which keeps memory in proportion to the file's bytes.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from tifaforge.errors import TifaError

Q = gguf.GGMLQuantizationType
V = gguf.GGUFValueType
_HEADER = 24  # magic, version, tensor count, metadata count
_MIN_KV = 13  # key length (8), value type (4), the smallest value (1)
_MIN_TENSOR_INFO = 24  # name length (8), dimension count (4), type (4), offset (8)
_MAX_DIMS = 4  # GGML_MAX_DIMS
_SCALAR_DTYPES = gguf.GGUFReader.gguf_scalar_to_np
_STRING, _ARRAY = int(V.STRING), int(V.ARRAY)
_MIN_SIZE = {**{int(t): np.dtype(d).itemsize for t, d in _SCALAR_DTYPES.items()}, _STRING: 8, _ARRAY: 12}


@dataclass
class TensorEntry:
    name: str
    shape: tuple[int, ...]  # numpy order (rows, …, row length): GGUF's dimensions reversed
    type: Q
    offset: int  # absolute, in the file
    nbytes: int


@dataclass
class GGUFFile:
    path: Path
    version: int
    size: int
    metadata: dict[str, Any] = field(default_factory=dict)
    tensors: list[TensorEntry] = field(default_factory=list)

    @property
    def architecture(self) -> str:
        return self.metadata.get("general.architecture", "?")


def read_gguf(path: str | Path) -> GGUFFile:
    """Header, metadata and tensor table of a GGUF file, validated (the tensor data is not read)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(_HEADER)
        if size < _HEADER:
            _fail(path, f"{size} bytes is shorter than a GGUF header")
        if head[:4] != b"GGUF":
            _fail(path, "it does not start with the GGUF magic bytes")
        version = int.from_bytes(head[4:8], "little")
        if version not in (2, 3):
            _fail(path, f"version {version} (this reader knows 2 and 3)")
        reader = _CheckedReader(path)
    except OSError as e:
        raise TifaError(f"{path}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        _fail(path, f"a name or string is not UTF-8 ({e.reason})")
    except (ValueError, KeyError) as e:  # what GGUFReader itself refuses: duplicates, value and tensor types
        _fail(path, str(e.args[0] if e.args else e))
    info = GGUFFile(path, version, reader.size)
    try:
        for key, f in reader.fields.items():
            if not key.startswith("GGUF."):  # GGUFReader's own entries for the header
                info.metadata[key] = _value(f.parts, 3, int(f.types[0]))[0]  # parts 0-2: key length, key, type
    except UnicodeDecodeError as e:
        _fail(path, f"a metadata string is not UTF-8 ({e.reason})")
    info.tensors = [TensorEntry(t.name, tuple(int(d) for d in reversed(t.shape)), t.tensor_type,
                                int(t.data_offset), int(t.n_bytes)) for t in reader.tensors]
    return info


def _fail(path: Path, msg: str):
    raise TifaError(f"{path}: not a valid GGUF file: {msg}") from None


def _value(parts: list, i: int, vtype: int) -> tuple[Any, int]:
    """The value whose parts start at parts[i], and the index after them. An array's parts are its
    element type, its length, then its elements in one piece (see `_CheckedReader._get_field_parts`),
    or for an array of arrays, each inner array's parts in turn."""
    if vtype == _STRING:
        return bytes(parts[i + 1]).decode("utf-8"), i + 2  # length, bytes
    if vtype != _ARRAY:
        return parts[i].tolist()[0], i + 1
    etype, n = int(parts[i][0]), int(parts[i + 1][0])
    if etype != _ARRAY:
        items = parts[i + 2]  # strings: already decoded; numbers: a copy, so the file's map can close
        return (items.tolist() if etype == _STRING else np.array(items)), i + 3
    out, i = [], i + 2
    for _ in range(n):
        v, i = _value(parts, i, _ARRAY)
        out.append(v)
    return out, i


class _CheckedReader(gguf.GGUFReader):
    """GGUFReader with each read, count and tensor placement checked first (see the module docstring).
    The hooks are GGUFReader's own steps; each checks, then hands over to it, except that arrays of
    numbers or strings are read in one piece: their fields are read with `_value`, not `contents()`."""

    def __init__(self, path: Path):
        self.path, self._depth = path, 0
        super().__init__(path)

    @property
    def size(self) -> int:
        return self.data.size  # what is really mapped

    def fail(self, msg: str):
        _fail(self.path, msg)

    def _get(self, offset, dtype, count=1, override_order=None):
        n = np.dtype(dtype).itemsize * int(count)
        if offset + n > self.size:
            self.fail(f"{n} bytes at byte {offset} run past the end of the file ({self.size} bytes)")
        return super()._get(offset, dtype, count, override_order)

    def _count(self, n: int, min_size: int, offset: int, what: str) -> None:
        """A claimed count is only believed if that many of the smallest element could fit."""
        if n * min_size > self.size - offset:
            self.fail(f"{what} claims {n} entries at byte {offset}; they cannot fit in the "
                      f"{self.size - offset} bytes left")

    def _build_fields(self, offs, count):
        self._count(int(count), _MIN_KV, offs, "the metadata table")
        return super()._build_fields(offs, count)

    def _build_tensor_info(self, offs, count):
        self._count(int(count), _MIN_TENSOR_INFO, offs, "the tensor table")
        return super()._build_tensor_info(offs, count)

    def _get_field_parts(self, orig_offs, raw_type):
        """Arrays of numbers or strings are read here in one piece. GGUFReader makes a numpy view of
        every element (two for a string): a valid 1 MiB file holding a million bytes took 314 MiB, and
        a 150k-token vocabulary 2 s and 230 MiB, against 1 MiB, and 0.2 s and 20 MiB, in one piece
        (test_a_long_array_costs_memory_in_proportion_to_its_bytes)."""
        raw_type = int(raw_type)
        if raw_type != _ARRAY:
            if raw_type not in _MIN_SIZE:
                self.fail(f"the metadata value at byte {orig_offs} has unknown value type {raw_type}")
            return super()._get_field_parts(orig_offs, raw_type)
        head = [self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)]
        etype, n = int(head[0][0]), int(head[1][0])
        if etype not in _MIN_SIZE:
            self.fail(f"the array at byte {orig_offs} has unknown element type {etype}")
        if self._depth >= 2:  # an array of arrays is the deepest GGUF writers make
            self.fail(f"the array at byte {orig_offs} is nested more than two deep")
        self._count(n, _MIN_SIZE[etype], orig_offs + 12, f"the array at byte {orig_offs}")
        types = [V.ARRAY, V(etype)]
        if etype == _STRING:
            items, end = self._strings(orig_offs, n)
            return end - orig_offs, [*head, items], [2], types
        if etype != _ARRAY:
            items = self._get(orig_offs + 12, _SCALAR_DTYPES[V(etype)], n)
            return 12 + items.nbytes, [*head, items], [2], types
        self._depth += 1
        try:
            return super()._get_field_parts(orig_offs, raw_type)
        finally:
            self._depth -= 1

    def _strings(self, array_offs: int, n: int) -> tuple[np.ndarray, int]:
        """The n strings (each a uint64 length, then UTF-8) of the array at `array_offs`, decoded, and
        the offset after them."""
        out, data, size, offs = np.empty(n, dtype=object), memoryview(self.data), self.size, array_offs + 12
        for k in range(n):
            length = int.from_bytes(data[offs:offs + 8], "little") if offs + 8 <= size else -1
            if not 0 <= length <= size - offs - 8:
                self.fail(f"string {k} of the array at byte {array_offs} runs past the end of the file ({size} bytes)")
            out[k] = str(data[offs + 8:offs + 8 + length], "utf-8")
            offs += 8 + length
        return out, offs

    def _get_tensor_info_field(self, orig_offs):
        name_len = int(self._get(orig_offs, np.uint64)[0])
        n_dims = int(self._get(orig_offs + 8 + name_len, np.uint32)[0])
        if not 1 <= n_dims <= _MAX_DIMS:  # before GGUFReader reads that many dimensions
            name = bytes(self.data[orig_offs + 8:orig_offs + 8 + name_len]).decode("utf-8", "replace")
            self.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {_MAX_DIMS} allowed)")
        return super()._get_tensor_info_field(orig_offs)

    def _build_tensors(self, start_offs, fields):
        """Every tensor must lie aligned, whole and without overlap inside the data section."""
        align, end_prev, seen = int(self.alignment), start_offs, set()
        for f in sorted(fields, key=lambda f: int(f.parts[5][0])):
            name, dims, raw_type, offset = f.name, [int(d) for d in f.parts[3]], int(f.parts[4][0]), int(f.parts[5][0])
            if name in seen:
                self.fail(f"tensor {name!r} appears twice")
            if raw_type not in Q._value2member_map_ or Q(raw_type) not in gguf.GGML_QUANT_SIZES:
                self.fail(f"tensor {name!r} has unknown type {raw_type}")
            nbytes = _tensor_nbytes(self, name, dims, Q(raw_type))
            start = start_offs + offset
            if offset % align or start < end_prev or start + nbytes > self.size:
                self.fail(f"tensor {name!r} ({nbytes} bytes at offset {offset}) is misaligned, overlaps another "
                          f"or runs past the end of the file ({self.size} bytes)")
            seen.add(name)
            end_prev = start + nbytes
        super()._build_tensors(start_offs, fields)


def _tensor_nbytes(r: _CheckedReader, name: str, dims: list[int], qtype: Q) -> int:
    """In Python integers: numpy's product of a hostile shape would wrap around."""
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if 0 in dims or dims[0] % block:
        r.fail(f"tensor {name!r} has shape {dims}, whose rows a {qtype.name} block ({block}) does not divide")
    return math.prod(dims[1:]) * (dims[0] // block) * type_size


# ---------------------------------------------------------------------------------------------
# llama.cpp on a file


def default_threads(path: str | Path) -> int:
    """One thread for small files: a tiny model's per-token work is too small to split, and on a
    busy machine llama.cpp's spinning thread barriers made 2 threads 4x slower than 1 (measured)."""
    return 1 if Path(path).stat().st_size < 64 * 2**20 else min(os.cpu_count() or 1, 8)


def open_llama(path: str | Path, n_ctx: int = 512, logits_all: bool = False):
    """A llama.cpp model (quiet). Callers close it (`llm.close()`): feasibility pitfall 10."""
    return llama(path, n_ctx=n_ctx, n_batch=n_ctx, logits_all=logits_all, n_threads=default_threads(path))


def extra_buffers() -> bool:
    """Whether llama.cpp may use its extra CPU buffer types (AMX tiles, repacked weights).

    Off where the CPU advertises AMX: on such a machine (a VM with amx_int8) every q8_0 run of
    llama.cpp's AMX path crashed the process (SIGSEGV/SIGILL), while the plain kernels gave the same
    tokens. TIFA_LLAMACPP_EXTRA_BUFFERS=1 or 0 decides instead, e.g. on a machine where AMX works."""
    forced = os.environ.get("TIFA_LLAMACPP_EXTRA_BUFFERS", "")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").split()
    except OSError:
        return True
    return "amx_int8" not in flags


_PARAMS_LOCK = threading.Lock()


def llama(path: str | Path, **kwargs):
    """`llama_cpp.Llama` on `path` (quiet), with extra buffer types off where `extra_buffers()` says so.
    Llama() takes no argument for that model parameter and reads the library's defaults while it loads,
    so the defaults are swapped for the duration of the call (under a lock)."""
    from tifaforge.extras import require

    llama_cpp = require("llamacpp")
    kwargs = {"model_path": str(path), "verbose": False, **kwargs}
    if extra_buffers():
        return llama_cpp.Llama(**kwargs)
    lib = llama_cpp.llama_cpp
    with _PARAMS_LOCK:
        defaults = lib.llama_model_default_params

        def without_extra_buffers():
            params = defaults()
            params.use_extra_bufts = False
            return params

        lib.llama_model_default_params = without_extra_buffers
        try:
            return llama_cpp.Llama(**kwargs)
        finally:
            lib.llama_model_default_params = defaults
