"""MAL with transformers assisted generation, counted exactly per verification step.

Accounting. `generate(assistant_model=...)` runs one target forward pass per verification
step; that pass scores the step's draft tokens (plus one position for the bonus token) and the
step then commits `accepted + 1` tokens: the accepted drafts and the target's own token after
them (the correction at the first mismatch, or the bonus token when every draft matched). We
record both sides of each step through public hooks, without patching transformers:

- the *drafted* tokens from a forward pre-hook on the target: its input is the prompt plus the
  drafts on the first step (prefill and first verification are one pass), and afterwards the
  last committed token plus the drafts;
- the *committed* tokens from a streamer: assisted generation calls `streamer.put` once per
  step with exactly the tokens that step committed (the first `put` is the prompt).

accepted = common prefix of drafted and committed (see `counters_from_steps`), and
MAL = 1 + accepted / draft steps, the quantity vLLM's counters give.

Edge cases at the end of a generation. (1) The assistant drafts at most
`max_new_tokens - generated - 1` tokens, so the last drafts of a prompt can be shorter than K,
and a final step can have no drafts at all; that step is plain decoding and is not a draft step
(vLLM never shortens drafts: it drafts K tokens and discards what lies past `max_tokens`). With
the target drafting for itself MAL is exactly K+1 when `max_new_tokens` is a multiple of K+1.
(2) When the drafts reach EOS or the length limit and all match, transformers commits them
without a bonus token (`n_matches -= 1` in `_assisted_decoding`); the common-prefix rule still
counts every draft as accepted, so that step adds `accepted` tokens, not `accepted + 1`, to the
output. `target_steps` (all forward passes during decoding) gives the plain tokens-per-pass view.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase, set_seed

from sd2_hf.evaluation.assisted_steps import (
    StepRecorder,
    mean_forward_seconds,
    set_draft_length,
)
from sd2_hf.evaluation.backend import (
    Decode,
    DrafterPlan,
    Generate,
    Generation,
    counters_from_steps,
)
from sd2_hf.evaluation.config import EvalConfig
from sd2_hf.evaluation.cost_model import verify_ratios

SUBSET_VOCAB_CRASH = (
    "sampled universal assisted generation crashed inside transformers: the drafter's vocabulary "
    "is a subset of the target's, and transformers then never builds "
    "`assistant_overlap_token_ids` but still uses it (a transformers bug, SPEC §4). Use greedy "
    "decoding (temperature 0), which takes another code path and works, or a drafter whose "
    "vocabulary is not a subset of the target's."
)


def load_causal_lm(path: str, dtype: str) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.eval()


class TransformersBackend:
    """Target in-process; drafters loaded one at a time for their session."""

    name = "transformers"

    def __init__(self, config: EvalConfig, target_path: str, tokenizer: PreTrainedTokenizerBase):
        self.config = config
        self.tokenizer = tokenizer
        self.target = load_causal_lm(target_path, config.dtype)
        if self.target.generation_config.pad_token_id is None:
            self.target.generation_config.pad_token_id = (
                tokenizer.pad_token_id or tokenizer.eos_token_id
            )

    def versions(self) -> dict[str, str]:
        import transformers

        return {"torch": torch.__version__, "transformers": transformers.__version__}

    @contextmanager
    def decoder(self, drafter: DrafterPlan | None) -> Iterator[Decode]:
        """`decode(prompt_ids, n) -> (seconds, new tokens)`: `drafter`'s model (the target with
        None) decoding alone, greedily at batch 1, exactly `n` new tokens (EOS ignored, so every
        model takes the same steps at the same context lengths)."""
        model = self.target if drafter is None else load_causal_lm(drafter.path, self.config.dtype)
        pad = self.target.generation_config.pad_token_id

        def decode(prompt_ids: list[int], n: int) -> tuple[float, int]:
            input_ids = torch.tensor([prompt_ids], device=model.device)
            start = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    do_sample=False,
                    min_new_tokens=n,
                    max_new_tokens=n,
                    pad_token_id=pad,
                )
            return time.perf_counter() - start, out.shape[1] - len(prompt_ids)

        yield decode

    def verify_ratios(self, runs: list[tuple[list[int], int]], ks: list[int]) -> dict[int, float]:
        """The target's forward time over K + 1 new tokens / over one new token, after the
        prompt of each of `runs` (its KV cache filled, untimed), for every K of `ks`: median
        over the runs of the mean of two timed passes (one untimed warm-up pass first)."""
        return verify_ratios(self._forward_seconds, runs, ks)

    @torch.inference_mode()
    def _forward_seconds(self, prompt_ids: list[int], widths: list[int]) -> dict[int, float]:
        """Mean of two timed target forwards of `width` new tokens over the cached prompt, per
        width (the cache cropped back to the prompt after each)."""
        input_ids = torch.tensor([prompt_ids], device=self.target.device)
        cache = self.target(input_ids=input_ids, use_cache=True).past_key_values
        new = input_ids[:, -1:].repeat(1, max(widths))  # the values do not matter

        def forward(width: int) -> float:
            start = time.perf_counter()
            self.target(input_ids=new[:, :width], past_key_values=cache, use_cache=True)
            seconds = time.perf_counter() - start
            cache.crop(len(prompt_ids))
            return seconds

        return mean_forward_seconds(forward, widths)

    def _generate_kwargs(self, temperature: float) -> dict:
        kwargs = {"max_new_tokens": self.config.max_new_tokens}
        if temperature == 0:
            kwargs["do_sample"] = False
        else:
            # The whole distribution (no top-k/top-p truncation): speculative sampling then
            # keeps the target's distribution at this temperature.
            kwargs.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
        return kwargs

    @contextmanager
    def session(
        self, drafter: DrafterPlan | None, temperature: float | None = None
    ) -> Iterator[Generate]:
        """`temperature`: this session's, instead of the configuration's (sampled runs)."""
        set_seed(self.config.seed)
        kwargs = self._generate_kwargs(
            self.config.temperature if temperature is None else temperature
        )
        assistant = None
        if drafter is not None and drafter.kind == "ngram":
            kwargs["prompt_lookup_num_tokens"] = self.config.num_draft_tokens
        elif drafter is not None:
            assistant = load_causal_lm(drafter.path, self.config.dtype)
            set_draft_length(assistant, self.config.num_draft_tokens)
            kwargs["assistant_model"] = assistant
            if drafter.uag:
                kwargs.update(tokenizer=self.tokenizer, assistant_tokenizer=drafter.tokenizer)

        def generate(prompt_ids: list[int]) -> Generation:
            input_ids = torch.tensor([prompt_ids], device=self.target.device)
            attention_mask = torch.ones_like(input_ids)
            if drafter is None:
                start = time.perf_counter()
                with torch.inference_mode():
                    out = self.target.generate(
                        input_ids=input_ids, attention_mask=attention_mask, **kwargs
                    )
                seconds = time.perf_counter() - start
                return Generation(out[0, len(prompt_ids) :].tolist(), seconds)
            recorder = StepRecorder()
            hook = self.target.register_forward_pre_hook(
                recorder.on_target_forward, with_kwargs=True
            )
            try:
                start = time.perf_counter()
                with torch.inference_mode():
                    out = self.target.generate(
                        input_ids=input_ids,
                        attention_mask=attention_mask,
                        streamer=recorder,
                        **kwargs,
                    )
                seconds = time.perf_counter() - start
            except AttributeError as err:
                if "assistant_overlap_token_ids" in str(err):
                    raise RuntimeError(SUBSET_VOCAB_CRASH) from err
                raise
            finally:
                hook.remove()
            steps = recorder.steps()
            return Generation(
                out[0, len(prompt_ids) :].tolist(),
                seconds,
                counters=counters_from_steps(steps),
                target_steps=len(steps),
            )

        try:
            yield generate
        finally:
            del assistant
