"""Session fixtures: tiny tokenizers and Llama models built in-process (see tests/tiny.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import tiny  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = REPO_ROOT / ".venv-vllm" / "bin" / "python"


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return tiny.build_tokenizer(vocab_size=384, seed=0)


@pytest.fixture(scope="session")
def other_tokenizer():
    """A tokenizer with a different vocabulary (for cross-family / UAG tests)."""
    return tiny.build_tokenizer(vocab_size=320, seed=1)


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    """A fresh 2-layer tiny Llama (function scope: tests may modify it)."""
    return tiny.build_model(tiny_tokenizer)


@pytest.fixture()
def sparse_model(tiny_tokenizer):
    """A tiny Llama made 50% sparse (unstructured) by magnitude."""
    return tiny.magnitude_sparsify(tiny.build_model(tiny_tokenizer), 0.5)


@pytest.fixture()
def sparse_24_model(tiny_tokenizer):
    return tiny.magnitude_sparsify(tiny.build_model(tiny_tokenizer), structure="2:4")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A saved tiny target (model + tokenizer + chat template), loadable by transformers and vLLM."""
    path = tmp_path_factory.mktemp("tiny-target")
    return tiny.save_model(tiny.build_model(tiny_tokenizer, seed=0), tiny_tokenizer, path)


@pytest.fixture(scope="session")
def tiny_drafter_dir(tmp_path_factory, tiny_tokenizer):
    """A saved tiny drafter sharing the target's tokenizer (different weights)."""
    path = tmp_path_factory.mktemp("tiny-drafter")
    return tiny.save_model(tiny.build_model(tiny_tokenizer, seed=1), tiny_tokenizer, path)


@pytest.fixture(scope="session")
def noisy_drafter_dir(tmp_path_factory, tiny_tokenizer):
    """The target's weights plus 5% noise: a drafter that agrees with the target part of the time."""
    path = tmp_path_factory.mktemp("noisy-drafter")
    return tiny.save_model(tiny.noisy_model(tiny_tokenizer), tiny_tokenizer, path)


@pytest.fixture(scope="session")
def other_family_dir(tmp_path_factory, other_tokenizer):
    """A saved tiny model with a different tokenizer (cross-family drafter)."""
    path = tmp_path_factory.mktemp("tiny-other-family")
    return tiny.save_model(tiny.build_model(other_tokenizer, seed=2), other_tokenizer, path)


@pytest.fixture(scope="session")
def chat_rows():
    return tiny.conversations(16)


@pytest.fixture()
def sparse_dir(tmp_path, tiny_tokenizer):
    """A saved tiny Llama made 50% sparse by magnitude (what `sd2 prune` writes)."""
    model = tiny.magnitude_sparsify(tiny.build_model(tiny_tokenizer), 0.5)
    return tiny.save_model(model, tiny_tokenizer, tmp_path / "pruned")


@pytest.fixture()
def conversations_file(tmp_path):
    """12 tiny conversations as a JSONL file in the `messages` form."""
    import json

    path = tmp_path / "distilled.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in tiny.conversations(12)))
    return path


@pytest.fixture(scope="session")
def vllm_python():
    """The .venv-vllm interpreter; tests needing vLLM skip with the reason when it is absent."""
    if not VLLM_PYTHON.exists():
        pytest.skip("the vLLM environment (.venv-vllm) is missing: run `make setup`")
    return VLLM_PYTHON


@pytest.fixture(scope="session")
def chat_rows_file(tmp_path_factory, chat_rows):
    """`chat_rows` as a JSONL file in the `messages` form (a dataset source the loaders read)."""
    import json

    path = tmp_path_factory.mktemp("chat-rows") / "chat.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in chat_rows))
    return str(path)


@pytest.fixture()
def single_torch_thread():
    """One torch intra-op thread for the test: on an oversubscribed CPU (parallel test runs, a
    vLLM server beside the test) OpenMP threads spin-wait for each other and generation gets
    10-100x slower; one thread is unaffected. Restores the previous count afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def sd2_fails(capsys):
    """Run `sd2 ARGV...` expecting a user error: exit status 2, one `error:` message and no
    traceback on stderr. Returns the message."""
    from sd2_hf.cli import main

    def run(argv: list[str]) -> str:
        capsys.readouterr()
        status = main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert status == 2, f"sd2 {' '.join(map(str, argv))} exited {status}: {err[-2000:]}"
        assert "Traceback" not in err and f"error: sd2 {argv[0]}: " in err, err[-2000:]
        return err

    return run
