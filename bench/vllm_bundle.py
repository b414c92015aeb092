"""Build the vLLM bundle that `bench/gpu_check.py --vllm` runs with on the lent GPU machine.

    python bench/vllm_bundle.py --out .vw          # here: downloads, trims, packs (about 5 minutes)
    python bench/vllm_bundle.py --device-command   # the command to give the GPU machine (carry .vw)

Why a bundle: the lent H200 machine has torch 2.11.0+cu130 and no vLLM, reaches no package index, and a
call carries at most 64 MiB. vLLM 0.24.0 is the release built for exactly that torch (cu13), but its wheel
is 279 MB: 343 MB of it (unpacked) are FlashAttention kernels, and its main kernel library holds machine
code for seven GPU generations. The bundle leaves out the FlashAttention libraries (the check selects
vLLM's Triton attention backend), zeroes the device code of every generation but Hopper's (sm_90 machine
code and all PTX kept; zeros pack to nothing), and adds the Python packages vLLM imports that the image
lacks, plus transformers 5.24 (the project's pin). Packed with xz: about 55 MB with the extra wheels.
Two of vLLM's files assume the left-out parts and are patched on the machine (`--device-command`).
"""

from __future__ import annotations

import argparse
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

VLLM = "vllm==0.24.0"
TRANSFORMERS = "transformers==5.24.0"
# vLLM 0.24.0's requirements that the GPU image lacks and that `import vllm` / LLM(...) reach.
PACKAGES = """annotated_types==0.8.0 astor==0.8.1 blake3==1.0.11 cachetools==8.0.2 cbor2==6.3.0 compressed_tensors==0.17.0
depyf==0.20.0 dill==0.4.1 diskcache==5.6.3 docstring_parser==0.18.0 fastapi==0.136.3 ijson==3.6.0 interegular==0.3.3
jiter==0.19.0 jsonschema==4.26.0 jsonschema_specifications==2025.9.1 lark==1.2.2 llguidance==1.7.6
lm_format_enforcer==0.11.3 msgspec==0.23.0 openai==3.60.0 openai_harmony==0.0.8 outlines_core==0.2.14
partial_json_parser==0.2.1.1.post7 prometheus_fastapi_instrumentator==8.1.0 pybase64==1.5.1 pydantic==2.14.4
pydantic_core==2.50.5 python_json_logger==4.2.0 pyzmq==27.3.0 referencing==0.37.0 rpds_py==2026.9.1
setproctitle==1.3.8 sniffio==1.3.1 starlette==1.10.0 typing_inspection==0.4.5 watchfiles==1.3.0 xgrammar==0.2.9
apache_tvm_ffi==0.1.15.post2""".split()
# Pure-Python packages installed on the machine from wheels (imported at run time, not found by import tests).
EXTRA_WHEELS = """httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 pydantic_settings==2.16.3 python_dotenv==1.2.4
websockets==17.4 uvicorn==0.55.0 sse_starlette==3.7.1 python_multipart==0.0.34 email_validator==2.4.0
dnspython==2.9.2 pyjwt==2.15.1 tomlkit==0.15.3 loguru==0.7.3 jmespath==1.1.0 model_hosting_container_standards==0.1.16
pydantic_extra_types==2.11.1 opentelemetry_api==1.45.2 opentelemetry_sdk==1.45.2 opentelemetry_semantic_conventions==0.66b2
opentelemetry_semantic_conventions_ai==0.5.1 googleapis_common_protos==1.76.0 anthropic==2.17.0 mcp==2.3.0
mcp_types==2.3.0""".split()
PLATFORM = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"] + [
    a for n in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                "manylinux_2_24_x86_64", "manylinux_2_26_x86_64", "manylinux_2_31_x86_64", "manylinux1_x86_64",
                "manylinux_2_5_x86_64") for a in ("--platform", n)]
LEFT_OUT = ["vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so", "vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so",
            "vllm/_moe_C_stable_libtorch.abi3.so", "vllm/_flashmla_C.abi3.so", "vllm/vllm-rs",
            "vllm/third_party/deep_gemm", "vllm/third_party/fmha_sm100"]
