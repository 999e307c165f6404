"""Where a model named on the command line or in a recipe is, checked before any work starts."""

from __future__ import annotations

from pathlib import Path

WHAT_TO_PASS = (
    "pass an existing checkpoint directory (config.json, weights, tokenizer), an `asset:` name "
    "(`sd2 assets list`) or a Hub id (org/name)"
)


def resolve_model_path(name_or_path: str) -> str:
    """`asset:<name>` → its local directory, a checkpoint directory → its absolute path, a Hub
    id → itself once the Hub (or, offline, the local cache) serves its config.json.

    Anything else raises `FileNotFoundError` saying what to pass, so a typo fails in a second,
    not after a dataset was loaded or a vLLM server started. A missing relative path such as
    `runs/x` looks like a Hub id (org/name); it is asked of the Hub, and the message names both.
    """
    from sd2_hf import assets

    name_or_path = assets.resolve_model(name_or_path)
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
