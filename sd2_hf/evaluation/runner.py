"""`run_eval(config)`: MAL, MACs, speed and losslessness of drafters for one target."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
import statistics
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from sd2_hf.evaluation.backend import Backend, DrafterPlan, Generation, add_counters
from sd2_hf.evaluation.config import EvalConfig
from sd2_hf.evaluation.prompts import (
    Prompt,
    PromptCounts,
    Question,
    conversation,
    fit_length,
    load_questions,
    render,
)
from sd2_hf.utils.io import atomic_write_json, checkpoint_identity, read_json

logger = logging.getLogger(__name__)

MAL_ACCOUNTING = {
    "transformers": (
        "MAL = 1 + accepted draft tokens / draft steps. transformers: each target forward pass "
        "during decoding is one verification step; its draft tokens are read from the target's "
        "input and the tokens it committed from the streamer; accepted = their common prefix. "
        "Steps without drafts (the assistant drafts at most max_new_tokens - generated - 1 "
        "tokens, so a last step can have none) are plain decoding, not draft steps."
    ),
    "onnxruntime": (
        "MAL = 1 + accepted draft tokens / draft steps, counted as with transformers (the "
        "worker records the target's inputs and the streamer's chunks of transformers assisted "
        "generation over ONNX Runtime sessions): accepted = common prefix of each step's drafts "
        "and committed tokens."
    ),
    "vllm": (
        "MAL = 1 + accepted draft tokens / draft steps, from vLLM's spec-decode counters "
        "(num_accepted_tokens / num_drafts) read before and after each request. The prefill "
        "step commits the first token without drafts; drafts are never shortened near "
        "max_tokens (tokens past it are discarded)."
    ),
}


def _resolve(name_or_path: str) -> str:
    from sd2_hf.utils.models import resolve_model_path

    return resolve_model_path(name_or_path)


def _same_tokenizer(a, b) -> bool:
    return a.get_vocab() == b.get_vocab()


def plan_drafters(config: EvalConfig, target_tokenizer) -> list[DrafterPlan]:
    """Resolve each drafter, load its tokenizer and decide UAG; bad combinations fail here,
    before any model is run."""
    from transformers import AutoTokenizer

    plans = []
    for entry in config.drafter_entries():
        path = _resolve(entry.path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        differs = not _same_tokenizer(tokenizer, target_tokenizer)
        if differs and config.uag == "off":
            raise ValueError(
                f"drafter {entry.name!r} ({entry.path}) has a different tokenizer from the target "
                f"({config.target}) and uag is 'off'. Speculative decoding across tokenizers "
                "needs universal assisted generation: pass `--uag auto` (or on), or use a "
                "drafter with the target's tokenizer"
            )
        if not differs and config.uag == "on":
            raise ValueError(
                f"uag is 'on' but drafter {entry.name!r} shares the target's tokenizer; UAG is "
                "for drafters with another tokenizer: use `--uag auto`"
            )
        plans.append(DrafterPlan(entry.name, "model", path, uag=differs, tokenizer=tokenizer))
    return plans


def length_limit(config: EvalConfig, paths: list[str]) -> int:
    """Prompt + new tokens must fit every model's context (and `max_model_len` when given)."""
    from transformers import AutoConfig

    limits = [
        AutoConfig.from_pretrained(p).get_text_config().max_position_embeddings for p in paths
    ]
    if config.max_model_len is not None:
        limits.append(config.max_model_len)
    limit = min(limits)
    if config.max_new_tokens >= limit:
        raise ValueError(
            f"max_new_tokens ({config.max_new_tokens}) leaves no room for a prompt within the "
            f"model length limit ({limit}); use a smaller max_new_tokens"
        )
    return limit


def _needs_reference(config: EvalConfig) -> bool:
    return (
        "none" in config.baselines
        or not config.assisted
        or (config.check_lossless and config.greedy)
        or config.turns == "all"
    )


