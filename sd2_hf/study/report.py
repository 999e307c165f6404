"""The one report of every study: `study.json`, `study.md`, a MAL-vs-MACs plot per evaluation and
a plot per curve.

The report is built from the evaluations' `eval.json` (and `eval-reference.json`, for the
prompts' categories) under the study directory; `study.json` keeps everything the markdown and
plots need (rows with their per-prompt counts, no local paths), so a report can be rendered
again from a committed `study.json` alone (`sd2 compare --report-only`). With the study's
`results` directory set, the three files are also written there (e.g. under `bench/results/`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from sd2_hf.evaluation.report import (
    _finish,
    _save_png,
    _table,
    code_span,
    fmt,
    mal_ratio_interval,
    plot_mal_vs_macs,
)
from sd2_hf.evaluation.runner import REFERENCE_FILE, today
from sd2_hf.pipeline.records import read_record
from sd2_hf.study.config import public
from sd2_hf.utils.io import atomic_write_json, atomic_write_text, read_json

ROW_FIELDS = (
    "name",
    "kind",
    "mal",
    "mal_per_category",
    "relative_macs",
    "improvement_factor",
    "best_num_draft_tokens",
    "draft_length_sweep",
    "measured_cost",
    "measured_improvement_factor",
    "best_num_draft_tokens_measured",
    "projected_speedup",
    "best_num_draft_tokens_projected",
    "tokens_per_second",
    "speedup",
    "lossless_checked",
    "lossless_mismatches",
    "per_prompt",
    "measured",
    "speedup_across_days",
    "chosen_k",
)
SAMPLED_ROW_FIELDS = (
    "mal",
    "mal_per_category",
    "improvement_factor",
    "tokens_per_second",
    "per_prompt",
)


def _row(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: row.get(k) for k in ROW_FIELDS}
    out["sampled"] = {
        t: {k: s.get(k) for k in SAMPLED_ROW_FIELDS} for t, s in (row.get("sampled") or {}).items()
    }
    return out


def _evaluation(directory: Path) -> dict[str, Any] | None:
    """An evaluation's report reduced to what the study report shows."""
    if not (directory / "eval.json").is_file():
        return None
    report = read_json(directory / "eval.json")
    categories = None
    if (directory / REFERENCE_FILE).is_file():
        categories = [p["category"] for p in read_json(directory / REFERENCE_FILE)["prompts"]]
    return {
        "backend": report["backend"],
        "num_draft_tokens": report["num_draft_tokens"],
        "max_new_tokens": report["max_new_tokens"],
        "temperature": report["temperature"],
        "sampled_temperatures": report.get("sampled_temperatures") or [],
        "num_prompts": report["num_prompts"],
        "prompts": public(report["prompts"]["source"]),
        "prompts_match": report["prompts"].get("match"),
        "served_dtype": report.get("served_dtype"),
        "prompt_categories": categories,
        "drafters": [_row(r) for r in report["drafters"]],
    }


def _ratio(a: dict[str, Any], b: dict[str, Any], categories: list[str] | None) -> dict | None:
    """MAL(a) / MAL(b) with its paired-bootstrap interval, overall and per category; from the
    MALs alone (no interval) for rows without per-prompt counts (reports converted from an
    earlier bench)."""
    overall = mal_ratio_interval(a.get("per_prompt") or [], b.get("per_prompt") or [])
    if overall is None:
        if not a.get("mal") or not b.get("mal"):
            return None
        per_category = {
            c: (m / b["mal_per_category"][c], None, None)
            for c, m in sorted((a.get("mal_per_category") or {}).items())
            if m and (b.get("mal_per_category") or {}).get(c)
        }
        return {
            "ratio": a["mal"] / b["mal"],
            "low": None,
            "high": None,
            "per_category": per_category,
        }
    per_category = {}
    pa, pb = a["per_prompt"], b["per_prompt"]
    if categories and len(categories) == len(pa):
        for category in sorted(set(categories)):
            index = [i for i, c in enumerate(categories) if c == category]
            per_category[category] = mal_ratio_interval(
                [pa[i] for i in index], [pb[i] for i in index]
            )
    return {
        "ratio": overall[0],
        "low": overall[1],
        "high": overall[2],
        "per_category": per_category,
    }


