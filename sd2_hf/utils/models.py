"""Models and checkpoints, inspected before any work starts: where a model named on the command
line or in a recipe is, its dtype and vocabulary, and how vLLM must serve it. Below every
stage that uses them (distill, prune, train, export, eval, serve)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from sd2_hf.utils import environment

# The dtypes a model can be loaded or served in; `auto` keeps the checkpoint's own.
Dtype = Literal["auto", "float32", "bfloat16", "float16"]

WHAT_TO_PASS = (
    "pass an existing checkpoint directory (config.json, weights, tokenizer), an `asset:` name "
    "(`sd2 assets list`) or a Hub id (org/name)"
)


# Functions that turn a name of their own into a model directory, anything else unchanged:
# `sd2_hf.assets` registers the one for `asset:<name>` when it is imported, which the package's
# `__init__` does, so utils need not import a package above them.
_name_resolvers: list[Callable[[str], str]] = []


def register_model_resolver(resolver: Callable[[str], str]) -> None:
    """Have `resolve_model_path` pass every name through `resolver` first (once per function)."""
    if resolver not in _name_resolvers:
        _name_resolvers.append(resolver)


def resolve_model_path(name_or_path: str) -> str:
    """`asset:<name>` → its local directory, a checkpoint directory → its absolute path, a Hub
    id → itself once the Hub (or, offline, the local cache) serves its config.json.

    Anything else raises `FileNotFoundError` saying what to pass, so a typo fails in a second,
    not after a dataset was loaded or a vLLM server started. A missing relative path such as
    `runs/x` looks like a Hub id (org/name); it is asked of the Hub, and the message names both.
    """
    for resolver in _name_resolvers:
        name_or_path = resolver(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
            # transformers would load it onto its base with plain (unmasked) LoRA layers.
            raise FileNotFoundError(
                f"{name_or_path} is a PEFT adapter, not a drafter checkpoint: pass the merged "
                "drafter `sd2 train --peft` writes to its output dir, or merge the adapter with "
                "sd2_hf.load_sparse_adapter(base, dir).merge_and_unload() and save that"
            )
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{name_or_path} has no config.json: {WHAT_TO_PASS}")
        return str(path.resolve())
    looks_local = (
        path.is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1
    )
    if looks_local:
        raise FileNotFoundError(f"model directory {name_or_path} does not exist: {WHAT_TO_PASS}")
    return _check_hub_model(name_or_path)


def _check_hub_model(repo_id: str) -> str:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id
    from transformers.utils import cached_file

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise FileNotFoundError(
            f"{repo_id!r} is neither an existing directory nor a valid Hub id: {WHAT_TO_PASS}"
        ) from None
    try:
        # One small file: what from_pretrained would fetch first anyway (cache-only offline).
        cached_file(repo_id, "config.json")
    except OSError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(
            f"{repo_id} is not a local directory (no such path here) and the Hub cannot "
            f"serve it ({reason}): {WHAT_TO_PASS}"
        ) from None
    return repo_id


def _config_dict(name_or_path: str) -> dict[str, Any]:
    from transformers import PretrainedConfig

    config, _ = PretrainedConfig.get_config_dict(name_or_path)
    return config


def is_hybrid_attention(name_or_path: str) -> bool:
    """True for models mixing sliding-window and full-attention layers (Gemma-2/3 style)."""
    config = _config_dict(name_or_path)
    text = config.get("text_config") or config
    layer_types = text.get("layer_types") or []
    if len(set(layer_types)) > 1:
        return True
    # Older Gemma-3 configs have no `layer_types`, only the interleaving period.
    return bool(text.get("sliding_window_pattern") and text.get("sliding_window"))


def vocabularies_differ(target: str, drafter: str) -> bool:
    """Whether vLLM needs `use_heterogeneous_vocab`: different token→id maps or model vocab sizes.

    Sizes alone are not enough: two tokenizers of the same size can map ids to different
    strings, and the drafter's tokens would then be verified as the wrong tokens.
    """
    from transformers import AutoTokenizer

    target_tok = AutoTokenizer.from_pretrained(target)
    drafter_tok = AutoTokenizer.from_pretrained(drafter)
    if target_tok.get_vocab() != drafter_tok.get_vocab():
        return True
    return _config_dict(target).get("vocab_size") != _config_dict(drafter).get("vocab_size")


def default_num_draft_tokens(drafter: str) -> int | None:
    """The draft length an exported drafter carries (`num_assistant_tokens` in generation_config.json)."""
    path = Path(drafter) / "generation_config.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("num_assistant_tokens")


def checkpoint_dtype(name_or_path: str) -> str | None:
    """The dtype a checkpoint is stored in (`dtype`, or the older `torch_dtype`, of its config)."""
    try:
        config = _config_dict(name_or_path)
    except OSError:  # a Hub id that is not cached (offline): vLLM decides
        return None
    for section in (config, config.get("text_config") or {}):
        for key in ("dtype", "torch_dtype"):
            if isinstance(section.get(key), str):
                return section[key]
    return None


def served_dtype(model: str, dtype: str = "auto") -> str:
    """The `--dtype` the server is started with: `dtype`, except `auto` on a CPU without
    bfloat16 instructions, which keeps a float32 checkpoint in float32.

    vLLM's `auto` downcasts float32 checkpoints to the platform's first dtype, and its CPU
    platform lists bfloat16 first on every x86 and Arm CPU, with or without bf16 instructions.
    Without them bf16 is emulated: a float32 SmolLM2-135M served ≈4× fewer tokens/s in bf16
    than in float32 on one core of an AVX2 CPU, and 35 of 47 greedy replies differed from
    float32's (bench/results, README). Keeping float32 there is also what transformers'
    `dtype="auto"` does, so both backends then compute in the same dtype. With a GPU, or a CPU
    with bf16 instructions, vLLM's choice stands.
    """
    if dtype != "auto" or environment.has_gpu() or environment.cpu_has_native_bf16() is not False:
        return dtype
    return "float32" if checkpoint_dtype(model) == "float32" else dtype