def build_prompts(
    questions: list[Question],
    tokenizer,
    config: EvalConfig,
    room: int,
    backend: Backend | None,
) -> tuple[list[Prompt], list[Generation] | None, PromptCounts]:
    """Render every evaluated turn; with a backend, also run the target alone on each.

    Later turns follow the target's own greedy reply to the earlier ones (its reference run),
    so every drafter sees the same conversations.
    """
    counts = PromptCounts(questions=len(questions))
    turns = {q.id: (len(q.turns) if config.turns == "all" else 1) for q in questions}
    replies: dict[str, list[str]] = {q.id: [] for q in questions}
    dropped: set[str] = set()
    prompts: list[Prompt] = []
    reference: list[Generation] = []
    bar = tqdm(total=sum(turns.values()), desc="target alone" if backend else "prompts")

    def turn_loop(generate) -> None:
        for turn in range(max(turns.values())):
            for q in questions:
                if turn >= turns[q.id]:
                    continue
                bar.update(1)
                if q.id in dropped:
                    counts.skip("earlier_turn_skipped")
                    continue
                ids = render(tokenizer, conversation(q, turn, replies[q.id]))
                ids, truncated = fit_length(ids, room, config.too_long)
                if ids is None:
                    counts.skip("too_long")
                    dropped.add(q.id)
                    continue
                counts.truncated += truncated
                prompts.append(Prompt(q.id, q.category, turn, ids, truncated))
                if generate is not None:
                    if len(prompts) == 1:
                        generate(ids)  # warm-up, not timed
                    result = generate(ids)
                    reference.append(result)
                    replies[q.id].append(
                        tokenizer.decode(result.token_ids, skip_special_tokens=True)
                    )

    if backend is None:
        turn_loop(None)
    else:
        with backend.session(None) as generate:
            turn_loop(generate)
    bar.close()
    counts.evaluated = len(prompts)
    if not prompts:
        raise ValueError(
            f"every prompt was skipped ({counts.skipped}); raise max_model_len, lower "
            "max_new_tokens, or use too_long=truncate"
        )
    return prompts, (reference if backend is not None else None), counts


def _mal_or_none(counters) -> float | None:
    return None if counters.num_drafts == 0 else counters.mal


def _generations(generate, prompts: list[Prompt], desc: str, config: EvalConfig):
    """(index, prompt, generation) for every prompt: one at a time, or with `concurrency` > 1
    (vLLM) a category at a time through `generate.many`, so counters stay per category."""
    bar = tqdm(total=len(prompts), desc=desc)
    many = getattr(generate, "many", None)
    if config.concurrency > 1 and many is not None:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, prompt in enumerate(prompts):
            groups[prompt.category].append(i)
        for indices in groups.values():
            results = many([prompts[i].input_ids for i in indices])
            bar.update(len(indices))
            for i, result in zip(indices, results, strict=True):
                yield i, prompts[i], result
    else:
        for i, prompt in enumerate(prompts):
            result = generate(prompt.input_ids)
            bar.update(1)
            yield i, prompt, result
    bar.close()


def _counter_fields(per_category: dict[str, list], k: int) -> dict[str, Any]:
    """A row's acceptance fields from its counters grouped by prompt category: MAL overall and
    per category, acceptance per position and the totals."""
    total = add_counters((c for group in per_category.values() for c in group), positions=k)
    return {
        "mal": _mal_or_none(total),
        "mal_per_category": {
            cat: _mal_or_none(add_counters(group, positions=k))
            for cat, group in per_category.items()
        },
        "acceptance_per_position": total.acceptance_per_position if total.num_drafts else [],
        "draft_steps": total.num_drafts,
        "draft_tokens": total.num_draft_tokens,
        "accepted_tokens": total.num_accepted_tokens,
    }


def measure(
    backend: Backend,
    plan: DrafterPlan,
    prompts: list[Prompt],
    reference: list[Generation] | None,
    config: EvalConfig,
    temperature: float | None = None,
) -> dict[str, Any]:
    """Run one drafter over every prompt; counts per category, timing, lossless check.

    `temperature` (transformers): a sampled run at this temperature instead of the
    configuration's; it is never compared with the greedy reference."""
    per_category = defaultdict(list)
    per_prompt: list[list[int]] = []
    new_tokens = 0
    seconds = 0.0
    target_steps: int | None = 0
    mismatches = 0
    greedy = config.greedy if temperature is None else False
    session = backend.session(plan) if temperature is None else backend.session(plan, temperature)
    desc = plan.name if temperature is None else f"{plan.name} T={temperature:g}"
    with session as generate:
        generate(prompts[0].input_ids)  # warm-up, not timed nor counted
        for i, prompt, result in _generations(generate, prompts, desc, config):
            per_category[prompt.category].append(result.counters)
            c = result.counters
            per_prompt.append([c.num_drafts, c.num_accepted_tokens] if c else [0, 0])
            new_tokens += len(result.token_ids)
            seconds += result.seconds
            target_steps = (
                None
                if result.target_steps is None or target_steps is None
                else target_steps + result.target_steps
            )
            if reference is not None and greedy and config.check_lossless:
                mismatches += result.token_ids != reference[i].token_ids
    return {
        "name": plan.name,
        "path": plan.path,
        "kind": plan.kind,
        "uag": plan.uag,
        **_counter_fields(per_category, config.num_draft_tokens),
        "target_steps": target_steps,
        "new_tokens": new_tokens,
        "seconds": seconds,
        "tokens_per_second": new_tokens / seconds if seconds else None,
        "lossless_checked": reference is not None and greedy and config.check_lossless,
        "lossless_mismatches": mismatches,
        # [draft steps, accepted tokens] per prompt, in prompt order (paired comparisons).
        "per_prompt": per_prompt,
    }


