"""`run_prune`: the pruning stage, from a model to a pruned checkpoint and its reports.

Outputs (in `config.output`, written to a temporary sibling directory and moved into place
only when complete):
- method `oneshot`: the checkpoint + tokenizer, llm-compressor's `recipe.yaml`, and
  `sparsity_report.json` (per-layer sparsity/structure, global sparsity, the recipe as run,
  calibration settings, times, versions);
- method `layers`: the smaller checkpoint + tokenizer, `layer_distances.json` (distance of
  every candidate start block for every block count, the choice, MACs before/after) and
  `layer_distances.png`;
- method `width`: the smaller checkpoint + tokenizer and `width_report.json` (the kept MLP
  channels of every block, MACs before/after).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from sd2_hf.pruning.config import PruneConfig, PruneInputError, PruneResult
from sd2_hf.pruning.head import apply_head_options, head_summary, untie_head
from sd2_hf.utils.io import atomic_write_json
from sd2_hf.utils.provenance import package_versions
from sd2_hf.utils.verbosity import llmcompressor_logging

PRUNING_PACKAGES = ("sd2-hf", "torch", "transformers", "llmcompressor", "compressed-tensors")

logger = logging.getLogger(__name__)

MACS_CONTEXT_LENGTH = 512


def run_prune(config: PruneConfig) -> PruneResult:
    """Prune `config.model` as configured and write the results to `config.output`."""
    if config.method == "oneshot":
        with llmcompressor_logging():  # its per-layer log lines only with `sd2 -v`
            return _run_prune(config)
    return _run_prune(config)


def _run_prune(config: PruneConfig) -> PruneResult:
    start = time.perf_counter()
    output = Path(config.output)
    if output.exists() and any(output.iterdir()) and not config.overwrite:
        raise PruneInputError(
            f"output directory {output} exists and is not empty; choose another `output` "
            "or set `overwrite`"
        )
    loaded = None
    if config.method == "oneshot":
        from sd2_hf.pruning.recipes import load_recipe

        loaded = load_recipe(config.recipe, config.sparsity)  # fail fast, before loading
    model, tokenizer, model_path = _load(config)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.partial-"))
    try:
        if loaded is not None:
            result = _prune_oneshot(config, loaded, model, tokenizer, model_path, staging)
        elif config.method == "width":
            result = _prune_width(config, model, tokenizer, model_path, staging)
        else:
            result = _prune_layers(config, model, tokenizer, model_path, staging)
        tokenizer.save_pretrained(staging)
        if output.exists():
            shutil.rmtree(output)
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    result.seconds = time.perf_counter() - start
    return result


def _load(config: PruneConfig):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sd2_hf.utils.models import resolve_model_path

    path = resolve_model_path(config.model)
    dtype = "auto" if config.dtype == "auto" else getattr(torch, config.dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.eval(), tokenizer, path


def _calibration(config: PruneConfig, tokenizer) -> list[list[int]]:
    from sd2_hf.pruning.calibration import calibration_token_ids

    if config.dataset is None:
        return []
    return calibration_token_ids(
        config.dataset, tokenizer, config.num_samples, config.max_seq_length
    )


def _calibration_info(config: PruneConfig, samples: list[list[int]]) -> dict:
    return {
        "dataset": config.dataset,
        "num_samples": len(samples),
        "requested_samples": config.num_samples,
        "max_seq_length": config.max_seq_length,
        "tokens": sum(map(len, samples)),
    }


def _prune_oneshot(config, loaded, model, tokenizer, model_path, staging: Path) -> PruneResult:
    from sd2_hf.pruning import masks
    from sd2_hf.pruning.oneshot import apply_recipe
    from sd2_hf.pruning.recipes import targeted_linears

    targeted = targeted_linears(model, loaded)
    wants_samples = (
        loaded.needs_calibration
        or config.head_sparsity is not None
        or config.draft_vocab_size is not None
    )
    samples = _calibration(config, tokenizer) if wants_samples else []
    if config.draft_vocab_size is not None or config.head_sparsity is not None:
        # Before llm-compressor dispatches the model: a head untied afterwards stays shared
        # with the embeddings in its offloaded copy, and saving then fails (seen on SmolLM2).
        untie_head(model)
    seconds = apply_recipe(model, tokenizer, loaded, samples, config.max_seq_length)
    began = time.perf_counter()
    head = apply_head_options(config, model, tokenizer, samples)
    seconds += time.perf_counter() - began
    report = masks.sparsity_report(model, targets=list(targeted), ignore=())
    # Report the recipe's own patterns, which select the same layers in any later stage.
    report["targets"], report["ignore"] = loaded.targets, loaded.ignore
    model.save_pretrained(str(staging), save_compressed=True)
    details = {
        "recipe_source": str(loaded.path),
        "recipe": loaded.yaml(),
        "modifiers": [type(m).__name__ for m in loaded.modifiers],
        **report,
    }
    result = {
        "num_layers": model.config.get_text_config().num_hidden_layers,
        "global_sparsity": report["global_sparsity"],
        "structure": report["structure"],
        "recipe": str(loaded.path),
    }
    path = staging / "sparsity_report.json"
    return _report_and_result(path, config, model_path, head, samples, seconds, details, result)


def _report_and_result(
    path: Path, config: PruneConfig, model_path, head, samples, seconds, details: dict, result: dict
) -> PruneResult:
    """Write the method's report JSON to `path` (`details` between the fields every method
    records) and return the stage's result (`result`: the method's own fields)."""
    atomic_write_json(
        path,
        {
            "model": config.model,
            "model_path": str(model_path),
            "method": config.method,
            **details,
            "head": head,
            "calibration": _calibration_info(config, samples),
            "prune_seconds": seconds,
            "versions": versions(),
        },
    )
    return PruneResult(
        output=config.output,
        method=config.method,
        head=head_summary(head),
        prune_seconds=seconds,
        calibration_samples=len(samples),
        **result,
    )


def _prune_layers(config, model, tokenizer, model_path, staging: Path) -> PruneResult:
    from sd2_hf.evaluation.macs import count_macs
    from sd2_hf.pruning.layers import (
        angular_distances,
        best_start,
        decoder_layers,
        drop_layers,
        last_token_hidden_states,
        plot_distances,
    )

    num_layers = len(decoder_layers(model))
    if config.drop is not None and config.drop >= num_layers:
        raise PruneInputError(
            f"drop = {config.drop} blocks, but the model has {num_layers} decoder layers; "
            f"allowed: 1..{num_layers - 1} (at least one block must remain)"
        )
    samples = _calibration(config, tokenizer)
    began = time.perf_counter()
    states = last_token_hidden_states(model, samples)
    distances = {n: angular_distances(states, n) for n in range(1, num_layers)}
    before = count_macs(model, MACS_CONTEXT_LENGTH)
    blocks = before.per_block()

    def kept_fraction(n: int) -> float:
        start = best_start(distances[n])
        removed = sum(blocks[f"block {i}"] for i in range(start, start + n))
        return 1 - removed / before.total

    if config.drop is not None:
        n = config.drop
    else:
        fits = [n for n in distances if kept_fraction(n) <= config.target_macs_fraction]
        if not fits:
            raise PruneInputError(
                f"target_macs_fraction = {config.target_macs_fraction} cannot be reached: "
                f"keeping one of {num_layers} blocks still leaves "
                f"{kept_fraction(num_layers - 1):.1%} of the MACs (embeddings/lm_head stay)"
            )
        n = min(fits)
    start = best_start(distances[n])
    dropped = drop_layers(model, start, n)
    head = apply_head_options(config, model, tokenizer, samples)
    seconds = time.perf_counter() - began
    after = count_macs(model, MACS_CONTEXT_LENGTH)
    model.save_pretrained(str(staging))
    plot_distances(distances, n, start, staging / "layer_distances.png")
    details = {
        "metric": "arccos(cos_sim(h_l, h_l+n)) / pi, last token, mean over samples",
        "num_layers_before": num_layers,
        "num_layers_after": num_layers - n,
        "drop": n,
        "start": start,
        "dropped_layers": dropped,
        "distances": distances[n],
        "all_distances": {str(k): v for k, v in distances.items()},
        "target_macs_fraction": config.target_macs_fraction,
        "macs_context_length": MACS_CONTEXT_LENGTH,
        "macs_before": before.total,
        "macs_after": after.total,
        "macs_fraction": after.total / before.total,
    }
    result = {
        "num_layers": num_layers - n,
        "dropped_layers": dropped,
        "macs_fraction": after.total / before.total,
    }
    path = staging / "layer_distances.json"
    return _report_and_result(path, config, model_path, head, samples, seconds, details, result)


def _prune_width(config, model, tokenizer, model_path, staging: Path) -> PruneResult:
    from sd2_hf.evaluation.macs import count_macs
    from sd2_hf.pruning.width import kept_channels, mlp_channel_importance, prune_mlp_channels

    text_config = model.config.get_text_config()
    width = text_config.intermediate_size
    keep = kept_channels(width, config.mlp_keep)
    samples = _calibration(config, tokenizer)
    before = count_macs(model, MACS_CONTEXT_LENGTH)
    began = time.perf_counter()
    importance = mlp_channel_importance(model, samples)
    kept = prune_mlp_channels(model, importance, keep)
    head = apply_head_options(config, model, tokenizer, samples)
    seconds = time.perf_counter() - began
    after = count_macs(model, MACS_CONTEXT_LENGTH)
    model.save_pretrained(str(staging))
    details = {
        "metric": "mean |act(gate(x)) * up(x)| per MLP channel over the calibration tokens",
        "mlp_keep": config.mlp_keep,
        "intermediate_size_before": width,
        "intermediate_size_after": keep,
        "kept_channels": kept,
        "macs_context_length": MACS_CONTEXT_LENGTH,
        "macs_before": before.total,
        "macs_after": after.total,
        "macs_fraction": after.total / before.total,
    }
    result = {
        "num_layers": text_config.num_hidden_layers,
        "intermediate_size": [width, keep],
        "macs_fraction": after.total / before.total,
    }
    path = staging / "width_report.json"
    return _report_and_result(path, config, model_path, head, samples, seconds, details, result)


def versions() -> dict[str, str]:
    """Versions of the packages that shape a pruned checkpoint (provenance)."""
    return package_versions(PRUNING_PACKAGES, missing="not installed")
