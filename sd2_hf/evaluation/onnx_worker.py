"""ONNX Runtime worker of `sd2 eval --backend onnxruntime`; runs in the `.venv-onnx` environment.

It imports only torch, transformers and optimum (never `sd2_hf`): optimum-onnx 0.1, the
exporter, needs transformers < 4.58, so it lives in an environment of its own, as vLLM does,
and the main environment talks to it over JSON lines on stdin/stdout (one request, one reply).

Requests (`op`):
- `export {src, dst}`: export a transformers checkpoint to ONNX (`ORTModelForCausalLM`,
  fp32, with its KV cache) into `dst`. Checkpoints written by transformers 5 keep RoPE's base in
  `rope_parameters`, which 4.57 does not read (it would fall back to 10000 and change the
  model): the config is copied with `rope_theta` set from it first.
- `load {role: target|drafter, path, k}`: an exported model; a drafter drafts exactly K tokens
  per step (constant schedule, no confidence threshold), as in the transformers backend.
- `generate {ids, max_new_tokens, assisted}`: greedy generation of the target, alone or with the
  loaded drafter through `generate(assistant_model=...)`; returns the new ids, seconds and each
  verification step's drafted and committed tokens (the transformers backend's accounting: the
  target's inputs and the streamer's chunks), from which the caller counts acceptance.
- `decode {role, ids, n}`: that model alone, exactly n new tokens (EOS ignored), timed.
- `forward_seconds {ids, widths}`: the target's forward over `width` new tokens after the cached
  prompt, timed, per width (the verify step's cost for the cost model).
- `versions`.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch

# Run as a script: this file's directory is on sys.path, and the sibling module imports only
# torch and transformers (never the sd2_hf package, whose pins this environment does not have).
from assisted_steps import StepRecorder, mean_forward_seconds, set_draft_length
from optimum.onnxruntime import ORTModelForCausalLM
from transformers.cache_utils import Cache, DynamicCache


class CachedORTModel(ORTModelForCausalLM):
    """optimum-onnx 0.1 returns the KV cache as tuples, and transformers 4.57's assisted
    generation crops it as a `Cache` (`past_key_values.crop`: AttributeError on a tuple). This
    subclass hands the session tuples and gives generation a `DynamicCache`; it also records
    each call's input ids for the step accounting (ORT models are not `nn.Module`s: no hooks)."""

    recorder: StepRecorder | None = None

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, **kwargs):
        if isinstance(past_key_values, Cache):
            past_key_values = (
                past_key_values.to_legacy_cache() if past_key_values.get_seq_length() else None
            )
        if self.recorder is not None:
            self.recorder.record_target_input(input_ids)
        out = super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            **kwargs,
        )
        if isinstance(out.past_key_values, tuple):
            out.past_key_values = DynamicCache.from_legacy_cache(out.past_key_values)
        return out


def stage(src: str, staging: Path) -> None:
    """The checkpoint's top-level files, linked (not copied) into `staging`, with the config
    written anew with `rope_theta`. Subfolders are left out: a training run's `checkpoints/`
    (optimizer states, several times the model's size) filled the disk when the whole folder
    was copied."""
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for file in Path(src).iterdir():
        if file.is_file() and file.name != "config.json":
            (staging / file.name).symlink_to(file.resolve())
    config = json.loads((Path(src) / "config.json").read_text())
    rope = config.get("rope_parameters") or {}
    if "rope_theta" not in config and "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
    (staging / "config.json").write_text(json.dumps(config, indent=2))


def export(src: str, dst: str) -> dict:
    staging = Path(dst).with_name(Path(dst).name + ".src")
    stage(src, staging)
    start = time.perf_counter()
    model = ORTModelForCausalLM.from_pretrained(staging, export=True, use_cache=True)
    model.save_pretrained(dst)
    shutil.rmtree(staging)
    return {"seconds": time.perf_counter() - start}


class Worker:
    def __init__(self) -> None:
        self.models: dict[str, CachedORTModel] = {}

    def load(self, role: str, path: str, k: int | None = None) -> dict:
        model = CachedORTModel.from_pretrained(path, use_cache=True)
        if k is not None:
            set_draft_length(model, k)
        self.models[role] = model
        return {}

    def generate(self, ids: list[int], max_new_tokens: int, assisted: bool) -> dict:
        target = self.models["target"]
        input_ids = torch.tensor([ids])
        kwargs = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "max_new_tokens": max_new_tokens,
            "do_sample": False,
            "pad_token_id": target.generation_config.pad_token_id
            or target.generation_config.eos_token_id,
        }
        recorder = StepRecorder() if assisted else None
        if assisted:
            kwargs.update(assistant_model=self.models["drafter"], streamer=recorder)
        target.recorder = recorder
        try:
            start = time.perf_counter()
            out = target.generate(**kwargs)
            seconds = time.perf_counter() - start
        finally:
            target.recorder = None
        steps = recorder.steps() if recorder is not None else None
        return {"token_ids": out[0, len(ids) :].tolist(), "seconds": seconds, "steps": steps}

    def decode(self, role: str, ids: list[int], n: int) -> dict:
        model = self.models[role]
        input_ids = torch.tensor([ids])
        start = time.perf_counter()
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            min_new_tokens=n,
            max_new_tokens=n,
            pad_token_id=model.generation_config.pad_token_id
            or model.generation_config.eos_token_id,
        )
        return {"seconds": time.perf_counter() - start, "tokens": out.shape[1] - len(ids)}

    def forward_seconds(self, ids: list[int], widths: list[int]) -> dict:
        """The target's forward time over `width` new tokens after the cached prompt, per width
        (`mean_forward_seconds`, as the transformers backend times it)."""
        model = self.models["target"]
        input_ids = torch.tensor([ids])
        cache = model(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=True
        ).past_key_values
        new = input_ids[:, -1:].repeat(1, max(widths))  # the values do not matter

        def forward(width: int) -> float:
            mask = torch.ones(1, len(ids) + width, dtype=torch.long)
            start = time.perf_counter()
            # The session returns a new cache; the prompt's stays as it was (no crop needed).
            model(input_ids=new[:, :width], attention_mask=mask, past_key_values=cache)
            return time.perf_counter() - start

        seconds = mean_forward_seconds(forward, widths)
        return {"seconds": {str(w): t for w, t in seconds.items()}}

    @staticmethod
    def versions() -> dict:
        from importlib.metadata import version

        import onnxruntime
        import transformers

        return {
            "onnxruntime": onnxruntime.__version__,
            # optimum.onnx has no __version__: the distribution's metadata has it.
            "optimum-onnx": version("optimum-onnx"),
            "transformers (onnx env)": transformers.__version__,
        }


def main() -> None:
    replies, sys.stdout = sys.stdout, sys.stderr  # library prints must not break the protocol
    worker = Worker()
    handlers = {
        "export": export,
        "load": worker.load,
        "generate": worker.generate,
        "decode": worker.decode,
        "forward_seconds": worker.forward_seconds,
        "versions": worker.versions,
    }
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        try:
            reply = {"ok": True, **handlers[op](**request)}
        except Exception as error:  # noqa: BLE001 - sent back to the caller, which raises
            reply = {"ok": False, "error": f"{type(error).__name__}: {error}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":
    main()