SAMPLED_FIELDS = (
    "mal",
    "mal_per_category",
    "acceptance_per_position",
    "draft_steps",
    "accepted_tokens",
    "new_tokens",
    "seconds",
    "tokens_per_second",
    "per_prompt",
)


def measure_sampled(
    backend: Backend, plan: DrafterPlan, prompts: list[Prompt], config: EvalConfig
) -> dict[str, dict[str, Any]]:
    """The drafter under speculative sampling at each of `config.sampled_temperatures`."""
    sampled = {}
    for temperature in config.sampled_temperatures:
        row = measure(backend, plan, prompts, None, config, temperature=temperature)
        sampled[f"{temperature:g}"] = {k: row[k] for k in SAMPLED_FIELDS}
    return sampled


def sweep_draft_lengths(
    plan: DrafterPlan,
    prompts: list[Prompt],
    reference: list[Generation] | None,
    config: EvalConfig,
) -> list[dict[str, Any]] | None:
    """MAL at each K of `config.draft_length_sweep`, from one teacher-forced pass of the drafter
    over the target's greedy output (`sd2_hf.evaluation.forced`: the counters of transformers
    assisted generation, without generating). None where it does not apply: sampled runs,
    no greedy reference, baselines and cross-tokenizer (UAG) drafters."""
    if (
        not config.draft_length_sweep
        or not config.greedy
        or reference is None
        or plan.kind != "model"
        or plan.uag
    ):
        return None
    return _sweep(_forced_matches(plan, prompts, reference, config), config)


def _forced_matches(
    plan: DrafterPlan, prompts: list[Prompt], reference: list[Generation], config: EvalConfig
) -> list[list[bool]]:
    """The drafter's teacher-forced pass over the target's greedy outputs (`greedy_matches`)."""
    from sd2_hf.evaluation.forced import greedy_matches
    from sd2_hf.evaluation.transformers_backend import load_causal_lm

    drafter = load_causal_lm(plan.path, config.dtype)
    sequences = [(p.input_ids, r.token_ids) for p, r in zip(prompts, reference, strict=True)]
    return greedy_matches(drafter, sequences)


def _sweep(matches: list[list[bool]], config: EvalConfig) -> list[dict[str, Any]]:
    from sd2_hf.evaluation.forced import counters_by_draft_length

    by_k = counters_by_draft_length(matches, config.draft_length_sweep, config.max_new_tokens)
    return [{"num_draft_tokens": k, "mal": _mal_or_none(c)} for k, c in by_k.items()]


def measure_forced(
    plan: DrafterPlan,
    prompts: list[Prompt],
    reference: list[Generation],
    config: EvalConfig,
) -> dict[str, Any]:
    """A drafter's row from one teacher-forced pass over the target's greedy output
    (`assisted: false`): its greedy counters at K and over the draft-length sweep, replayed
    with transformers' step rule (`sd2_hf.evaluation.forced`), the same counters assisted
    generation gives without generating; no timing and no lossless check."""
    from sd2_hf.evaluation.forced import replay_greedy_steps

    if plan.kind != "model" or plan.uag:
        raise ValueError(
            f"assisted: false: drafter {plan.name!r} is not a same-tokenizer model drafter; "
            "teacher-forced MAL needs the drafter's own predictions of the target's tokens"
        )
    matches = _forced_matches(plan, prompts, reference, config)
    counters = [
        replay_greedy_steps(m, config.num_draft_tokens, config.max_new_tokens) for m in matches
    ]
    per_category = defaultdict(list)
    for prompt, c in zip(prompts, counters, strict=True):
        per_category[prompt.category].append(c)
    return {
        "name": plan.name,
        "path": plan.path,
        "kind": plan.kind,
        "uag": plan.uag,
        "teacher_forced": True,
        **_counter_fields(per_category, config.num_draft_tokens),
        "target_steps": None,
        "new_tokens": sum(len(r.token_ids) for r in reference),
        "seconds": None,
        "tokens_per_second": None,
        "lossless_checked": False,
        "lossless_mismatches": 0,
        "per_prompt": [[c.num_drafts, c.num_accepted_tokens] for c in counters],
        "draft_length_sweep": _sweep(matches, config) or None,
    }


