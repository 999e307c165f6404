"""The machine and the project's environments: GPUs, CPU features, the vLLM interpreter."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]


class VLLMEnvironmentError(FileNotFoundError):
    """The vLLM environment (its interpreter) is missing; the message says how to create it."""


def vllm_python() -> Path:
    """The interpreter of the vLLM environment: `$SD2_VLLM_PYTHON`, else the project's `.venv-vllm`."""
    return _environment_python(
        "SD2_VLLM_PYTHON", ".venv-vllm", "vLLM", "vllm", "vllm", VLLMEnvironmentError
    )


class OnnxEnvironmentError(FileNotFoundError):
    """The ONNX Runtime environment (its interpreter) is missing; the message says how to make it."""


def onnx_python() -> Path:
    """The interpreter of the ONNX Runtime environment (optimum-onnx, which needs transformers
    < 4.58): `$SD2_ONNX_PYTHON`, else the project's `.venv-onnx`."""
    return _environment_python(
        "SD2_ONNX_PYTHON",
        ".venv-onnx",
        "ONNX Runtime",
        "onnx",
        "optimum-onnx and onnxruntime",
        OnnxEnvironmentError,
    )


def _environment_python(
    variable: str, directory: str, what: str, step: str, has: str, error: type[Exception]
) -> Path:
    configured = os.environ.get(variable)
    python = Path(configured) if configured else PROJECT_ROOT / directory / "bin" / "python"
    if not python.exists():
        where = variable if configured else f"the project's {directory}"
        raise error(
            f"no {what} interpreter at {python} ({where}): run `make setup` (or "
            f"`bash scripts/setup_env.sh {step}`) to create the {what} environment, or set "
            f"{variable} to a Python that has {has} installed"
        )
    return python


@functools.cache
def has_gpu() -> bool:
    """Whether `nvidia-smi -L` answers."""
    # Cached: a server's dtype and its command line both ask, and the answer cannot change.
    # Same test as scripts/setup_env.sh uses to pick the CUDA or the CPU vLLM build.
    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


# CPU feature flags of bfloat16 arithmetic: x86 AVX512-BF16 and AMX-BF16, Arm's BF16 extension.
_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


def cpu_has_native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool | None:
    """Whether this CPU has bfloat16 instructions; None where /proc/cpuinfo cannot be read."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            flags.update(value.split())
    return bool(flags & _BF16_FLAGS)
