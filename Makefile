# The two commands of the README:  `make demo`  and  `make test`.
# Both do all set-up they need (idempotent: a second run is a no-op in seconds).
PY := .venv/bin/python
SD2 := .venv/bin/sd2

.PHONY: setup setup-main setup-vllm setup-onnx test test-fast lint format demo bench clean

setup:
	bash scripts/setup_env.sh all

setup-main:
	bash scripts/setup_env.sh main

setup-vllm:
	bash scripts/setup_env.sh vllm

setup-onnx:
	bash scripts/setup_env.sh onnx

test: setup
	$(PY) -m pytest -q

test-fast: setup-main
	$(PY) -m pytest -q -m "not slow and not vllm"

lint: setup-main
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

format: setup-main
	.venv/bin/ruff check --fix .
	.venv/bin/ruff format .

demo: setup
	$(SD2) run recipes/sd2/smollm2-demo.yaml

clean:
	rm -rf .pytest_cache .ruff_cache build dist *.egg-info