def decode_seconds(
    backend: Backend, drafter: DrafterPlan | None, runs: list[tuple[list[int], int]]
) -> list[tuple[float, int]]:
    """Seconds and new tokens of `drafter`'s model (the target with None) decoding alone
    through the backend's `decoder`, `n` tokens after each prompt of `runs`, one pair per run;
    one untimed warm-up first."""
    with backend.decoder(drafter) as decode:
        decode(runs[0][0], min(4, runs[0][1]))
        return [decode(p, n) for p, n in runs]


class TargetSteps:
    """The target's side of every drafter's step cost in one evaluation run: the runs both
    models decode alone (the first `config.step_cost_prompts` prompts with their reference
    lengths) and, where the backend can time it, the target's verify step over K + 1 tokens
    against its one-token step, for every swept K and the run's K
    (`sd2_hf.evaluation.cost_model`), measured on first use and shared by every drafter.

    Written here because neither transformers nor vLLM reports a model's own step time beside
    an assisted run; timing plain decoding of both models is the closest measurement of the c
    in MAL / (K c + 1) (it leaves out the verify step's extra cost of K + 1 tokens, which the
    measured speed-up includes and the verify ratio models)."""

    def __init__(
        self,
        backend: Backend,
        prompts: list[Prompt],
        reference: list[Generation] | None,
        config: EvalConfig,
    ):
        self.backend = backend
        self.rounds = config.step_cost_rounds
        self.runs = (
            [
                (p.input_ids, len(r.token_ids))
                for p, r in zip(prompts, reference, strict=True)
                if len(r.token_ids) > 1
            ][: config.step_cost_prompts]
            if reference is not None
            else []
        )
        self.draft_lengths = sorted({*config.draft_length_sweep, config.num_draft_tokens})

    @functools.cached_property
    def verify_ratio(self) -> dict[str, float] | None:
        verify_ratios = getattr(self.backend, "verify_ratios", None)
        if verify_ratios is None:
            return None
        return {str(k): r for k, r in verify_ratios(self.runs, self.draft_lengths).items()}


def measure_step_cost(
    backend: Backend, plan: DrafterPlan, target: TargetSteps
) -> dict[str, Any] | None:
    """The drafter's and the target's seconds per token decoding alone on `target.runs`, timed
    in `target.rounds` alternating rounds (target then drafter, then drafter then target, ...:
    a drift of the machine's speed falls on both), and the cost ratio c: the median over the
    rounds and runs of the drafter's time / the target's time on the same run in the same round.
    On this project's 2-core CPU one pass of 4 x 64 tokens varied by about 8% for the same
    model, and a target timed once per process, minutes away from a drafter, added drift: the
    pairing and the median are what make the ratio repeatable. In-process with transformers;
    each model served alone by a vLLM server of the same settings with vLLM. None where it does
    not apply: no runs (no reference lengths, `step_cost_prompts` 0), baselines and
    cross-tokenizer drafters."""
    if not target.runs or plan.kind != "model" or plan.uag:
        return None
    drafter_times: list[tuple[float, int]] = []
    target_times: list[tuple[float, int]] = []
    ratios = []
    for round_ in range(target.rounds):
        if round_ % 2 == 0:
            t = decode_seconds(backend, None, target.runs)
            d = decode_seconds(backend, plan, target.runs)
        else:
            d = decode_seconds(backend, plan, target.runs)
            t = decode_seconds(backend, None, target.runs)
        ratios += [ds / ts for (ds, _), (ts, _) in zip(d, t, strict=True)]
        target_times += t
        drafter_times += d
    step = {
        "tokens": sum(n for _, n in target.runs),
        "rounds": target.rounds,
        "drafter_seconds_per_token": _per_token(drafter_times),
        "target_seconds_per_token": _per_token(target_times),
        "ratio": statistics.median(ratios),
        "ratios": ratios,
    }
    if target.verify_ratio is not None:
        step["verify_ratio"] = target.verify_ratio
    return step


def _per_token(times: list[tuple[float, int]]) -> float:
    return sum(s for s, _ in times) / sum(n for _, n in times)


def today() -> str:
    return time.strftime("%Y-%m-%d")


