"""The GPU checks on a CUDA machine: runs the `gpu`-marked tests and shows the figures they print.

    python bench/gpu_check.py            # bf16 CPT, SFT, engine, MGRPO (tests/test_gpu.py)
    python bench/gpu_check.py --vllm     # the vLLM backend and MGRPO's vLLM rollouts

The checks are pytest tests (tests/test_gpu.py, marker `gpu`) so that they are written, reviewed and
run like the rest of the suite; `make test` deselects them, since CI has no GPU. This script is the
one command a lent GPU machine runs (docs/gpu.md); pytest needs to be installed there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--vllm", action="store_true", help="check the vLLM backend and MGRPO's vLLM rollouts instead")
    args, rest = p.parse_known_args()
    sys.path.insert(0, str(ROOT / "src"))
    import pytest

    select = "vllm" if args.vllm else "not vllm"
    return pytest.main(["-m", "gpu", "-s", "-q", "-k", select, str(ROOT / "tests" / "test_gpu.py"), *rest])


if __name__ == "__main__":
    raise SystemExit(main())
