"""`opt` and `section`: how a config field declares its default, help text and bounds.

Kept apart from `config.py` so that sections living beside their code (rewards, eval, training)
can be imported BY `config.py` without a circular import.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any


def opt(default: Any, help: str, *, min: float | None = None, max: float | None = None) -> Any:
    """A config field: its default, the help text shown by the CLI and docs, optional bounds."""
    meta = {"help": help, "min": min, "max": max}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def section(cls: type, help: str) -> Any:
    """A nested config section (a dataclass) with its help text."""
    return field(default_factory=cls, metadata={"help": help})
