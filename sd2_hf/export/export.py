"""`sd2 export`: a sparse drafter as a checkpoint that loads in transformers and vLLM.

Today's compressed-tensors has no sparse formats any more and vLLM no sparse kernels (SPEC §4),
so sparsity travels as exact zeros in dense tensors and is *recorded* in `sd2_drafter.json`
(structure, global and per-layer sparsity, measured before export and again after a decompress
round-trip of the written checkpoint). Real compression comes from compressed-tensors quantized
formats made by llm-compressor on top of the sparse weights.

The export dir holds the HF checkpoint with a `generation_config.json` that carries the
assisted-generation settings (so `target.generate(assistant_model=drafter)` drafts K tokens per
step with no extra code), the tokenizer, `sd2_drafter.json` and the model card `README.md`.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sd2_hf.export.config import (
    DEFAULT_NUM_DRAFT_TOKENS,
    METADATA_FILE,
    W4A16_GROUP_SIZES,
    ExportConfig,
    ExportError,
)
from sd2_hf.utils.io import atomic_write_json, atomic_write_text, read_json
from sd2_hf.utils.verbosity import llmcompressor_logging

if TYPE_CHECKING:
    from sd2_hf.evaluation.macs import MacReport

logger = logging.getLogger(__name__)

# Format -> llm-compressor preset scheme. All three are data-free (round-to-nearest with
# min-max weight scales, activation scales computed per token at run time): GPTQ would move
# weights without keeping the pruned zeros (only SparseGPT has `preserve_sparsity_mask`), and
# static FP8 activation scales would need calibration data (`oneshot` fails without a dataset).
# The schemes are symmetric, so a zero weight quantizes to exactly zero and the sparsity survives.
QUANTIZATION_SCHEMES = {"w8a8": "W8A8", "w4a16": "W4A16", "fp8": "FP8_DYNAMIC"}


def _eval_section(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    from sd2_hf.export.evals import best_draft_length

    return {"runs": runs, "best_num_draft_tokens": best_draft_length(runs)[0]} if runs else None


def write_metadata_and_card(directory: Path, metadata: dict[str, Any]) -> None:
    """`sd2_drafter.json` and the model card rendered from it."""
    from sd2_hf.export.card import render_model_card

    atomic_write_json(directory / METADATA_FILE, metadata)
    atomic_write_text(directory / "README.md", str(render_model_card(metadata)).rstrip("\n") + "\n")


def add_eval_to_export(export_dir: Path, eval_json: Path, drafter: str = "sd2") -> None:
    """Put the MAL measured in `eval_json` (its entry `drafter`) into an export's metadata and
    model card, and its best draft length K into `generation_config.json` unless the export's
    K was set explicitly. The pipeline exports before it evaluates, so its export is written
    with the default K and without evaluation first; the weights are not touched."""
    from transformers import GenerationConfig

    from sd2_hf.export.evals import best_draft_length, load_eval_runs

    metadata = read_json(export_dir / METADATA_FILE)
    runs = load_eval_runs([str(eval_json)], str(export_dir), drafter)
    metadata["eval"] = _eval_section(runs)
    generation = metadata["assisted_generation"]
    if runs and generation.get("source") != "config":
        k, source = best_draft_length(runs)
        config = GenerationConfig.from_pretrained(export_dir)
        config.num_assistant_tokens = k
        config.num_assistant_tokens_schedule = "constant"
        atomic_write_text(export_dir / "generation_config.json", config.to_json_string())
        generation.update(num_assistant_tokens=k, num_assistant_tokens_schedule="constant")
        generation["source"] = source
    write_metadata_and_card(export_dir, metadata)


@dataclass
class ExportResult:
    output: str
    format: str
    checkpoint_bytes: int
    sparsity_before: float
    sparsity_after: float
    zeros_kept: float
    num_draft_tokens: int
    uag: bool | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def available_formats() -> dict[str, str | None]:
    """Each format, mapped to None when this environment can produce it, else the reason why not."""
    missing = [
        package
        for package in ("llmcompressor", "compressed_tensors")
        if importlib.util.find_spec(package) is None
    ]
    quantized = (
        f"{' and '.join(missing)} not installed (install the project's main environment: "
        "`bash scripts/setup_env.sh main`)"
        if missing
        else None
    )
    formats: dict[str, str | None] = {"dense": None, "w8a8": quantized, "w4a16": quantized}
    formats["fp8"] = quantized or _fp8_unavailable()
    return formats


def _fp8_unavailable() -> str | None:
    import torch

    if not hasattr(torch, "float8_e4m3fn"):
        return f"torch {torch.__version__} has no float8_e4m3fn dtype"
    try:
        torch.ones(4).to(torch.float8_e4m3fn).float()
    except (RuntimeError, TypeError) as err:
        return f"this torch build cannot cast to float8_e4m3fn on CPU ({err})"
    return None


def is_compressed_tensors_checkpoint(path: str | Path) -> bool:
    config = read_json(Path(path) / "config.json")
    quant = config.get("quantization_config") or config.get("compression_config") or {}
    return quant.get("quant_method") == "compressed-tensors"


def load_dequantized(path: str | Path, dtype: str = "auto"):
    """Load a checkpoint with dense floating-point weights, decompressing compressed-tensors ones.

    A plain `from_pretrained` also works (compressed-tensors decompresses on the first forward
    pass); this variant decompresses at load time so the weights can be inspected.
    """
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kwargs: dict[str, Any] = {"dtype": dtype}
    if is_compressed_tensors_checkpoint(path):
        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    return AutoModelForCausalLM.from_pretrained(str(path), **kwargs).eval()


def checkpoint_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def run_export(config: ExportConfig) -> ExportResult:
    """Write the export dir (checkpoint, tokenizer, sd2_drafter.json, README.md) atomically."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sd2_hf.evaluation.macs import count_macs
    from sd2_hf.export.evals import load_eval_runs
    from sd2_hf.pruning.masks import find_target_linears, sparsity_report

    _check_format(config.format)
    output = Path(config.output).expanduser()
    _check_output(output, config.overwrite)
    drafter_path = _resolve_drafter(config.drafter)
    runs = load_eval_runs(config.eval_json, drafter_path, config.eval_drafter)
    target = config.target or (runs[0]["target"] if runs else None)
    k, k_source = _draft_length(config, runs)

    with tqdm(total=5, desc=f"export {config.format}", unit="step") as bar:
        bar.set_postfix_str("load")
        model = AutoModelForCausalLM.from_pretrained(drafter_path, dtype=config.dtype).eval()
        tokenizer = AutoTokenizer.from_pretrained(drafter_path)
        linears = find_target_linears(model, config.targets, config.ignore)
        if not linears:
            raise ExportError(
                f"no layer of the drafter matches targets={config.targets} ignore={config.ignore}; "
                "use llm-compressor syntax: a class name (Linear), a module name or `re:<regex>`"
            )
        group_size = _group_size(config, linears) if config.format == "w4a16" else None
        with torch.no_grad():
            pruned = {name: module.weight == 0 for name, module in linears.items()}
        before = sparsity_report(model, config.targets, config.ignore)
        macs = count_macs(model, config.context_length)
        target_macs, uag = _target_costs(target, drafter_path, config.context_length)
        bar.update()

        model.generation_config.num_assistant_tokens = k
        model.generation_config.num_assistant_tokens_schedule = "constant"
        model.generation_config.assistant_confidence_threshold = (
            config.assistant_confidence_threshold
        )

        with _staging_dir(output) as staging:
            bar.set_postfix_str("quantize" if config.format != "dense" else "save")
            quantization = _save_checkpoint(model, tokenizer, config, group_size, staging)
            del model
            bar.update()

            bar.set_postfix_str("round-trip")
            reloaded = load_dequantized(staging)
            after = sparsity_report(reloaded, config.targets, config.ignore)
            zeros_kept = _zeros_kept(pruned, reloaded, after, config)
            del reloaded
            bar.update()

            bar.set_postfix_str("metadata")
            metadata = _export_metadata(
                config,
                output,
                staging,
                drafter_path=drafter_path,
                runs=runs,
                target=target,
                uag=uag,
                k=k,
                k_source=k_source,
                quantization=quantization,
                before=before,
                after=after,
                zeros_kept=zeros_kept,
                macs=macs,
                target_macs=target_macs,
            )
            write_metadata_and_card(staging, metadata)
            bar.update()
        bar.update()

    result = ExportResult(
        output=str(output),
        format=config.format,
        checkpoint_bytes=metadata["checkpoint_bytes"],
        sparsity_before=before["global_sparsity"],
        sparsity_after=after["global_sparsity"],
        zeros_kept=zeros_kept,
        num_draft_tokens=k,
        uag=uag,
    )
    print(summary(metadata, output))
    return result


