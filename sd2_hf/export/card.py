"""The drafter's model card (README.md), rendered from `sd2_drafter.json` with huggingface_hub.

Everything the card says comes from the export metadata, so `sd2 push` can re-render it for the
repo it pushes to. MAL figures appear only when evaluation files were attached to the export.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from sd2_hf.export.evals import selected_row

PAPER = "arxiv:2504.08838"
TAGS = ["sd2", "speculative-decoding", "sparse", "draft-model", PAPER]
FORMAT_DESCRIPTIONS = {
    "dense": "the sparse weights as plain safetensors (exact zeros), no quantization.",
    "w8a8": "compressed-tensors `int-quantized`: int8 weights (per channel, symmetric) and int8 "
    "activations (per token, dynamic), made with llm-compressor's `QuantizationModifier` on "
    "top of the sparse weights.",
    "w4a16": "compressed-tensors `pack-quantized`: int4 weights (symmetric, one scale per "
    "{group_size} input columns) with 16-bit activations, made with llm-compressor's `QuantizationModifier` on top of the sparse "
    "weights.",
    "fp8": "compressed-tensors `float-quantized`: FP8 (e4m3) weights per channel and dynamic "
    "per-token FP8 activations, made with llm-compressor's `QuantizationModifier` on top of the "
    "sparse weights.",
}


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.2%}"


def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.2f} MiB"


def _display_name(name: str | None) -> str:
    """A Hub id or asset name as given; a local path by its directory name (no machine paths)."""
    if not name:
        return "unknown"
    if name.startswith("asset:") or not Path(name).expanduser().is_absolute():
        return name
    return Path(name).name


def _projections(sparsity: dict[str, Any]) -> list[dict[str, Any]]:
    groups: dict[str, list[tuple[float, float]]] = defaultdict(list)
    after = sparsity["after_roundtrip"]["layers"]
    for name, info in sparsity["before_export"]["layers"].items():
        # `model.layers.3.self_attn.q_proj` -> `self_attn.q_proj`
        short = re.sub(r"^.*?layers\.\d+\.", "", name)
        groups[short].append((info["sparsity"], after.get(name, {}).get("sparsity", 0.0)))
    return [
        {
            "name": name,
            "count": len(values),
            "before": _pct(sum(v[0] for v in values) / len(values)),
            "after": _pct(sum(v[1] for v in values) / len(values)),
        }
        for name, values in groups.items()
    ]


def _runs(metadata: dict[str, Any]) -> list[dict[str, Any]]:
    runs = (metadata.get("eval") or {}).get("runs") or []
    shown = []
    for run in sorted(runs, key=lambda r: (r["num_draft_tokens"], r["backend"])):
        own = selected_row(run)
        shown.append(
            {
                "k": run["num_draft_tokens"],
                "backend": run["backend"],
                "num_prompts": run["num_prompts"],
                "max_new_tokens": run["max_new_tokens"],
                "drafter": run["drafter"],
                "rows": [
                    {
                        "name": f"**{row['name']}** (this model)"
                        if row["name"] == run["drafter"]
                        else row["name"],
                        "kind": row["kind"],
                        "uag": "yes" if row["uag"] else "no",
                        "mal": _num(row["mal"], 2),
                        "relative_macs": _num(row["relative_macs"], 3),
                        "improvement_factor": _num(row["improvement_factor"], 2),
                        "measured_cost": _num(row.get("measured_cost"), 3),
                        "measured_improvement_factor": _num(
                            row.get("measured_improvement_factor"), 2
                        ),
                        "tokens_per_second": _num(row["tokens_per_second"], 1),
                        "speedup": _num(row.get("speedup"), 2),
                        "mismatches": row["lossless_mismatches"]
                        if row.get("lossless_checked")
                        else "not checked",
                    }
                    for row in run["drafters"]
                ],
                "categories": [
                    {"name": cat, "mal": _num(mal, 2)}
                    for cat, mal in sorted((own.get("mal_per_category") or {}).items())
                ],
                "acceptance": " · ".join(
                    f"{i + 1}: {rate:.2f}"
                    for i, rate in enumerate(own.get("acceptance_per_position") or [])
                ),
                "sweep": " · ".join(
                    f"K={s['num_draft_tokens']}: {_num(s['mal'], 2)} / "
                    f"{_num(s.get('improvement_factor'), 2)}"
                    for s in own.get("draft_length_sweep") or []
                ),
            }
        )
    return shown


def _recipe(metadata: dict[str, Any]) -> list[tuple[str, dict[str, str]]]:
    found = metadata.get("recipe") or {}
    shown = []
    if "recipe.yaml" in found:
        shown.append(("recipe.yaml", {"lang": "yaml", "body": found["recipe.yaml"].strip()}))
    if "sparsity_report" in found:
        body = json.dumps(found["sparsity_report"], indent=2, default=str)
        shown.append(("sparsity_report.json (summary)", {"lang": "json", "body": body}))
    if metadata.get("quantization"):
        body = json.dumps(metadata["quantization"], indent=2)
        shown.append(("export quantization", {"lang": "json", "body": body}))
    return shown


def _head(metadata: dict[str, Any]) -> str:
    """How the pruning stage left the head, in words for the card's method section."""
    head = (metadata.get("recipe") or {}).get("head")
    if not head:
        return "embeddings and `lm_head` stay dense"
    parts = []
    if "draft_vocab_size" in head:
        parts.append(
            f"the head keeps the rows of the {head['draft_vocab_size']} tokens most frequent in "
            f"the distilled replies ({_pct(head.get('coverage'))} of their tokens) and the other "
            f"{head['vocab_size'] - head['draft_vocab_size']} tokens are impossible for the drafter "
            f"(logit below {head.get('logit_floor', -1e4):g} through hidden channel "
            f"{head.get('floor_channel')}, which no decoder layer reads or writes), greedy or "
            "sampled"
        )
    if "head_sparsity" in head:
        parts.append(f"the untied head is pruned with SparseGPT to {_pct(head['head_sparsity'])}")
    return (
        "; ".join(parts) + f" (head sparsity {_pct(head['zero_fraction'])}); embeddings stay dense"
    )


