"""A stage's manifest: what it was trained from, with what, and that it finished (DESIGN.md §6).

    runs/NAME/02-sft/manifest.json    # written last: its presence means the stage is complete

The fingerprint is what decides whether a finished stage can be reused: the config keys that shape
its weights (its own section, the model section, the seed and the sections it reads besides), the
contents of its input files, and the fingerprint of the model it started from (a finished stage's
manifest, so a change anywhere upstream shows downstream). `started.json` holds the same fingerprint
from the moment a stage starts, so an interrupted stage is never resumed on changed inputs.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from pathlib import Path
from typing import Any

from tifaforge.utils import atomic_write_json

MANIFEST, STARTED = "manifest.json", "started.json"
# sections a stage reads besides its own (and `model`, `seed`)
READS = {"cpt": (), "sft": (), "mgrpo": ("reward",), "dpo": ("mining", "sampling", "reward")}
HASH_LIMIT = 1 << 30  # inputs above 1 GiB are fingerprinted by name, size and mtime (hashing would take minutes)


def inputs_of(cfg: Any, stage: str) -> list[str]:
    """The data files or folders a stage reads, as the config names them."""
    sec = getattr(cfg, stage)
    return {"cpt": lambda: [sec.data], "sft": lambda: [sec.data], "mgrpo": lambda: [sec.prompts],
            "dpo": lambda: [p for p in ((sec.prompts if sec.mine else ""), sec.pairs) if p]}[stage]()


def config_of(cfg: Any, stage: str) -> dict:
    """The config keys that shape a stage's weights (logging-only keys left out)."""
    from tifaforge.config import to_dict
    from tifaforge.config.training import cosmetic_keys

    d = to_dict(cfg)
    own = {k: v for k, v in d[stage].items() if k not in cosmetic_keys()}
    return {"seed": d["seed"], "model": d["model"], stage: own, **{s: d[s] for s in READS[stage]}}


def path_fingerprint(path: str | Path) -> str:
    """sha256 over a file's bytes, or a folder's files (relative names and bytes), recursively."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    if not files:
        return "missing"
    stats = (str(path), *((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if stats not in _HASHED:  # a pipeline checks every stage up front, then again as it runs: hash once
        _HASHED[stats] = _hash_files(path, files)
    return _HASHED[stats]


_HASHED: dict[tuple, str] = {}


def _hash_files(path: Path, files: list[Path]) -> str:
    big = sum(f.stat().st_size for f in files) > HASH_LIMIT
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode() + b"\0")
        if big:
            st = f.stat()
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
            continue
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def model_fingerprint(model_dir: str | Path) -> str:
    """A finished stage's model: its manifest's digest; any other folder: its files' contents."""
    model_dir = Path(model_dir)
    manifest = model_dir.parent / MANIFEST
    if model_dir.name == "model" and manifest.exists() and read(model_dir.parent).get("digest"):
        return "stage:" + read(model_dir.parent)["digest"]
    return "files:" + path_fingerprint(model_dir)


def fingerprint(cfg: Any, stage: str, base_model_dir: str | Path) -> dict:
    from tifaforge.utils import resolve_path

    fp = {"config": config_of(cfg, stage),
          "inputs": {p: path_fingerprint(resolve_path(p)) for p in inputs_of(cfg, stage)},
          "base": model_fingerprint(base_model_dir)}
    fp["digest"] = digest(fp)
    return fp


def digest(fp: dict) -> str:
    body = {k: fp[k] for k in ("config", "inputs", "base")}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def differences(old: dict, new: dict) -> list[str]:
    """Human-readable differences between two fingerprints (config keys, inputs, starting model)."""
    out = []
    oc, nc = old.get("config", {}), new["config"]
    for sec in sorted(set(oc) | set(nc)):
        a, b = oc.get(sec), nc.get(sec)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{sec}.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            out.append(f"{sec}: {a!r} -> {b!r}")
    for p in sorted(set(old.get("inputs", {})) | set(new["inputs"])):
        if old.get("inputs", {}).get(p) != new["inputs"].get(p):
            out.append(f"input {p} changed")
    if old.get("base") != new["base"]:
        out.append("the model it starts from changed")
    return out


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("tifaforge", "torch", "transformers", "trl", "peft", "datasets", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def read(stage_dir: str | Path, name: str = MANIFEST) -> dict:
    return json.loads((Path(stage_dir) / name).read_text(encoding="utf-8"))


def mark_started(stage_dir: Path, fp: dict) -> None:
    atomic_write_json(stage_dir / STARTED, {**fp, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def write(stage_dir: Path, stage: str, fp: dict, base_model_dir: str | Path, seconds: float, **extra) -> dict:
    """manifest.json, last: the stage is complete."""
    m = {"stage": stage, "status": "complete", **fp, "base_model": str(Path(base_model_dir).resolve()),
         "seconds": round(seconds, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": versions(),
         **extra}
    atomic_write_json(stage_dir / MANIFEST, m)
    (stage_dir / STARTED).unlink(missing_ok=True)
    return m