DEVICE_COMMAND = (
    "set -o pipefail; [ -d /tmp/site/vllm ] || { mkdir -p /tmp/site && tar xJf .vw/site312.tar.xz -C /tmp/site && "
    "python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .vw/*.whl; }; "
    "sed -i 's/^if not (FA2_AVAILABLE or FA3_AVAILABLE):/if False:/' /tmp/site/vllm/vllm_flash_attn/__init__.py; "
    "sed -i 's/and flashinfer_sampler_supported()/and False/' /tmp/site/vllm/v1/sample/ops/topk_topp_sampler.py; "
    "export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 "
    "TIFA_VLLM_ARGS='{\"attention_backend\":\"TRITON_ATTN\",\"enforce_eager\":true}' && "
    "python3 bench/gpu_check.py --vllm --out /tmp/gc 2>&1 | tee $OUT/vllm.log")


def keep_only_arch(so: Path, arch: int = 90) -> int:
    """Zero the payload of every ELF (machine code) entry of the library's .nv_fatbin section that is
    not for `arch`; PTX entries stay (the driver can compile them). Returns the bytes zeroed."""
    out = subprocess.run(["readelf", "-SW", str(so)], capture_output=True, text=True, check=True).stdout
    line = next((x for x in out.splitlines() if ".nv_fatbin" in x), None)
    if line is None:
        return 0
    fields = line.split("PROGBITS")[1].split()
    off, size = int(fields[1], 16), int(fields[2], 16)
    data = bytearray(so.read_bytes())
    pos, end, zeroed = off, off + size, 0
    while pos < end:
        magic, _version, header, fat = struct.unpack_from("<IHHQ", data, pos)
        if magic != 0xBA55ED50:  # fat binaries are 8-byte aligned; skip padding
            pos += 8
            continue
        e, stop = pos + header, pos + header + fat
        while e < stop:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, e)
            entry_arch = struct.unpack_from("<I", data, e + 28)[0]
            if kind == 2 and entry_arch != arch:
                data[e + entry_header:e + entry_header + payload] = bytes(payload)
                zeroed += payload
            e += entry_header + payload
        pos = stop
    so.write_bytes(data)
    return zeroed


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def build(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pip("download", "-q", "--no-deps", *PLATFORM, "-d", str(tmp / "dl"), VLLM, TRANSFORMERS, *PACKAGES)
        site = tmp / "site"
        wheels = [str(p) for p in (tmp / "dl").glob("*.whl") if not p.name.startswith("vllm-")]
        pip("install", "-q", "--no-deps", "--no-compile", "--target", str(site), *PLATFORM, *wheels)
        vllm_whl = next((tmp / "dl").glob("vllm-*.whl"))
        with zipfile.ZipFile(vllm_whl) as z:
            z.extractall(site)
        for rel in LEFT_OUT:
            p = site / rel
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        for so in (site / "vllm").glob("*.so"):
            print(f"{so.name}: {keep_only_arch(so) >> 20} MiB of non-Hopper machine code zeroed")
        shutil.rmtree(site / "bin", ignore_errors=True)
        subprocess.run(f"tar cf - -C {site} . | xz -9 -T2 > {out / 'site312.tar.xz'}", shell=True, check=True)
        pip("download", "-q", "--no-deps", *PLATFORM, "-d", str(out), *EXTRA_WHEELS)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"{out}: {size / 2**20:.1f} MiB (a device call carries at most 64 MiB with the repository)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=".vw", help="the folder to write (ignore it in .git/info/exclude; carry it)")
    p.add_argument("--device-command", action="store_true", help="print the GPU machine's command and exit")
    args = p.parse_args()
    if args.device_command:
        print(DEVICE_COMMAND)
        return 0
    if not re.search(r"\S", shutil.which("readelf") or ""):
        raise SystemExit("readelf (binutils) is needed to find the kernel library's .nv_fatbin section")
    build(Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
