"""The one-screen end of `sd2 run`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sd2_hf.pipeline.records import PROVENANCE_FILE, PipelineResult
from sd2_hf.stages import BY_NAME, STAGES
from sd2_hf.utils.io import read_json


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s"


def _drafter_sparsity(path: str) -> str:
    """Sparsity of the targeted layers as the stage that wrote `path` recorded it."""
    directory = Path(path)
    for stage in reversed(STAGES):
        if stage.sparsity_record is None:
            continue
        name, keys = stage.sparsity_record
        if (directory / name).is_file():
            value: Any = read_json(directory / name)
            for key in keys:
                value = value.get(key) if isinstance(value, dict) else None
            if isinstance(value, (int, float)):
                return f"{value:.1%}"
    return "-"


def summary(result: PipelineResult) -> str:
    """The one-screen end of `sd2 run`: stages, MAL per drafter, MACs, sparsity, where things are."""
    lines = [
        "",
        f"sd2 run {result.recipe}: {result.root}  ({_duration(result.seconds)})",
        f"  {'stage':<9}{'status':<14}{'time':>8}  details",
    ]
    for o in result.outcomes:
        note = BY_NAME[o.name].note(o.record["result"]) if o.record else o.reason
        time_text = _duration(o.seconds) if o.status in ("ran", "resumed") else "-"
        lines.append(f"  {o.name:<9}{o.status:<14}{time_text:>8}  {note}")

    eval_dir = result.root / "eval"
    eval_outcome = result.outcome("eval")
    if eval_outcome and eval_outcome.record and (eval_dir / "eval.json").is_file():
        report = read_json(eval_dir / "eval.json")
        lines += [
            "",
            f"  MAL on {report['num_prompts']} prompts of {report['prompts']['source']} "
            f"(K={report['num_draft_tokens']}, {report['backend']}, target {report['target']})",
            f"  {'drafter':<12}{'MAL':>7}{'MACs vs target':>16}{'sparsity':>10}"
            f"{'improvement':>13}{'time vs target':>16}{'tokens/s':>10}{'speedup':>9}"
            f"{'lossless':>10}",
        ]
        for row in report["drafters"]:
            mal = f"{row['mal']:.3f}" if row["mal"] is not None else "-"
            rel = f"{row['relative_macs']:.1%}" if row.get("relative_macs") is not None else "-"
            sparsity = _drafter_sparsity(row["path"]) if row["kind"] == "model" else "-"
            gain = row.get("improvement_factor")
            gain_text = f"{gain:.3f}" if gain is not None else "-"
            lossless = (
                ("ok" if row["lossless_mismatches"] == 0 else f"{row['lossless_mismatches']} diff")
                if row.get("lossless_checked")
                else "-"
            )
            cost = row.get("measured_cost")
            cost_text = f"{cost:.1%}" if cost is not None else "-"
            speed = row.get("tokens_per_second")
            speed_text = f"{speed:.1f}" if speed else "-"
            speedup = row.get("speedup")
            speedup_text = f"{speedup:.2f}x" if speedup else "-"
            lines.append(
                f"  {row['name']:<12}{mal:>7}{rel:>16}{sparsity:>10}{gain_text:>13}"
                f"{cost_text:>16}{speed_text:>10}{speedup_text:>9}{lossless:>10}"
            )
        by_name = {row["name"]: row for row in report["drafters"]}
        sd2, pruned = by_name.get("sd2"), by_name.get("pruned")
        if sd2 and pruned and sd2["mal"] and pruned["mal"]:
            lines += _comparison(sd2, pruned, "greedy", report["num_prompts"])
            for t in report.get("sampled_temperatures") or []:
                a = sd2.get("sampled", {}).get(f"{t:g}")
                b = pruned.get("sampled", {}).get(f"{t:g}")
                if a and b and a["mal"] and b["mal"]:
                    lines += _comparison(a, b, f"T={t:g}", report["num_prompts"])
        if sd2 and sd2.get("best_num_draft_tokens"):
            best = next(
                s
                for s in sd2["draft_length_sweep"]
                if s["num_draft_tokens"] == sd2["best_num_draft_tokens"]
            )
            lines.append(
                f"  best K for the SD² drafter: {best['num_draft_tokens']} (improvement factor "
                f"{best['improvement_factor']:.3f}, greedy sweep in eval.md); "
                "`sd2 export --eval-json` with this eval.json (`--eval-drafter sd2`) writes it into the "
                "drafter's generation_config.json"
            )
        plots = "mal_per_category.png, acceptance_per_position.png, mal_vs_macs.png"
        if report.get("sampled_temperatures"):
            plots += ", mal_by_temperature.png"
        lines.append(f"  report    {eval_dir / 'eval.md'}\n  plots     {eval_dir}/{plots}")
    export_outcome = result.outcome("export")
    if export_outcome and export_outcome.record:
        lines.append(f"  drafter   {result.root / 'export'}  (model card: README.md)")
    lines.append(f"  provenance {result.root / PROVENANCE_FILE}")
    return "\n".join(lines)


def _comparison(sd2: dict, pruned: dict, how: str, num_prompts: int) -> list[str]:
    """The SD² drafter against the pruned one before fine-tuning, with a paired-bootstrap 95%
    interval over the prompts when both rows have per-prompt counts."""
    from sd2_hf.evaluation.report import mal_ratio_interval

    ratio = sd2["mal"] / pruned["mal"]
    verdict = "above" if sd2["mal"] > pruned["mal"] else "NOT above"
    interval = mal_ratio_interval(sd2.get("per_prompt") or [], pruned.get("per_prompt") or [])
    line = (
        f"  SD² drafter MAL {sd2['mal']:.3f} is {verdict} the un-fine-tuned pruned drafter's "
        f"{pruned['mal']:.3f} ({how}, x{ratio:.3f}"
    )
    if interval is not None:
        line += (
            f", 95% CI x{interval[1]:.3f}-x{interval[2]:.3f}, paired bootstrap over "
            f"{num_prompts} prompts"
        )
    return [line + ")"]