def _baseline_row(prompts: list[Prompt], reference: list[Generation]) -> dict[str, Any]:
    """The target alone: MAL 1 by definition (one token per target step, nothing drafted)."""
    new_tokens = sum(len(r.token_ids) for r in reference)
    seconds = sum(r.seconds for r in reference)
    categories = {p.category for p in prompts}
    return {
        "name": "none",
        "path": "",
        "kind": "none",
        "uag": False,
        "mal": 1.0,
        "mal_per_category": dict.fromkeys(sorted(categories), 1.0),
        "acceptance_per_position": [],
        "draft_steps": 0,
        "draft_tokens": 0,
        "accepted_tokens": 0,
        "target_steps": new_tokens,
        "new_tokens": new_tokens,
        "seconds": seconds,
        "tokens_per_second": new_tokens / seconds if seconds else None,
        "lossless_checked": False,
        "lossless_mismatches": 0,
        "per_prompt": [],
    }


def _add_costs(row: dict[str, Any], target_macs: int, drafter_macs: int | None, k: int) -> None:
    """MACs, relative MACs c and the improvement factor MAL / (K·c + 1), also of each sampled
    run of the row; the same with the measured time ratio, and the cost model's speed-up."""
    if row["kind"] == "none":
        row.update(
            macs=None,
            relative_macs=None,
            improvement_factor=1.0,
            measured_cost=None,
            measured_improvement_factor=1.0,
            projected_speedup=1.0,
        )
        return
    c = drafter_macs / target_macs
    row.update(macs=drafter_macs, relative_macs=c)
    step = row.get("step_cost")
    measured = _measured_cost(step)
    row["measured_cost"] = measured
    sweep = [s for s in row.get("draft_length_sweep") or [] if s["mal"] is not None]
    _add_projection(row, step, sweep, k)
    # The improvement factor with the MACs ratio, and with the measured time ratio as c.
    for cost, field, best in (
        (c, "improvement_factor", "best_num_draft_tokens"),
        (measured, "measured_improvement_factor", "best_num_draft_tokens_measured"),
    ):
        for run in (row, *row.get("sampled", {}).values()):
            mal = run["mal"]
            run[field] = None if mal is None or cost is None else mal / (k * cost + 1)
        if cost is None:
            continue
        for s in sweep:
            s[field] = s["mal"] / (s["num_draft_tokens"] * cost + 1)
        if sweep:
            row[best] = max(sweep, key=lambda s: s[field])["num_draft_tokens"]


def _measured_cost(step: dict[str, Any] | None) -> float | None:
    """The step's cost ratio: the median of paired ratios (`measure_step_cost`), or for a row
    journaled before rounds existed, the quotient of the two models' seconds per token."""
    if not step:
        return None
    if "ratio" in step:
        return step["ratio"]
    return step["drafter_seconds_per_token"] / step["target_seconds_per_token"]


def _add_projection(
    row: dict[str, Any], step: dict[str, Any] | None, sweep: list[dict[str, Any]], k: int
) -> None:
    """The cost model's speed-up (`sd2_hf.evaluation.cost_model`) from the measured step times
    and verify ratios: at the run's K (beside the measured speed-up) and at each swept K, with
    the K it ranks best. None without step times."""
    from sd2_hf.evaluation.cost_model import projected_sweep

    ratios = {int(kk): r for kk, r in ((step or {}).get("verify_ratio") or {}).items()}
    row["projected_speedup"] = None
    if not ratios:
        return
    target = step["target_seconds_per_token"]
    draft = _measured_cost(step) * target
    verify = {kk: r * target for kk, r in ratios.items()}
    row["projected_speedup"] = projected_sweep({k: row["mal"]}, draft, target, verify).get(k)
    by_k = projected_sweep({s["num_draft_tokens"]: s["mal"] for s in sweep}, draft, target, verify)
    for s in sweep:
        s["projected_speedup"] = by_k.get(s["num_draft_tokens"])
    if by_k:
        row["best_num_draft_tokens_projected"] = max(by_k, key=by_k.__getitem__)


def _versions(backend: Backend) -> dict[str, str]:
    from sd2_hf import __version__

    return {"sd2_hf": __version__, **backend.versions()}


def make_backend(
    config: EvalConfig, target_path: str, tokenizer, limit: int, output: Path
) -> Backend:
    if config.backend == "transformers":
        from sd2_hf.evaluation.transformers_backend import TransformersBackend

        return TransformersBackend(config, target_path, tokenizer)
    if config.backend == "onnxruntime":
        from sd2_hf.evaluation.onnx_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(config, target_path, output)
    from transformers import GenerationConfig

    from sd2_hf.evaluation.vllm_backend import VLLMBackend

    eos = GenerationConfig.from_pretrained(target_path).eos_token_id
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
        eos_ids.append(tokenizer.eos_token_id)
    return VLLMBackend(config, target_path, limit, eos_ids, output / "logs")


