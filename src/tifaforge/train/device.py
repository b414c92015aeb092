"""Where a stage trains and in which precision: the device and bf16/fp32 checks every stage runs first.

    tifa train cpt configs/tiny-cpt.yaml --set cpt.device=cpu     # `device` and `dtype` are read here

A precision the hardware cannot run (bf16 on a CPU without AVX512-BF16/AMX, or on an old GPU) is a
clear error before any work, not a slow or silent fallback. torch is imported only when called.
"""

from __future__ import annotations

from tifaforge.config import TrainConfig
from tifaforge.errors import TifaError


# ---------------------------------------------------------------------------------------------
# Device and precision


def resolve_device(tc: TrainConfig) -> str:
    import torch

    if tc.device == "cuda" and not torch.cuda.is_available():
        raise TifaError("device: 'cuda' asked, but no CUDA device is available (set device: cpu or auto)")
    if tc.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return tc.device


def cpu_bf16_supported() -> bool:
    """Whether this CPU has a bf16 compute path (oneDNN's check: AVX512-BF16 or AMX)."""
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def check_precision(tc: TrainConfig, stage: str) -> str:
    """'bf16' or 'fp32' for this device; bf16 asked where it cannot run is an error, not a slow run."""
    import torch

    device = resolve_device(tc)
    if tc.dtype == "auto":
        return "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if tc.dtype == "float32":
        return "fp32"
    if device == "cuda" and not torch.cuda.is_bf16_supported():
        raise TifaError(f"{stage}.dtype: bfloat16 asked, but this GPU has no bf16 support; use float32")
    if device == "cpu" and not cpu_bf16_supported():
        raise TifaError(f"{stage}.dtype: bfloat16 asked, but this CPU has no bf16 support (no AVX512-BF16/AMX): "
                        "set dtype: float32 (or auto)")
    return "bf16"


def check_quantize(quantize: str, lora: bool, key: str) -> None:
    """QLoRA's needs, refused before any model loads: adapters to train, a CUDA GPU, bitsandbytes."""
    if quantize == "none":
        return
    import torch

    from tifaforge import extras

    if not lora:
        raise TifaError(f"{key} {quantize}: a 4-bit base cannot be trained itself; enable LoRA (QLoRA trains adapters)")
    if not torch.cuda.is_available():
        raise TifaError(f"{key} {quantize}: QLoRA needs a CUDA GPU (bitsandbytes' 4-bit kernels); none here: "
                        "train LoRA on the full-precision base instead (quantize: none)")
    if not extras.is_available("qlora"):
        raise TifaError(f"{key} {quantize}: QLoRA needs the 'qlora' extra: pip install 'tifaforge[qlora]'")