def render_model_card(metadata: dict[str, Any], repo_id: str | None = None) -> ModelCard:
    """The model card of an export, from its `sd2_drafter.json` content.

    `repo_id` is the Hub repo the usage snippets load the drafter from (default: the one
    recorded at export, else the model name).
    """
    card_meta = metadata["card"]
    repo = repo_id or card_meta.get("repo_id") or card_meta["model_name"]
    target = metadata.get("target_model")
    target_id = _display_name(target) if target else "TARGET_MODEL"
    uag = metadata.get("uag")
    generation = metadata["assisted_generation"]
    k = generation["num_assistant_tokens"]
    speculative = {"method": "draft_model", "model": repo, "num_speculative_tokens": k}
    if uag:
        speculative["use_heterogeneous_vocab"] = True
    sparsity = metadata["sparsity"]
    macs = metadata["macs"]

    extra: dict[str, Any] = {}
    if card_meta.get("base_model"):
        extra["base_model_relation"] = "finetune"
    hub_target = target if target and re.fullmatch(r"[\w.-]+/[\w.-]+", target) else None
    if hub_target and not Path(hub_target).exists():
        extra["target_model"] = hub_target
    tags = [*TAGS, metadata["format"]]
    if metadata["format"] != "dense":
        tags.append("compressed-tensors")
    card_data = ModelCardData(
        base_model=card_meta.get("base_model"),
        license=card_meta["license"],
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=tags,
        datasets=card_meta.get("datasets") or None,
        model_name=card_meta["model_name"],
        **extra,
    )
    template = resources.files("sd2_hf").joinpath("templates/drafter_card.md").read_text("utf-8")
    runs = _runs(metadata)
    versions = metadata.get("versions") or {}
    return ModelCard.from_template(
        card_data,
        template_str=template,
        title=card_meta["model_name"],
        target_md=f"`{_display_name(target)}`" if target else "a target model (not recorded)",
        target_id=target_id,
        uag=uag,
        sd2_version=versions.get("sd2-hf", ""),
        format=metadata["format"],
        format_description=FORMAT_DESCRIPTIONS[metadata["format"]].format(
            group_size=(metadata.get("quantization") or {}).get("group_size")
        ),
        structure=sparsity["structure"],
        sparsity_before=_pct(sparsity["global_sparsity"]),
        sparsity_after=_pct(sparsity["global_sparsity_after_roundtrip"]),
        zeros_kept=_pct(sparsity["zeros_kept"]),
        num_layers=sparsity["before_export"]["num_layers"],
        projections=_projections(sparsity),
        macs_context=macs["context_length"],
        macs=f"{macs['drafter']:,}",
        macs_dense=f"{macs['drafter_dense']:,}",
        relative_macs=_num(macs.get("relative_to_target"), 3)
        if macs.get("relative_to_target")
        else None,
        checkpoint_size=_size(metadata["checkpoint_bytes"]),
        runs=runs,
        measured_before_export=bool(runs) and metadata["format"] != "dense",
        k=k,
        threshold=generation["assistant_confidence_threshold"],
        repo=repo,
        vllm_config=json.dumps(speculative),
        recipe=_recipe(metadata),
        head=_head(metadata),
        created=metadata.get("created", ""),
        drafter=_display_name(metadata.get("drafter")),
        versions=", ".join(f"{name} {version}" for name, version in versions.items()),
    )
