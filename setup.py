"""The one compiled part: the ingest's BPE kernel (src/tifaforge/data/_bpe.c). Everything else is in
pyproject.toml. `optional=True`: without a C compiler the package installs anyway and the ingest uses
its pure-Python word cache and the Rust tokenizer instead (slower, same ids)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("tifaforge.data._bpe", ["src/tifaforge/data/_bpe.c"], optional=True,
                             extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wno-unused-parameter"])])