def _served_dtype(config: EvalConfig, target_path: str) -> str:
    """The dtype the backend computes in, as far as `config.dtype` leaves it open."""
    if config.backend == "onnxruntime":
        return "float32"  # optimum's exports here are fp32
    if config.backend != "vllm":
        return config.dtype
    from sd2_hf.utils.models import served_dtype

    return served_dtype(target_path, config.dtype)


# Beside eval.json: the target's reference run of a finished evaluation, with the settings key.
REFERENCE_FILE = "eval-reference.json"
# Row fields computed from the measured ones at every report (costs, speed-up against the
# report's target row): recomputed, never reused.
DERIVED_ROW_FIELDS = (
    "macs",
    "relative_macs",
    "improvement_factor",
    "best_num_draft_tokens",
    "speedup",
    "measured_cost",
    "measured_improvement_factor",
    "best_num_draft_tokens_measured",
    "projected_speedup",
    "best_num_draft_tokens_projected",
    "speedup_across_days",
)


class _EvalJournal:
    """Finished parts of an evaluation, so that a rerun with the same settings measures only
    what is missing: under `<output>/partial/` while it runs (the prompts with the target's
    reference run, and one row per measured drafter), and once the report is written, the rows
    in `eval.json` (with the settings key and each drafter's checkpoint identity) and the
    reference run in `eval-reference.json`. Any change of the settings that define the prompts
    and the reference (target, prompts, K, lengths, backend, ...) starts afresh. A drafter row is
    reused only for the same name, path and checkpoint files. Adding a drafter to a finished
    evaluation therefore measures only the new one, against the same reference run, so every
    row's speed-up is against the same target row.

    Written by the project because an evaluation is a long job (tens of minutes per drafter on a
    CPU) and neither transformers nor vLLM keeps anything of a finished generation run.
    """

    def __init__(self, output: Path, config: EvalConfig, target_path: str, served: str):
        self.output = output
        self.dir = output / "partial"
        # Only the settings that differ from their defaults: a field added to EvalConfig later
        # (with a default that keeps today's behaviour) leaves finished rows reusable.
        settings = config.model_dump(
            exclude={"output", "drafters", "baselines"}, exclude_defaults=True
        )
        self.key = {"settings": settings, "target": checkpoint_identity(target_path)}
        if served != config.dtype:
            # `auto` computes in another dtype on this machine than on one with bf16
            # instructions: rows of the two must not meet in one report.
            self.key["served_dtype"] = served
        self.identities: dict[str, Any] = {}  # name -> checkpoint identity of its row
        # The day the target's reference run was measured (None: journaled before dates were).
        self.reference_date: str | None = None
        key_file = self.dir / "key.json"
        if self.dir.exists() and (
            not key_file.is_file() or read_json(key_file) != _jsonable(self.key)
        ):
            logger.info(
                "evaluation settings changed: discarding the partial results in %s", self.dir
            )
            shutil.rmtree(self.dir)
        if not self.dir.exists():
            (self.dir / "rows").mkdir(parents=True, exist_ok=True)
            atomic_write_json(key_file, self.key)
        self.reported = self._reported_rows()

    def _same_key(self, saved: Any) -> bool:
        return isinstance(saved, dict) and saved.get("key") == _jsonable(self.key)

    def _reported_rows(self) -> dict[str, dict[str, Any]]:
        """name -> {"row", "identity"} of an earlier report in `eval.json` with these settings."""
        path = self.output / "eval.json"
        if not path.is_file():
            return {}
        done = read_json(path)
        journal = done.get("journal")
        if not self._same_key(journal):
            return {}
        return {
            row["name"]: {"row": row, "identity": journal["identities"][row["name"]]}
            for row in done.get("drafters", [])
            if row.get("name") in journal.get("identities", {})
        }

    def load_reference(self) -> tuple[list[Prompt], list[Generation] | None, PromptCounts] | None:
        path = self.dir / "reference.json"
        if not path.is_file():
            path = self.output / REFERENCE_FILE
            if not path.is_file() or not self._same_key(read_json(path)):
                return None
        saved = read_json(path)
        self.reference_date = saved.get("measured")
        prompts = [Prompt(**p) for p in saved["prompts"]]
        reference = (
            None
            if saved["reference"] is None
            else [Generation(r["token_ids"], r["seconds"]) for r in saved["reference"]]
        )
        logger.info("reusing the target's reference run of %d prompts from %s", len(prompts), path)
        return prompts, reference, PromptCounts(**saved["counts"])

    def save_reference(
        self, prompts: list[Prompt], reference: list[Generation] | None, counts: PromptCounts
    ) -> None:
        self.reference_date = today()
        atomic_write_json(
            self.dir / "reference.json",
            {
                "measured": self.reference_date,
                "prompts": [asdict(p) for p in prompts],
                "reference": None
                if reference is None
                else [{"token_ids": r.token_ids, "seconds": r.seconds} for r in reference],
                "counts": asdict(counts),
            },
        )

    def _row_file(self, plan: DrafterPlan) -> Path:
        digest = hashlib.sha256(f"{plan.name}\0{plan.path}".encode()).hexdigest()[:16]
        return self.dir / "rows" / f"{digest}.json"

    def load_row(self, plan: DrafterPlan) -> dict[str, Any] | None:
        identity = _jsonable(checkpoint_identity(plan.path))
        path = self._row_file(plan)
        if path.is_file():
            saved = read_json(path)
            if saved["identity"] == identity:
                logger.info("reusing the measured row of drafter %r from %s", plan.name, path)
                self.identities[plan.name] = identity
                return saved["row"]
        reported = self.reported.get(plan.name)
        if reported and reported["row"].get("path") == plan.path:
            if reported["identity"] == identity:
                logger.info(
                    "reusing the row of drafter %r from %s", plan.name, self.output / "eval.json"
                )
                self.identities[plan.name] = identity
                row = reported["row"]
                return {k: v for k, v in row.items() if k not in DERIVED_ROW_FIELDS}
        return None

    def save_row(self, plan: DrafterPlan, row: dict[str, Any]) -> None:
        identity = checkpoint_identity(plan.path)
        self.identities[plan.name] = _jsonable(identity)
        atomic_write_json(self._row_file(plan), {"identity": identity, "row": row})

    def record(self) -> dict[str, Any]:
        """What eval.json keeps for a later run to reuse its rows."""
        return {"key": self.key, "identities": self.identities}

    def finish(self) -> None:
        """The report is written: keep the reference run beside it, drop the partial results."""
        reference = self.dir / "reference.json"
        if reference.is_file():
            atomic_write_json(
                self.output / REFERENCE_FILE, {"key": self.key, **read_json(reference)}
            )
        shutil.rmtree(self.dir, ignore_errors=True)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def run_eval(config: EvalConfig, *, report: bool = True) -> dict[str, Any]:
    """Evaluate the drafters and baselines of `config`; writes eval.json, eval.md and plots to
    `config.output` and returns the report (the content of eval.json).

    `report=False` only measures: the target's reference run and the rows of `config`'s drafters
    are kept under `<output>/partial/` and nothing else is written; the return value is
    `{"drafters": rows}`. This splits one evaluation over processes, e.g. one vLLM server per
    CPU core: one call measures the reference (`baselines=["none"]`, no drafters), workers then
    measure disjoint drafter subsets into the same output with `report=False`, and a last
    `run_eval` with every drafter reuses all their rows and writes the report.

    A finished evaluation is reused the same way: rerun with more drafters (same settings, same
    output), only the new ones are measured; their rows join those of eval.json, against the
    same target reference run (kept in eval-reference.json)."""
    from transformers import AutoTokenizer

    from sd2_hf.evaluation.macs import count_macs
    from sd2_hf.evaluation.report import to_markdown, write_report

    output = Path(config.output)
    target_path = _resolve(config.target)
    tokenizer = AutoTokenizer.from_pretrained(target_path)
    plans = plan_drafters(config, tokenizer)
    if "ngram" in config.baselines:
        plans.insert(0, DrafterPlan("ngram", "ngram"))
    questions, loader_skipped = load_questions(config)
    limit = length_limit(config, [target_path] + [p.path for p in plans if p.kind == "model"])
    backend = make_backend(config, target_path, tokenizer, limit, output)
    served = _served_dtype(config, target_path)
    journal = _EvalJournal(output, config, target_path, served)
    prompts, reference, counts = _reference_run(
        config, journal, questions, tokenizer, limit - config.max_new_tokens, backend
    )
    target_macs = count_macs(target_path, config.macs_context_length).total
    rows = _measure_rows(config, backend, plans, prompts, reference, journal, target_macs)
    if not report:
        return {"drafters": rows}

    result = _report_dict(
        config,
        target_path=target_path,
        prompts=prompts,
        counts=counts,
        loader_skipped=loader_skipped,
        limit=limit,
        target_macs=target_macs,
        rows=rows,
        served=served,
        backend=backend,
        journal=journal,
    )
    write_report(result, output)
    journal.finish()
    print(to_markdown(result).split("\n## MAL per category")[0])
    print(f"written to {output}/ (eval.json, eval.md, plots)")
    return result