def _check_format(format: str) -> None:
    """Raise `ExportError` when this environment cannot produce `format`, naming why and the
    formats it can produce."""
    formats = available_formats()
    if formats[format] is not None:
        possible = [name for name, reason in formats.items() if reason is None]
        raise ExportError(
            f"format {format!r} cannot be produced in this environment: "
            f"{formats[format]}. Formats it can produce: {', '.join(possible)}"
        )


def _resolve_drafter(drafter: str) -> str:
    """The drafter's checkpoint path; `ExportError` when it cannot be found or is quantized
    already."""
    from sd2_hf.utils.models import resolve_model_path

    try:
        drafter_path = resolve_model_path(drafter)
    except FileNotFoundError as err:
        raise ExportError(f"drafter: {err}") from None
    if Path(drafter_path).is_dir() and is_compressed_tensors_checkpoint(drafter_path):
        raise ExportError(
            f"drafter {drafter} is already a compressed-tensors (quantized) checkpoint; "
            "export from the unquantized sparse checkpoint instead"
        )
    return drafter_path


def _draft_length(config: ExportConfig, runs: list[dict[str, Any]]) -> tuple[int, str]:
    """K and where it comes from: the config's, else the best measured in `runs`, else the
    default."""
    from sd2_hf.export.evals import best_draft_length

    if config.num_draft_tokens is not None:
        return config.num_draft_tokens, "config"
    if runs:
        return best_draft_length(runs)
    return DEFAULT_NUM_DRAFT_TOKENS, "default"


