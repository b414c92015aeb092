"""Every module imports with only the core dependencies; a missing extra names itself at use."""

import subprocess
import sys

import pytest

from tifaforge.errors import MissingExtraError
from tifaforge.extras import EXTRAS, require

BLOCK = sorted({m for mods, _ in EXTRAS.values() for m in mods} | {"starlette", "sse_starlette"})

SCRIPT = f"""
import importlib, pkgutil, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {BLOCK!r}:
            raise ModuleNotFoundError(f"blocked optional module {{name}}")
sys.meta_path.insert(0, Block())
import tifaforge
names = [m.name for m in pkgutil.walk_packages(tifaforge.__path__, 'tifaforge.')]
for n in names:
    importlib.import_module(n)
print(len(names))
"""


def test_every_module_imports_without_extras():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.strip()) >= 10


def test_import_tifaforge_is_light():
    code = "import sys, tifaforge; print([m for m in ('torch', 'transformers', 'numpy') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("extra", ["vllm", "deepspeed"])
def test_missing_extra_names_the_install_command(extra, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == extra else real(n, *a))
    with pytest.raises(MissingExtraError, match=rf"pip install 'tifaforge\[{extra}\]'"):
        require(extra)