def _reference_run(
    config: EvalConfig,
    journal: _EvalJournal,
    questions: list[Question],
    tokenizer,
    room: int,
    backend: Backend,
) -> tuple[list[Prompt], list[Generation] | None, PromptCounts]:
    """The prompts, the target's reference run and the prompt counts: those of the journal's
    eval-reference.json when a run with the same settings left one, else built (the target
    decoding alone where the evaluation needs it) and saved there."""
    resumed = journal.load_reference()
    if resumed is not None:
        return resumed
    prompts, reference, counts = build_prompts(
        questions,
        tokenizer,
        config,
        room,
        backend if _needs_reference(config) else None,
    )
    journal.save_reference(prompts, reference, counts)
    return prompts, reference, counts


def _measure_rows(
    config: EvalConfig,
    backend: Backend,
    plans: list[DrafterPlan],
    prompts: list[Prompt],
    reference: list[Generation] | None,
    journal: _EvalJournal,
    target_macs: int,
) -> list[dict[str, Any]]:
    """One row per baseline and drafter, with its costs and speedup: rows the journal kept are
    reused, the others measured (greedy, sampled temperatures, draft-length sweep) and kept."""
    from sd2_hf.evaluation.macs import count_macs

    rows = []
    target_steps = TargetSteps(backend, prompts, reference, config)
    if "none" in config.baselines:
        rows.append(_baseline_row(prompts, reference))
        rows[-1]["measured"] = journal.reference_date
        _add_costs(rows[-1], target_macs, None, config.num_draft_tokens)
    for plan in plans:
        row = journal.load_row(plan)
        if row is None and not config.assisted:
            row = measure_forced(plan, prompts, reference, config)
            row["step_cost"] = None
            row["measured"] = today()
            journal.save_row(plan, row)
        if row is None:
            row = measure(backend, plan, prompts, reference, config)
            row["measured"] = today()
            if config.sampled_temperatures:
                row["sampled"] = measure_sampled(backend, plan, prompts, config)
            sweep = sweep_draft_lengths(plan, prompts, reference, config)
            if sweep is not None:
                row["draft_length_sweep"] = sweep
            row["step_cost"] = measure_step_cost(backend, plan, target_steps)
            journal.save_row(plan, row)
        rows.append(row)
        # The ngram drafter does no multiply-accumulates: relative cost 0.
        drafter_macs = count_macs(plan.path, config.macs_context_length).total if plan.path else 0
        _add_costs(rows[-1], target_macs, drafter_macs, config.num_draft_tokens)
    base_speed = rows[0]["tokens_per_second"] if rows and rows[0]["kind"] == "none" else None
    for row in rows:
        speed = row["tokens_per_second"]
        row["speedup"] = speed / base_speed if base_speed and speed else None
        # A row measured on another day than the reused reference run: its speed-up crosses
        # runs (the machine's state differs between them); its paired time cost does not.
        row["speedup_across_days"] = bool(
            row["speedup"]
            and row.get("measured")
            and journal.reference_date
            and row["measured"] != journal.reference_date
        )
    return rows