def _target_costs(
    target: str | None, drafter_path: str, context_length: int
) -> tuple[MacReport | None, bool | None]:
    """The target's MACs at `context_length` and whether the drafter needs UAG with it (a
    different vocabulary); (None, None) without a target."""
    from sd2_hf.evaluation.macs import count_macs
    from sd2_hf.utils.models import resolve_model_path, vocabularies_differ

    target_path = resolve_model_path(target) if target else None
    target_macs = count_macs(target_path, context_length) if target_path else None
    uag = vocabularies_differ(target_path, drafter_path) if target_path else None
    return target_macs, uag


@contextmanager
def _staging_dir(output: Path) -> Iterator[Path]:
    """A fresh directory next to `output` to write the export into; renamed to `output` (which
    it replaces) when the block succeeds, deleted when it fails or is interrupted."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent)
    )
    try:
        yield staging
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _save_checkpoint(
    model, tokenizer, config: ExportConfig, group_size: int | None, staging: Path
) -> dict[str, Any] | None:
    """Save the drafter (quantized first unless the format is dense) and its tokenizer to
    `staging`; returns the quantization record (None for dense)."""
    quantization = None
    if config.format == "dense":
        model.save_pretrained(staging)
    else:
        quantization = _quantize(model, config, group_size)
        model.save_pretrained(staging, save_compressed=True)
        written = read_json(staging / "config.json")["quantization_config"]
        quantization["compressed_tensors_format"] = written["format"]
    tokenizer.save_pretrained(staging)
    return quantization


def _export_metadata(
    config: ExportConfig,
    output: Path,
    staging: Path,
    *,
    drafter_path: str,
    runs: list[dict[str, Any]],
    target: str | None,
    uag: bool | None,
    k: int,
    k_source: str,
    quantization: dict[str, Any] | None,
    before: dict[str, Any],
    after: dict[str, Any],
    zeros_kept: float,
    macs: MacReport,
    target_macs: MacReport | None,
) -> dict[str, Any]:
    """The content of sd2_drafter.json (the model card is rendered from it)."""
    from sd2_hf.pruning.runner import versions

    return {
        "sd2_hf_export": 1,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "format": config.format,
        "quantization": quantization,
        "drafter": config.drafter,
        "target_model": target,
        "uag": uag,
        "assisted_generation": {
            "num_assistant_tokens": k,
            "num_assistant_tokens_schedule": "constant",
            "assistant_confidence_threshold": config.assistant_confidence_threshold,
            "source": k_source,
        },
        "sparsity": {
            "structure": before["structure"],
            "global_sparsity": before["global_sparsity"],
            "global_sparsity_after_roundtrip": after["global_sparsity"],
            "zeros_kept": zeros_kept,
            "before_export": before,
            "after_roundtrip": after,
        },
        "macs": {
            "context_length": config.context_length,
            "drafter": macs.total,
            "drafter_dense": macs.dense_total,
            "target": target_macs.total if target_macs else None,
            "relative_to_target": macs.total / target_macs.total if target_macs else None,
        },
        "checkpoint_bytes": checkpoint_bytes(staging),
        "recipe": _recipe(drafter_path),
        "eval": _eval_section(runs),
        "card": {
            "model_name": config.model_name or output.name,
            "base_model": config.base_model or _hub_id(config.drafter),
            "license": config.license,
            "datasets": config.datasets,
            "repo_id": config.repo_id,
        },
        "versions": versions(),
    }


def _check_output(output: Path, overwrite: bool) -> None:
    if not output.exists():
        return
    if not output.is_dir() or any(output.iterdir()):
        # Only an earlier export is replaced: never delete a directory we did not write.
        if not overwrite:
            raise ExportError(f"output {output} exists and is not empty: pass --overwrite")
        if not (output / METADATA_FILE).is_file():
            raise ExportError(
                f"output {output} exists and is not an sd2 export (no {METADATA_FILE}); "
                "choose a new directory"
            )


def _group_size(config: ExportConfig, linears: dict) -> int:
    widths = sorted({module.weight.shape[1] for module in linears.values()})
    candidates = [config.group_size] if config.group_size else list(W4A16_GROUP_SIZES)
    for size in candidates:
        if all(width % size == 0 for width in widths):
            return size
    raise ExportError(
        f"w4a16 needs a group size that divides the input width of every quantized layer "
        f"({', '.join(map(str, widths))}); tried {', '.join(map(str, candidates))}: pass "
        "--group-size G, or leave the odd layers out with --ignore"
    )


def _quantize(model, config: ExportConfig, group_size: int | None) -> dict[str, Any]:
    from compressed_tensors.quantization import preset_name_to_scheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    name = QUANTIZATION_SCHEMES[config.format]
    scheme = preset_name_to_scheme(name, config.targets)
    if group_size is not None:
        weights = scheme.weights.model_copy(update={"group_size": group_size})
        scheme = scheme.model_copy(update={"weights": weights})
    with llmcompressor_logging():  # its per-layer lines only with `sd2 -v`
        oneshot(
            model=model,
            recipe=QuantizationModifier(config_groups={"group_0": scheme}, ignore=config.ignore),
        )
    return {
        "tool": "llmcompressor.QuantizationModifier",
        "scheme": name,
        "group_size": group_size,
        "targets": config.targets,
        "ignore": config.ignore,
    }


def _zeros_kept(pruned: dict, reloaded, after: dict, config: ExportConfig) -> float:
    """Fraction of the pruned (zero) weights that are still exactly zero after the round-trip.

    Per layer it also goes into `after["layers"][name]["zeros_kept"]`.
    """
    from sd2_hf.pruning.masks import find_target_linears

    layers = find_target_linears(reloaded, config.targets, config.ignore)
    kept = total = 0
    for name, mask in pruned.items():
        was_zero = int(mask.sum().item())
        still_zero = int(((layers[name].weight == 0) & mask).sum().item())
        after["layers"][name]["zeros_kept"] = still_zero / was_zero if was_zero else 1.0
        kept += still_zero
        total += was_zero
    return kept / total if total else 1.0


def _recipe(drafter_path: str) -> dict[str, Any] | None:
    """The pruning recipe and report the pruning stage left next to the drafter, if any."""
    from sd2_hf.pruning.head import head_summary

    directory = Path(drafter_path)
    found: dict[str, Any] = {}
    if (directory / "recipe.yaml").is_file():
        found["recipe.yaml"] = (directory / "recipe.yaml").read_text(encoding="utf-8")
    # A cheaper head (`sd2 prune --draft-vocab-size / --head-sparsity`) is in the report of
    # either pruning method; it is kept without the kept token ids.
    for name in ("sparsity_report.json", "layer_distances.json"):
        if not (directory / name).is_file():
            continue
        report = read_json(directory / name)
        if report.get("head"):
            found["head"] = head_summary(report["head"])
        if name == "sparsity_report.json":
            found["sparsity_report"] = {k: v for k, v in report.items() if k != "layers"}
            if "head" in found:
                found["sparsity_report"]["head"] = found["head"]
    return found or None


def _hub_id(name: str | None) -> str | None:
    """`name` when it is a Hub repo id (not a local path or an asset), else None."""
    import re

    if not name or name.startswith("asset:") or Path(name).expanduser().exists():
        return None
    return name if re.fullmatch(r"[\w.-]+/[\w.-]+", name) else None


def summary(metadata: dict[str, Any], output: Path) -> str:
    sparsity = metadata["sparsity"]
    generation = metadata["assisted_generation"]
    macs = metadata["macs"]
    lines = [
        f"exported drafter → {output}",
        f"  format            {metadata['format']}"
        + (
            f" ({metadata['quantization']['scheme']}, compressed-tensors "
            f"{metadata['quantization']['compressed_tensors_format']})"
            if metadata["quantization"]
            else " (safetensors)"
        ),
        f"  checkpoint        {metadata['checkpoint_bytes'] / 2**20:.2f} MiB",
        f"  sparsity          {sparsity['global_sparsity']:.2%} {sparsity['structure']} before, "
        f"{sparsity['global_sparsity_after_roundtrip']:.2%} after round-trip, "
        f"{sparsity['zeros_kept']:.2%} of the zeros kept",
        f"  MACs/step         {macs['drafter']:,}"
        + (
            f" ({macs['relative_to_target']:.2%} of the target)"
            if macs["relative_to_target"]
            else ""
        ),
        f"  target            {metadata['target_model'] or 'unknown'}"
        + ("" if metadata["uag"] is None else f" (UAG: {'yes' if metadata['uag'] else 'no'})"),
        f"  generate()        K={generation['num_assistant_tokens']} ({generation['source']}), "
        f"schedule constant, confidence threshold {generation['assistant_confidence_threshold']}",
        f"  card              {output / 'README.md'}",
    ]
    return "\n".join(lines)
