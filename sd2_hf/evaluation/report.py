"""`eval.md` and the PNG plots, both generated from the `eval.json` report dict.

Plot functions return the matplotlib Figure (so callers and tests can inspect it) and
`write_report` saves everything atomically.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

# Figures are built with the object-oriented API, not pyplot: no global figure state and no GUI
# backend (reports are written on headless servers); savefig renders PNG with Agg.
from matplotlib.figure import Figure

from sd2_hf.utils.io import atomic_write_json, atomic_write_text


def mal_ratio_interval(
    a: list[list[int]], b: list[list[int]], samples: int = 2000, seed: int = 0
) -> tuple[float, float, float] | None:
    """MAL(a) / MAL(b) and its 95% paired-bootstrap interval over prompts.

    `a`, `b`: `[draft steps, accepted tokens]` per prompt, the same prompts in the same order
    (rows' `per_prompt`). Prompts are resampled with replacement, the same draw for both
    drafters, and MAL = 1 + accepted / draft steps is recomputed on each draw. None when the
    rows do not pair up or a drafter has no draft steps."""
    import numpy as np

    if not a or len(a) != len(b):
        return None
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x[:, 0].sum() == 0 or y[:, 0].sum() == 0:
        return None

    def ratio(xs, ys):
        return (1 + xs[..., 1].sum(-1) / np.maximum(xs[..., 0].sum(-1), 1)) / (
            1 + ys[..., 1].sum(-1) / np.maximum(ys[..., 0].sum(-1), 1)
        )

    draws = np.random.default_rng(seed).integers(0, len(x), size=(samples, len(x)))
    boot = ratio(x[draws], y[draws])
    low, high = np.percentile(boot, [2.5, 97.5])
    return float(ratio(x, y)), float(low), float(high)


def code_span(text: str) -> str:
    """`text` as Markdown inline code, fenced by one more backtick than its longest run of
    backticks (a pattern such as prompts_match may hold ```)."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if longest else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def fmt(value: Any, digits: int = 3) -> str:
    """One table cell; missing values as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def to_markdown(report: dict[str, Any]) -> str:
    """The report as markdown: a summary table, MAL per category and acceptance per position."""
    drafters = report["drafters"]
    lines = _intro(report)
    lines += _summary_table(drafters)
    lines += _mal_per_category_section(drafters, report["categories"])
    lines += _acceptance_per_position_section(drafters)
    lines += _sampled_section(report)
    lines += _draft_length_section(drafters, report["num_draft_tokens"])
    lines += _accounting_section(report)
    return "\n".join(lines)


def _intro(report: dict[str, Any]) -> list[str]:
    """The title and one paragraph on the run's settings (backend, K, prompts, MACs)."""
    prompts = report["prompts"]
    return [
        f"# Speculative decoding evaluation: {report['target']}",
        "",
        f"Backend **{report['backend']}**, K = {report['num_draft_tokens']} draft tokens, max "
        f"{report['max_new_tokens']} new tokens, temperature {report['temperature']}, "
        f"{report['num_prompts']} prompts ({prompts['source']}"
        + (f", first turn matching {code_span(prompts['match'])}" if prompts.get("match") else "")
        + f", turns: {prompts['turns']}). "
        f"MACs at context length {report['macs_context_length']}; target "
        f"{fmt(report['target_macs'])} MACs per token."
        + (
            f" Drafted prompts sent {report['config']['concurrency']} at a time per category "
            "(tokens/s is server throughput)."
            if report.get("config", {}).get("concurrency", 1) > 1
            else ""
        ),
        "",
    ]


def _summary_table(drafters: list[dict[str, Any]]) -> list[str]:
    """One row per drafter: MAL, accepted tokens, MACs, improvement factor, speed, lossless."""
    header = [
        "drafter",
        "kind",
        "UAG",
        "MAL",
        "draft steps",
        "accepted tokens",
        "relative MACs",
        "improvement factor",
        "measured cost",
        "improvement (measured cost)",
        "tokens/s",
        "speedup",
        "projected speedup",
        "lossless mismatches",
    ]
    rows = [
        [
            d["name"],
            d["kind"],
            fmt(d["uag"]),
            fmt(d["mal"]),
            fmt(d["draft_steps"]),
            fmt(d["accepted_tokens"]),
            fmt(d["relative_macs"], 4),
            fmt(d["improvement_factor"]),
            fmt(d.get("measured_cost"), 4),
            fmt(d.get("measured_improvement_factor")),
            fmt(d["tokens_per_second"], 1),
            fmt(d["speedup"]) + (" ‡" if d.get("speedup_across_days") else ""),
            fmt(d.get("projected_speedup")),
            fmt(d["lossless_mismatches"]) if d["lossless_checked"] else "not checked",
        ]
        for d in drafters
    ]
    return _table(header, rows)


def _mal_per_category_section(drafters: list[dict[str, Any]], categories: list[str]) -> list[str]:
    """`## MAL per category`: one column per prompt category."""
    return [
        "",
        "## MAL per category",
        "",
        *_table(
            ["drafter", *categories],
            [
                [d["name"], *(fmt(d["mal_per_category"].get(c)) for c in categories)]
                for d in drafters
            ],
        ),
    ]


def _acceptance_per_position_section(drafters: list[dict[str, Any]]) -> list[str]:
    """`## Acceptance rate per draft position`, padded with '-'; nothing without positions."""
    positions = max((len(d["acceptance_per_position"]) for d in drafters), default=0)
    if not positions:
        return []
    return [
        "",
        "## Acceptance rate per draft position",
        "",
        *_table(
            ["drafter", *(f"pos {i + 1}" for i in range(positions))],
            [
                [d["name"], *(fmt(a) for a in d["acceptance_per_position"])]
                + ["-"] * (positions - len(d["acceptance_per_position"]))
                for d in drafters
            ],
        ),
    ]


def _sampled_section(report: dict[str, Any]) -> list[str]:
    """`## Sampled decoding`: MAL, improvement and tokens/s per sampling temperature; nothing
    when no temperature was sampled or no drafter has sampled runs."""
    temperatures = report.get("sampled_temperatures") or []
    sampled_rows = [d for d in report["drafters"] if d.get("sampled")]
    if not (temperatures and sampled_rows):
        return []
    header = ["drafter", "MAL greedy"]
    for t in temperatures:
        header += [f"MAL T={t:g}", f"improvement T={t:g}", f"tokens/s T={t:g}"]
    table = []
    for d in sampled_rows:
        cells = [d["name"], fmt(d["mal"])]
        for t in temperatures:
            run = d["sampled"].get(f"{t:g}", {})
            cells += [
                fmt(run.get("mal")),
                fmt(run.get("improvement_factor")),
                fmt(run.get("tokens_per_second"), 1),
            ]
        table.append(cells)
    return [
        "",
        "## Sampled decoding (speculative sampling)",
        "",
        "The same prompts with the target sampling at each temperature (whole distribution, "
        "no top-k/top-p) and the drafter's tokens accepted by the speculative-sampling rule, "
        f"so the output keeps the target's distribution; seed {report['config']['seed']}. "
        "Greedy is the main table's run.",
        "",
        *_table(header, table),
    ]


def _draft_length_section(drafters: list[dict[str, Any]], k: int) -> list[str]:
    """`## Draft length K`: MAL / improvement factor at each swept K, the best K in bold;
    nothing when no drafter has a sweep."""
    swept = [d for d in drafters if d.get("draft_length_sweep")]
    if not swept:
        return []
    ks = sorted({s["num_draft_tokens"] for d in swept for s in d["draft_length_sweep"]})
    table = []
    for d in swept:
        by_k = {s["num_draft_tokens"]: s for s in d["draft_length_sweep"]}
        cells = [
            d["name"],
            fmt(d.get("best_num_draft_tokens")),
            fmt(d.get("best_num_draft_tokens_measured")),
            fmt(d.get("best_num_draft_tokens_projected")),
            fmt(d["mal"]),
        ]
        for kk in ks:
            s = by_k.get(kk)
            cell = (
                "-"
                if s is None or s["mal"] is None
                else f"{fmt(s['mal'])} / {fmt(s.get('improvement_factor'))}"
                + "".join(
                    f" / {fmt(s[field])}"
                    for field in ("measured_improvement_factor", "projected_speedup")
                    if s.get(field) is not None
                )
            )
            best = kk == d.get("best_num_draft_tokens")
            cells.append(f"**{cell}**" if best else cell)
        table.append(cells)
    return [
        "",
        "## Draft length K (greedy)",
        "",
        "MAL and improvement factor MAL / (K · relative MACs + 1) at each K, from one "
        "teacher-forced drafter pass over the target's greedy output with the step rule of "
        "transformers assisted generation (`sd2_hf.evaluation.forced`). **Bold**: the K "
        "with the best improvement factor (`best K`, which `sd2 export --eval-json` writes "
        f"into generation_config.json). `measured` is this report's run at K = {k}. Where "
        "the drafter's step time was measured, a third number is the improvement factor with "
        "the measured cost ratio, and `best K (time)` the K that maximizes it; a fourth, the "
        "cost model's projected speed-up with the measured verify step (`best K (projected)`).",
        "",
        *_table(
            [
                "drafter",
                "best K",
                "best K (time)",
                "best K (projected)",
                f"MAL measured (K = {k})",
                *(f"K={kk} MAL / IF" for kk in ks),
            ],
            table,
        ),
    ]


def _accounting_section(report: dict[str, Any]) -> list[str]:
    """`## Accounting`: prompts evaluated, truncated and skipped, and how MAL, the improvement
    factor and the speedup are computed."""
    prompts = report["prompts"]
    skipped = ", ".join(f"{r}: {n}" for r, n in prompts["skipped"].items()) or "none"
    return [
        "",
        "## Accounting",
        "",
        f"- Prompts: {prompts['questions']} questions, {prompts['evaluated']} prompts evaluated, "
        f"{prompts['truncated']} truncated, skipped: {skipped}.",
        f"- {report['mal_accounting']}",
        "- Improvement factor = MAL / (K · relative MACs + 1) (Leviathan et al. cost model).",
        "- Measured cost = seconds per token of the drafter decoding alone / of the target "
        "decoding alone (greedy, batch 1, the same prompts and lengths, in the same process; the "
        "target once per process); improvement (measured cost) = MAL / (K · measured cost + 1). Unlike the MACs "
        "ratio it counts what the hardware does with zeros, the head and attention; like it, it "
        "leaves out the verify step's extra cost (the speedup column includes everything).",
        "- Speedup = tokens/s with the drafter / tokens/s of the target alone, same run; ‡: the "
        "row was measured on another day than the reused target run (a speed-up across runs). "
        "Projected speedup = MAL · t_target / (K · t_draft + t_verify(K + 1)), the cost model "
        "(`sd2_hf.evaluation.cost_model`) on the measured step times, with the target's forward "
        "over K + 1 tokens timed against its one-token forward on the same prompts.",
        "",
    ]


def _drafted(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [d for d in report["drafters"] if d["kind"] != "none" and d["mal"] is not None]


def plot_mal_per_category(report: dict[str, Any]) -> Figure:
    drafters = _drafted(report)
    categories = report["categories"]
    fig = Figure(figsize=(max(6.0, 1.1 * len(categories) + 3), 4.5))
    ax = fig.subplots()
    bars = [
        (d["name"], [d["mal_per_category"].get(c) or 0.0 for c in categories]) for d in drafters
    ]
    k = report["num_draft_tokens"]
    _grouped_mal_bars(ax, k, bars, categories, rotation=30, ha="right")
    ax.set(xlabel="Prompt category", title=f"Mean accepted length per category (K = {k})")
    return _finish(fig, ax, legend=bool(drafters))


def _grouped_mal_bars(ax, k: int, bars: list[tuple[str, list[float]]], ticks: list[str], **options):
    """MALs (up to K + 1) side by side at every tick, one bar per (label, values) of `bars`, and
    a dashed line at MAL 1 (no speed-up); `options` for the tick labels."""
    width = 0.8 / max(len(bars), 1)
    for j, (label, values) in enumerate(bars):
        xs = [i + (j - (len(bars) - 1) / 2) * width for i in range(len(ticks))]
        ax.bar(xs, values, width=width, label=label)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(ticks)), ticks, **options)
    ax.set(ylabel="MAL (tokens per verification step)", ylim=(0, k + 1.2))


def _finish(fig: Figure, ax, legend: bool) -> Figure:
    if legend:
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def plot_acceptance_per_position(report: dict[str, Any]) -> Figure:
    fig = Figure(figsize=(6.0, 4.5))
    ax = fig.subplots()
    for d in _drafted(report):
        rates = d["acceptance_per_position"]
        ax.plot(range(1, len(rates) + 1), rates, marker="o", label=d["name"])
    ax.set(
        xlabel="Draft position",
        ylabel="Acceptance rate (fraction of draft steps)",
        title="Acceptance rate per draft position",
        ylim=(0, 1.05),
    )
    ax.xaxis.get_major_locator().set_params(integer=True)
    return _finish(fig, ax, legend=bool(_drafted(report)))


def plot_mal_vs_macs(report: dict[str, Any]) -> Figure:
    """MAL against drafter MACs relative to the target (the SD² paper's figure)."""
    fig = Figure(figsize=(6.0, 4.5))
    ax = fig.subplots()
    timed = False
    for d in _drafted(report):
        if d["relative_macs"] is None:
            continue
        (dot,) = ax.plot(d["relative_macs"], d["mal"], "o", ms=6)
        ax.annotate(
            d["name"], (d["relative_macs"], d["mal"]), textcoords="offset points", xytext=(5, 4)
        )
        # The measured time ratio beside the MACs ratio: a hollow marker of the same colour.
        if d.get("measured_cost") is not None:
            timed = True
            ax.plot(
                [d["relative_macs"], d["measured_cost"]],
                [d["mal"]] * 2,
                "-",
                lw=0.8,
                alpha=0.5,
                color=dot.get_color(),
            )
            ax.plot(d["measured_cost"], d["mal"], "o", ms=6, mfc="none", color=dot.get_color())
    ax.set(
        xlabel="Drafter MACs / target MACs (filled); measured time / target time (hollow)"
        if timed
        else "Drafter MACs / target MACs",
        ylabel="MAL (tokens per verification step)",
        title="Mean accepted length vs relative drafter cost",
        ylim=(0.9, report["num_draft_tokens"] + 1.2),
    )
    ax.set_xlim(left=-0.02)
    ax.grid(alpha=0.3)
    return _finish(fig, ax, legend=False)


def plot_mal_by_temperature(report: dict[str, Any]) -> Figure:
    """MAL per drafter, greedy and at each sampled temperature."""
    temperatures = report.get("sampled_temperatures") or []
    drafters = [d for d in _drafted(report)]
    runs = [("greedy", lambda d: d["mal"])] + [
        (f"T={t:g}", lambda d, t=t: d.get("sampled", {}).get(f"{t:g}", {}).get("mal"))
        for t in temperatures
    ]
    fig = Figure(figsize=(max(6.0, 1.4 * len(drafters) + 3), 4.5))
    ax = fig.subplots()
    bars = [(label, [value(d) or 0.0 for d in drafters]) for label, value in runs]
    k = report["num_draft_tokens"]
    _grouped_mal_bars(ax, k, bars, [d["name"] for d in drafters])
    ax.set(xlabel="Drafter", title=f"MAL greedy and sampled (K = {k})")
    return _finish(fig, ax, legend=True)


def _save_png(fig: Figure, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=120)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


PLOTS = {
    "mal_per_category.png": plot_mal_per_category,
    "acceptance_per_position.png": plot_acceptance_per_position,
    "mal_vs_macs.png": plot_mal_vs_macs,
}


def write_report(report: dict[str, Any], output: str | Path) -> list[Path]:
    """Write eval.json, eval.md and the plots into `output`; returns the paths written."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    written = [
        atomic_write_json(output / "eval.json", report),
        atomic_write_text(output / "eval.md", to_markdown(report)),
    ]
    plots = dict(PLOTS)
    if report.get("sampled_temperatures"):
        plots["mal_by_temperature.png"] = plot_mal_by_temperature
    for filename, plot in plots.items():
        path = output / filename
        _save_png(plot(report), path)
        written.append(path)
    return written