def _report_dict(
    config: EvalConfig,
    *,
    target_path: str,
    prompts: list[Prompt],
    counts: PromptCounts,
    loader_skipped: dict[str, int],
    limit: int,
    target_macs: int,
    rows: list[dict[str, Any]],
    served: str,
    backend: Backend,
    journal: _EvalJournal,
) -> dict[str, Any]:
    """The report (the content of eval.json): settings, prompt accounting, costs and rows."""
    return {
        "target": config.target,
        "target_path": target_path,
        "backend": config.backend,
        "num_draft_tokens": config.num_draft_tokens,
        "max_new_tokens": config.max_new_tokens,
        "temperature": config.temperature,
        "sampled_temperatures": config.sampled_temperatures,
        "num_prompts": len(prompts),
        "categories": sorted({p.category for p in prompts}),
        "prompts": {
            "source": config.prompts,
            "match": config.prompts_match,
            "turns": config.turns,
            "questions": counts.questions,
            "evaluated": counts.evaluated,
            "truncated": counts.truncated,
            "skipped": counts.skipped,
            "loader_skipped": loader_skipped,
        },
        "max_model_len": limit,
        "macs_context_length": config.macs_context_length,
        "target_macs": target_macs,
        "mal_accounting": MAL_ACCOUNTING[config.backend],
        "drafters": rows,
        "config": config.model_dump(),
        "served_dtype": served,
        "versions": _versions(backend),
        # The settings key and each drafter's checkpoint identity: a later run with the same
        # settings reuses these rows and measures only drafters not here (_EvalJournal).
        "journal": journal.record(),
    }