def comparisons(
    pairs: list[tuple[str, str]],
    evaluations: dict[str, Any],
    drafters: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """MAL(A) / MAL(B) with paired-bootstrap intervals, in every evaluation (and at every
    sampled temperature) where both drafters were measured. With the report's `drafters` (their
    build chains), a pair built from different builds of a drafter they share (one row carried
    from a run before that drafter was rebuilt) is flagged `mixed_builds`."""
    out = []
    for a, b in pairs:
        for name, ev in evaluations.items():
            rows = {r["name"]: r for r in ev["drafters"]}
            pair = _pair(rows, a, b)
            if pair is None:
                continue
            row_a, row_b = pair
            runs = [
                (lbl, t)
                for lbl, t in _decodings(ev, row_a)
                if t is None or t in (row_b.get("sampled") or {})
            ]
            # Properties of the pair of rows, the same at every decoding.
            flags = {}
            if row_a is not rows[a] or row_b is not rows[b]:
                flags["earlier_partner"] = True
            if drafters and _mixed_builds(drafters, a, b, row_a, row_b):
                flags["mixed_builds"] = True
            for label, t in runs:
                ra, rb = (row_a, row_b) if t is None else (row_a["sampled"][t], row_b["sampled"][t])
                ratio = _ratio(ra, rb, ev["prompt_categories"])
                if ratio is not None:
                    out.append(
                        {"a": a, "b": b, "evaluation": name, "decoding": label, **ratio, **flags}
                    )
    return out


def _ancestors(drafters: dict[str, Any], name: str) -> list[str]:
    """The drafters `name` was built from, nearest first (each chain starts at its base)."""
    out: list[str] = []
    while True:
        chain = (drafters.get(name) or {}).get("chain") or []
        base = chain[0] if chain else None
        if base is None or base == name or base not in drafters or base in out:
            return out
        out.append(base)
        name = base


def _mixed_builds(
    drafters: dict[str, Any], a: str, b: str, row_a: dict[str, Any], row_b: dict[str, Any]
) -> bool:
    """Whether `a` and `b` descend from different builds of a drafter they share: a row's
    `against` holds the build it descends from where that drafter was rebuilt since (else it
    descends from the build measured in this report)."""
    shared = set(_ancestors(drafters, a)) & set(_ancestors(drafters, b))
    for x in shared:
        pa, pb = (row_a.get("against") or {}).get(x), (row_b.get("against") or {}).get(x)
        if (pa is None) != (pb is None) or (pa is not None and not _same_counts(pa, pb)):
            return True
    return False


def _decodings(ev: dict[str, Any], row: dict[str, Any]) -> list[tuple[str, str | None]]:
    """The runs of an evaluation's row: its main decoding, then each sampled temperature."""
    main = "greedy" if not ev["temperature"] else f"T={ev['temperature']:g}"
    return [(main, None)] + [(f"T={t}", t) for t in row.get("sampled") or {}]


# Past this multiple of the largest measured x, the report gives the fit's x at the goal no
# weight (two nearly flat points extrapolate to x ≈ 1e28).
FAR_EXTRAPOLATION = 1000


def fit_curve(
    points: list[dict[str, Any]], log_x: bool, goal: float | None
) -> dict[str, Any] | None:
    """Least-squares line of the MAL ratio against x (log10 x with `log_x`) and, with a `goal`
    ratio, the x where the line reaches it (an extrapolation past the measured points; None
    where the slope is not positive). None with fewer than two distinct x."""
    import math

    us = [math.log10(p["x"]) if log_x else p["x"] for p in points]
    if len(set(us)) < 2:
        return None
    n = len(us)
    mean_u, mean_r = sum(us) / n, sum(p["ratio"] for p in points) / n
    slope = sum((u - mean_u) * (p["ratio"] - mean_r) for u, p in zip(us, points)) / sum(
        (u - mean_u) ** 2 for u in us
    )
    fit = {"slope": slope, "intercept": mean_r - slope * mean_u, "per": "decade" if log_x else "x"}
    if goal is not None:
        at = (goal - fit["intercept"]) / slope if slope > 0 else None
        fit["goal"] = goal
        fit["x_at_goal"] = (10**at if log_x else at) if at is not None else None
    return fit


def curves(study_curves: dict[str, Any], evaluations: dict[str, Any]) -> dict[str, Any]:
    """Each curve's points (MAL ratio over its baseline with the paired interval) in every
    evaluation and decoding where the baseline and some point were measured, with the fit."""
    out = {}
    for name, curve in study_curves.items():
        series = []
        for ev_name, ev in evaluations.items():
            rows = {r["name"]: r for r in ev["drafters"]}
            base = rows.get(curve["baseline"])
            if base is None:
                continue
            for label, t in _decodings(ev, base):
                b = base if t is None else base["sampled"][t]
                points = []
                for drafter, x in sorted(curve["points"].items(), key=lambda kv: kv[1]):
                    pair = _pair(rows, drafter, curve["baseline"])
                    if pair is None:
                        continue
                    row, own_base = pair
                    a = row if t is None else (row.get("sampled") or {}).get(t)
                    b_own = own_base if t is None else (own_base.get("sampled") or {}).get(t)
                    ratio = _ratio(a, b_own, None) if a and b_own else None
                    if ratio is not None:
                        interval = {k: ratio[k] for k in ("ratio", "low", "high")}
                        point = {"drafter": drafter, "x": x, "mal": a["mal"], **interval}
                        if own_base is not base:
                            point["earlier_partner"] = True
                        points.append(point)
                if points:
                    fit = fit_curve(points, curve["log_x"], curve.get("goal"))
                    series.append(
                        {
                            "evaluation": ev_name,
                            "decoding": label,
                            "baseline_mal": b["mal"],
                            "points": points,
                            "fit": fit,
                        }
                    )
        out[name] = {**curve, "series": series}
    return out


def plot_curve(curve: dict[str, Any]) -> Figure:
    """MAL gain over the baseline (%) against x, one line per evaluation and decoding, with the
    paired-bootstrap intervals as error bars and the goal as a dashed line."""
    fig = Figure(figsize=(6.0, 4.5))
    ax = fig.subplots()
    for s in curve["series"]:
        xs = [p["x"] for p in s["points"]]
        ys = [100 * (p["ratio"] - 1) for p in s["points"]]
        # Error bars from the paired intervals (none for rows without per-prompt counts).
        err = [
            [100 * (p["ratio"] - (p["low"] or p["ratio"])) for p in s["points"]],
            [100 * ((p["high"] or p["ratio"]) - p["ratio"]) for p in s["points"]],
        ]
        ax.errorbar(
            xs, ys, yerr=err, marker="o", capsize=3, label=f"{s['evaluation']}, {s['decoding']}"
        )
    if curve.get("goal"):
        ax.axhline(100 * (curve["goal"] - 1), ls="--", color="grey", lw=1, label="goal")
    ax.axhline(0, color="black", lw=0.6)
    if curve["log_x"]:
        ax.set_xscale("log")
        # The points' own x as ticks: matplotlib's log labels (3×10², 4×10²) run together.
        ticks = sorted({p["x"] for s in curve["series"] for p in s["points"]})
        ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
        ax.minorticks_off()
    ax.set(
        xlabel=curve["x_label"],
        ylabel=f"MAL gain over {curve['baseline']} (%)",
        title=f"MAL gain against {curve['x_label']}",
    )
    ax.grid(alpha=0.3)
    return _finish(fig, ax, legend=True)


def stage_seconds(planned: Any) -> dict[str, float | None]:
    """Seconds of each of the drafter's stages, from their completion records."""
    seconds = {}
    for plan in planned.plans:
        record = read_record(plan.output)
        seconds[plan.name] = record.get("total_seconds") if record else None
    return seconds


# What must agree for a row of an earlier report to stand beside this run's rows.
SAME_EVALUATION = (
    "backend",
    "num_draft_tokens",
    "max_new_tokens",
    "temperature",
    "num_prompts",
    "prompts",
    "prompts_match",
    "served_dtype",
    "prompt_categories",
)


def carry_earlier_rows(report: dict[str, Any], earlier: dict[str, Any]) -> list[str]:
    """Add to `report` the rows of `earlier` (a previous `study.json` of the same study) for
    drafters this run did not measure, in evaluations of the same prompts and settings, with
    their drafter entries; each row keeps the date of the run that measured it (`measured`).
    Returns the carried drafter names.

    A study on a 2-core CPU takes several sessions and each session starts on a fresh machine:
    carrying rows lets a run build and measure only the drafters that are new and still report
    every comparison. MAL is computed from per-prompt counts against the same target outputs,
    so a ratio of a carried row stands; its time columns are against the target of its own run
    (the table says which run each row comes from).

    A drafter this run measured again whose per-prompt counts differ from its earlier row was
    rebuilt differently (e.g. pruned again on another CPU): a carried row is compared with
    that drafter as measured in the carried row's own run, kept in the row's `against`."""
    carried = []
    for name, ev in report["evaluations"].items():
        old = (earlier.get("evaluations") or {}).get(name)
        if not old or any(old.get(k) != ev.get(k) for k in SAME_EVALUATION):
            continue
        present = {r["name"]: r for r in ev["drafters"]}
        changed = {
            r["name"]: r
            for r in old["drafters"]
            if r["name"] in present and not _same_counts(r, present[r["name"]])
        }
        for row in old["drafters"]:
            if row["name"] in present:
                continue
            measured = row.get("measured") or earlier["date"]
            against = {k: v for k, v in changed.items() if k != row["name"]}
            against.update(row.get("against") or {})  # partners it already carried
            row = {**row, "measured": measured}
            if against:
                row["against"] = {
                    k: {**v, "measured": v.get("measured") or measured}
                    for k, v in sorted(against.items())
                }
            ev["drafters"].append(row)
            carried.append(row["name"])
            entry = (earlier.get("drafters") or {}).get(row["name"])
            if entry is not None:  # how it was built then (this run may list it unbuilt)
                report["drafters"][row["name"]] = {**entry, "measured": measured}
    return sorted(set(carried))


def carry_left_out_evaluations(
    report: dict[str, Any], earlier: dict[str, Any], names: list[str]
) -> list[str]:
    """Add to `report` the evaluations of `earlier` that this run left out
    (`evaluations.NAME=null`), whole, so a partial run does not drop their tables from the
    report it writes; each row keeps the date of the run that measured it. Returns their names."""
    carried = []
    for name in names:
        old = (earlier.get("evaluations") or {}).get(name)
        if old is None or name in report["evaluations"]:
            continue
        rows = [{**r, "measured": r.get("measured") or earlier["date"]} for r in old["drafters"]]
        report["evaluations"][name] = {**old, "drafters": rows, "carried_whole": True}
        for row in rows:
            entry = (earlier.get("drafters") or {}).get(row["name"])
            if entry is not None and row["name"] not in report["drafters"]:
                report["drafters"][row["name"]] = {**entry, "measured": row["measured"]}
        carried.append(name)
    return carried


MIXED_BUILDS_NOTE = (
    "¶ the two drafters were built from different builds of a drafter they share (it was "
    "rebuilt between their runs, e.g. pruned again on another CPU): the ratio mixes their own "
    "difference with the rebuild's."
)
EARLIER_PARTNER_NOTE = (
    "§ a carried row against the other drafter as measured in the carried row's own run: that "
    "drafter was rebuilt since and measures differently now (e.g. pruned again on another CPU)."
)


def _same_counts(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two rows of one evaluation measured the same outputs: equal per-prompt counts,
    greedy and at every sampled temperature both have."""
    if a.get("per_prompt") != b.get("per_prompt"):
        return False
    sampled_a, sampled_b = a.get("sampled") or {}, b.get("sampled") or {}
    return all(
        sampled_a[t].get("per_prompt") == sampled_b[t].get("per_prompt")
        for t in set(sampled_a) & set(sampled_b)
    )


def _pair(rows: dict[str, Any], a: str, b: str) -> tuple[dict, dict] | None:
    """The rows compared for `a vs b`: a carried row meets the other drafter as measured in its
    own run where that drafter was rebuilt since (`against`); None when either is missing."""
    if a not in rows or b not in rows:
        return None
    ra, rb = rows[a], rows[b]
    if b in (ra.get("against") or {}):
        rb = ra["against"][b]
    elif a in (rb.get("against") or {}):
        ra = rb["against"][a]
    return ra, rb


def choose_k(evaluations: dict[str, Any], on: str) -> None:
    """Each row of every evaluation but `on` gets `chosen_k`: the K that maximises the
    improvement factor on evaluation `on` (the same drafter's draft-length sweep there), with
    the MACs cost and with the row's measured time cost, and the row's own MAL and improvement
    factor at that K. The cost is the drafter's (hardware and shapes), so only the MAL per K
    comes from `on`."""
    chosen_on = {r["name"]: r for r in (evaluations.get(on) or {}).get("drafters", [])}
    for name, ev in evaluations.items():
        if name == on:
            continue
        for row in ev["drafters"]:
            picked = chosen_on.get(row["name"]) or {}
            on_mal = {
                s["num_draft_tokens"]: s["mal"]
                for s in picked.get("draft_length_sweep") or []
                if s["mal"] is not None
            }
            own = {s["num_draft_tokens"]: s["mal"] for s in row.get("draft_length_sweep") or []}
            if not on_mal or not own:
                continue
            row["chosen_k"] = {"on": on}
            for key, cost in (
                ("macs", row.get("relative_macs")),
                ("time", row.get("measured_cost")),
            ):
                if cost is None:
                    continue
                k = max(on_mal, key=lambda kk, c=cost: on_mal[kk] / (kk * c + 1))
                mal = own.get(k)
                row["chosen_k"][key] = {
                    "k": k,
                    "mal": mal,
                    "improvement_factor": None if mal is None else mal / (k * cost + 1),
                }


def build_report(
    study: Any,
    planned: dict[str, Any],
    seconds: float | None,
    earlier: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The study's report from its evaluations; with `earlier` (the previous report in the
    study's `results`), the rows of drafters this run did not measure are carried over
    (`carry_earlier_rows`) before the comparisons are computed."""
    day = today()
    evaluations = {}
    for name in study.evaluations:
        ev = _evaluation(study.root / "eval" / name)
        if ev is not None:
            for row in ev["drafters"]:
                # The day the evaluation measured it (rows journaled before dates: this run's).
                row["measured"] = row.get("measured") or day
            evaluations[name] = ev
    report = {
        "name": study.name,
        "description": study.description,
        "target": public(study.target.model),
        "date": day,
        "seconds": seconds,
        "drafters": {
            name: {
                "description": study.drafters[name].description,
                "chain": p.chain,
                "stage_seconds": stage_seconds(p),
            }
            for name, p in planned.items()
        },
        "evaluations": evaluations,
    }
    if earlier is not None:
        report["carried"] = carry_earlier_rows(report, earlier)
        carry_left_out_evaluations(report, earlier, study.left_out_evaluations)
    if study.choose_k_on and study.choose_k_on in evaluations:
        choose_k(evaluations, study.choose_k_on)
    report["comparisons"] = comparisons(study.comparison_pairs(), evaluations, report["drafters"])
    if study.curves:
        report["curves"] = curves({n: c.model_dump() for n, c in study.curves.items()}, evaluations)
    return report


def _interval(c: dict[str, Any] | None) -> str:
    if not c:
        return "-"
    if c["low"] is None:
        return f"×{c['ratio']:.3f} (no per-prompt counts)"
    return f"×{c['ratio']:.3f} [{c['low']:.3f}–{c['high']:.3f}]"


def _chosen(row: dict[str, Any], cost: str) -> str:
    chosen = (row.get("chosen_k") or {}).get(cost)
    if not chosen:
        return "-"
    return f"{fmt(chosen['improvement_factor'])} (K={chosen['k']})"


def _evaluation_table(ev: dict[str, Any], carried: list[str]) -> list[str]:
    temps = ev["sampled_temperatures"]
    header = ["drafter", "rel. MACs", f"MAL (K={ev['num_draft_tokens']})", "impr. factor"]
    header += ["best K (MAL)"] + [f"MAL T={t:g}" for t in temps]
    header += ["time cost", "impr. (time)", "tokens/s", "speed-up", "projected", "lossless"]
    chosen_on = next((r["chosen_k"]["on"] for r in ev["drafters"] if r.get("chosen_k")), None)
    if chosen_on:
        header += [f"K on {chosen_on}: impr.", f"K on {chosen_on}: impr. (time)"]
    rows = []
    for r in ev["drafters"]:
        sweep = {s["num_draft_tokens"]: s["mal"] for s in r.get("draft_length_sweep") or []}
        best = r.get("best_num_draft_tokens")
        best_text = f"{best} ({fmt(sweep.get(best))})" if best else "-"
        sampled = [fmt((r["sampled"].get(f"{t:g}") or {}).get("mal")) for t in temps]
        lossless = "-"
        if r.get("lossless_checked"):
            lossless = (
                "yes" if not r["lossless_mismatches"] else f"{r['lossless_mismatches']} differ"
            )
        name = f"{r['name']} †" if r["name"] in carried else r["name"]
        rows.append(
            [name, fmt(r["relative_macs"]), fmt(r["mal"]), fmt(r["improvement_factor"])]
            + [best_text, *sampled]
            + [fmt(r.get("measured_cost")), fmt(r.get("measured_improvement_factor"))]
            + [fmt(r["tokens_per_second"], 2)]
            + [fmt(r["speedup"], 2) + (" ‡" if r.get("speedup_across_days") else "")]
            + [fmt(r.get("projected_speedup"), 2), lossless]
            + ([_chosen(r, "macs"), _chosen(r, "time")] if chosen_on else [])
        )
    return _table(header, rows)


def to_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Study: {report['name']}", "", report["description"], ""]
    made = report.get("provenance") or f"Built and measured by `sd2 compare` on {report['date']}."
    lines += [f"Target: `{report['target']}`. {made}"]
    lines += ["", "## Drafters", ""]
    lines += _table(
        ["drafter", "built as", "stage minutes", "what for"],
        [
            [
                f"{name} † ({d['measured']})" if d.get("measured") else name,
                " → ".join(d["chain"]),
                ", ".join(
                    f"{s} {v / 60:.1f}" if v is not None else f"{s} -"
                    for s, v in d["stage_seconds"].items()
                )
                or "-",
                d["description"],
            ]
            for name, d in report["drafters"].items()
        ],
    )
    for name, ev in report["evaluations"].items():
        lines += ["", f"## Evaluation `{name}`", ""]
        lines += [
            f"{ev['num_prompts']} prompts of `{ev['prompts']}`"
            + (
                f" whose first turn matches {code_span(ev['prompts_match'])}"
                if ev.get("prompts_match")
                else ""
            )
            + f", {ev['max_new_tokens']} new tokens, "
            f"{ev['backend']} backend ({ev['served_dtype']}), K = {ev['num_draft_tokens']}, "
            f"temperature {ev['temperature']:g}"
            + (
                "; speed-up against the target alone in the same run."
                if any(r["name"] != "none" and r.get("speedup") for r in ev["drafters"])
                else "; no speed-up measured (teacher-forced, or no target-alone run)."
            ),
            "",
        ]
        if ev.get("carried_whole"):
            dates = ", ".join(sorted({r["measured"] for r in ev["drafters"]}))
            lines += [
                f"Left out of the latest run: carried whole from an earlier run (measured "
                f"{dates}).",
                "",
            ]
        carried = report.get("carried") or []
        lines += _evaluation_table(ev, carried)
        across = [r for r in ev["drafters"] if r.get("speedup_across_days")]
        if across:
            target = next((r for r in ev["drafters"] if r["name"] == "none"), {})
            lines += [
                "",
                f"‡ measured on another day ({', '.join(sorted({r['measured'] for r in across}))}) "
                f"than the target alone it is divided by ({target.get('measured', '-')}), whose "
                "run the evaluation reused: the speed-up crosses runs; the time cost (drafter "
                "and target steps timed in alternating rounds) is the row's own.",
            ]
        dates = sorted({r["measured"] for r in ev["drafters"] if r["name"] in carried})
        if dates:
            lines += [
                "",
                f"† carried from an earlier run of this study (measured {', '.join(dates)}): the "
                "same prompts, settings and target outputs, so its MAL and comparisons stand; "
                "its tokens/s, speed-up and time cost are against the target of its own run.",
            ]
    if report["comparisons"]:
        lines += ["", "## Comparisons (MAL ratio, 95% paired-bootstrap interval over prompts)", ""]
        rows = []
        for c in report["comparisons"]:
            per_cat = ", ".join(f"{k} {v[0]:.2f}" for k, v in c["per_category"].items() if v)
            mark = (" §" if c.get("earlier_partner") else "") + (
                " ¶" if c.get("mixed_builds") else ""
            )
            rows.append(
                [
                    f"{c['a']} vs {c['b']}{mark}",
                    c["evaluation"],
                    c["decoding"],
                    _interval(c),
                    per_cat,
                ]
            )
        lines += _table(["comparison", "evaluation", "decoding", "ratio", "per category"], rows)
        if any(c.get("earlier_partner") for c in report["comparisons"]):
            lines += ["", EARLIER_PARTNER_NOTE]
        if any(c.get("mixed_builds") for c in report["comparisons"]):
            lines += ["", MIXED_BUILDS_NOTE]
    for name, curve in (report.get("curves") or {}).items():
        lines += _curve_section(name, curve)
    return "\n".join(lines) + "\n"


def _curve_section(name: str, curve: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"## Curve `{name}`: MAL over `{curve['baseline']}` against {curve['x_label']}",
        "",
    ]
    if not curve["series"]:
        return lines + ["No point of the curve was measured beside its baseline yet."]
    labels = [f"{s['evaluation']}, {s['decoding']}" for s in curve["series"]]
    xs = sorted({(p["x"], p["drafter"]) for s in curve["series"] for p in s["points"]})
    cells = {
        (p["drafter"], label): _interval(p) + (" §" if p.get("earlier_partner") else "")
        for s, label in zip(curve["series"], labels)
        for p in s["points"]
    }
    lines += _table(
        [curve["x_label"], "drafter", *labels],
        [[f"{x:g}", d, *(cells.get((d, lb), "-") for lb in labels)] for x, d in xs],
    )
    lines += [""]
    for s, label in zip(curve["series"], labels):
        fit = s["fit"]
        if fit is None:
            continue
        unit = "per decade of x" if fit["per"] == "decade" else "per unit of x"
        text = f"- {label}: {100 * fit['slope']:+.1f} points of MAL gain {unit} (least squares "
        text += f"over {len(s['points'])} points)"
        if "goal" in fit:
            goal = f"+{100 * (fit['goal'] - 1):.0f}%"
            at, largest = fit["x_at_goal"], max(p["x"] for p in s["points"])
            if at is None:
                text += f"; {goal} not reached along the fit (slope ≤ 0)"
            elif at > FAR_EXTRAPOLATION * largest:
                text += (
                    f"; {goal} not within {FAR_EXTRAPOLATION}× the largest x along the fit (x ≈ "
                    f"{at:.3g}): the points give no estimate of it"
                )
            else:
                text += f"; {goal} at x ≈ {at:.3g} (extrapolated along the fit)"
        lines.append(text + ".")
    if any(p.get("earlier_partner") for s in curve["series"] for p in s["points"]):
        lines += ["", EARLIER_PARTNER_NOTE]
    return lines


def write_files(report: dict[str, Any], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = [
        atomic_write_json(directory / "study.json", report),
        atomic_write_text(directory / "study.md", to_markdown(report)),
    ]
    for name, ev in report["evaluations"].items():
        path = directory / f"{name}-mal-vs-macs.png"
        _save_png(plot_mal_vs_macs(ev), path)
        written.append(path)
    for name, curve in (report.get("curves") or {}).items():
        if curve["series"]:
            path = directory / f"{name}-curve.png"
            _save_png(plot_curve(curve), path)
            written.append(path)
    return written


def write_study_report(
    study: Any, planned: dict[str, Any], seconds: float | None = None, *, carry: bool = True
) -> dict[str, Any]:
    """Build the report and write it into the study directory and its `results`; with
    `carry`, rows of the report already in `results` for drafters this run did not measure
    are kept (`carry_earlier_rows`)."""
    earlier = None
    if carry and study.results and (Path(study.results) / "study.json").is_file():
        earlier = read_json(Path(study.results) / "study.json")
    report = build_report(study, planned, seconds, earlier)
    write_files(report, study.root)
    if study.results:
        write_files(report, Path(study.results))
    print(to_markdown(report))
    return report


def rewrite_from_json(path: Path, directory: Path | None = None) -> dict[str, Any]:
    """Render `study.md` and the plots again from a `study.json` (e.g. a committed one)."""
    report = read_json(path)
    write_files(report, directory or path.parent)
    return report
