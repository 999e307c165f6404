"""Evaluation: MAL accounting, both backends on tiny models, UAG, bad input, reports and plots."""

from __future__ import annotations

import json
import math
import statistics
import time

import pytest
import tiny

from sd2_hf.evaluation.backend import add_counters, counters_from_steps
from sd2_hf.evaluation.config import EvalConfig, parse_drafter
from sd2_hf.evaluation.prompts import Question, _spread, fit_length
from sd2_hf.evaluation.report import (
    plot_acceptance_per_position,
    plot_mal_per_category,
    plot_mal_vs_macs,
)
from sd2_hf.evaluation.runner import run_eval

K = 3
# A multiple of K+1: with the target drafting for itself every step commits K+1 tokens.
MAX_NEW = 16
QUESTIONS = tiny.QUESTIONS


# Tiny models are dominated by thread hand-offs: one thread is faster on a busy machine.
pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def mtbench_file(tmp_path_factory):
    return tiny.write_questions(
        tmp_path_factory.mktemp("prompts") / "question.jsonl", "And then what?"
    )


def _config(target, mtbench_file, output, **overrides) -> EvalConfig:
    options = {"num_draft_tokens": K, "max_new_tokens": MAX_NEW} | overrides
    return tiny.eval_config(target, mtbench_file, output, **options)


@pytest.fixture(scope="module")
def hf_report(
    tmp_path_factory,
    tiny_model_dir,
    tiny_drafter_dir,
    other_family_dir,
    noisy_drafter_dir,
    mtbench_file,
):
    out = tmp_path_factory.mktemp("eval-hf")
    config = _config(
        tiny_model_dir,
        mtbench_file,
        out,
        drafters=[
            f"self={tiny_model_dir}",
            f"random={tiny_drafter_dir}",
            f"noisy={noisy_drafter_dir}",
            f"uag={other_family_dir}",
        ],
    )
    return run_eval(config), out


def _row(report, name):
    return next(d for d in report["drafters"] if d["name"] == name)


# --- accounting -------------------------------------------------------------------------


def test_counters_from_steps_counts_common_prefix_and_positions():
    steps = [
        ([5, 6, 7], [5, 6, 7, 8]),  # all 3 accepted + bonus
        ([5, 9, 7], [5, 6]),  # first accepted, correction at the second
        ([4, 4, 4], [1]),  # none accepted
        ([], [3]),  # no drafts: plain decoding, not a draft step
        ([2, 2], [2, 2]),  # drafts hit the length limit, all matched, no bonus
    ]
    c = counters_from_steps(steps)
    assert (c.num_drafts, c.num_draft_tokens, c.num_accepted_tokens) == (4, 11, 6)
    assert c.accepted_per_position == [3, 2, 1]
    assert c.mal == pytest.approx(1 + 6 / 4)
    total = add_counters([c, counters_from_steps([([1], [1, 2])])], positions=4)
    assert total.accepted_per_position == [4, 2, 1, 0]
    assert total.num_drafts == 5


def test_parse_drafter_names_and_paths():
    named = parse_drafter("sd2=out/drafter")
    assert (named.name, named.path) == ("sd2", "out/drafter")
    assert parse_drafter("HuggingFaceTB/SmolLM2-135M").name == "SmolLM2-135M"
    assert parse_drafter("asset:smollm2-135m-instruct").name == "smollm2-135m-instruct"
    assert parse_drafter("asset:smollm2-135m-instruct").path == "asset:smollm2-135m-instruct"


def test_config_rejects_bad_combinations():
    with pytest.raises(ValueError, match="unique"):
        EvalConfig(target="t", drafters=["a=x", "a=y"])
    with pytest.raises(ValueError, match="baselines"):
        EvalConfig(target="t", drafters=["ngram=x"])
    with pytest.raises(ValueError, match="transformers backend only"):
        EvalConfig(target="t", backend="vllm", temperature=0.7)
    with pytest.raises(ValueError, match="nothing to evaluate"):
        EvalConfig(target="t", baselines=[])
    with pytest.raises(ValueError, match="extra"):
        EvalConfig(target="t", draft_tokens=4)


def test_prompt_length_policy_and_category_spread():
    assert fit_length([1, 2, 3], 5, "skip") == ([1, 2, 3], False)
    assert fit_length([1, 2, 3, 4], 2, "skip") == (None, False)
    assert fit_length([1, 2, 3, 4], 2, "truncate") == ([3, 4], True)
    questions = [Question(str(i), c, ["q"]) for i, c in enumerate("aaaabbbbcc")]
    picked = _spread(questions, 5)
    assert sorted(q.category for q in picked) == ["a", "a", "b", "b", "c"]


def test_offset_skips_the_first_rows(tmp_path):
    import json

    import tiny

    from sd2_hf.evaluation.prompts import load_questions

    path = tmp_path / "c.jsonl"
    rows = tiny.conversations(6)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    later, _ = load_questions(EvalConfig(target="t", prompts=str(path), offset=4))
    assert [q.turns[0] for q in later] == [r["messages"][0]["content"] for r in rows[4:]]
    with pytest.raises(ValueError, match="from row 6 on"):
        load_questions(EvalConfig(target="t", prompts=str(path), offset=6))


def test_prompts_match_keeps_matching_first_turns_after_the_offset(tmp_path):
    import json

    import tiny

    from sd2_hf.evaluation.prompts import load_questions

    path = tmp_path / "c.jsonl"
    rows = tiny.conversations(8)
    for i, row in enumerate(rows):
        ask = "Write a Python function" if i in (1, 5, 6) else "Write a poem"
        row["messages"][0]["content"] = f"{ask} number {i}"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = EvalConfig(target="t", prompts=str(path), offset=2, prompts_match=r"\bpython\b")
    picked, _ = load_questions(config)
    assert [q.turns[0] for q in picked] == [rows[i]["messages"][0]["content"] for i in (5, 6)]
    limited, _ = load_questions(config.model_copy(update={"limit": 1}))
    assert [q.turns[0] for q in limited] == [rows[5]["messages"][0]["content"]]
    with pytest.raises(ValueError, match="matching prompts_match 'rust'"):
        load_questions(config.model_copy(update={"prompts_match": "rust"}))
    with pytest.raises(ValueError, match="not a regular expression"):
        EvalConfig(target="t", prompts=str(path), prompts_match="(")


def test_code_span_fences_a_pattern_holding_backticks():
    from sd2_hf.evaluation.report import code_span

    assert code_span(r"\bpython\b") == r"`\bpython\b`"
    assert code_span("```|def") == "```` ```|def ````"


# --- transformers backend ---------------------------------------------------------------


def test_target_drafting_for_itself_gives_k_plus_one(hf_report):
    report, _ = hf_report
    me = _row(report, "self")
    # No early EOS (every prompt ran to max_new_tokens), so every step committed K+1 tokens.
    assert me["new_tokens"] == report["num_prompts"] * MAX_NEW
    assert me["mal"] == K + 1
    assert me["acceptance_per_position"] == [1.0] * K
    assert me["target_steps"] == report["num_prompts"] * MAX_NEW // (K + 1)
    assert me["improvement_factor"] == pytest.approx((K + 1) / (K + 1))
    assert all(v == K + 1 for v in me["mal_per_category"].values())


def test_random_drafter_mal_close_to_one(hf_report):
    report, _ = hf_report
    random = _row(report, "random")
    assert 1.0 <= random["mal"] < 1.25
    assert random["draft_steps"] > 0
    noisy = _row(report, "noisy")
    assert random["mal"] < noisy["mal"] < K + 1


def test_every_greedy_output_is_lossless_including_uag(hf_report):
    report, _ = hf_report
    uag = _row(report, "uag")
    assert uag["uag"] is True and uag["draft_steps"] > 0
    for row in report["drafters"]:
        if row["kind"] != "none":
            assert row["lossless_checked"]
            assert row["lossless_mismatches"] == 0, row["name"]


def test_baselines_and_costs(hf_report):
    report, _ = hf_report
    none = _row(report, "none")
    assert none["mal"] == 1.0 and none["speedup"] == 1.0 and none["draft_steps"] == 0
    ngram = _row(report, "ngram")
    assert ngram["relative_macs"] == 0.0 and ngram["improvement_factor"] == ngram["mal"]
    noisy = _row(report, "noisy")
    assert noisy["relative_macs"] == pytest.approx(1.0)
    assert noisy["improvement_factor"] == pytest.approx(noisy["mal"] / (K * 1.0 + 1))
    for row in report["drafters"]:
        assert row["tokens_per_second"] > 0
    assert set(report["categories"]) == {"writing", "math"}


def test_measured_step_cost_beside_the_macs_ratio(hf_report):
    report, _ = hf_report
    reference_lengths = [MAX_NEW] * report["num_prompts"]  # no prompt stops early (above)
    for name in ("self", "random", "noisy"):
        row = _row(report, name)
        step = row["step_cost"]
        # Both models decoded the first 4 prompts for exactly the reference's lengths.
        assert step["tokens"] == sum(reference_lengths[:4])
        assert step["drafter_seconds_per_token"] > 0 and step["target_seconds_per_token"] > 0
        # Two alternating rounds (the default) of paired per-prompt ratios; c is their median.
        assert step["rounds"] == 2 and len(step["ratios"]) == 2 * 4
        cost = statistics.median(step["ratios"])
        assert step["ratio"] == pytest.approx(cost)
        assert row["measured_cost"] == pytest.approx(cost)
        assert row["measured_improvement_factor"] == pytest.approx(row["mal"] / (K * cost + 1))
        best = max(
            row["draft_length_sweep"],
            key=lambda s: s["mal"] / (s["num_draft_tokens"] * cost + 1),
        )
        assert row["best_num_draft_tokens_measured"] == best["num_draft_tokens"]
        # The cost model on these times: the verify step's ratio at every swept K and the
        # run's K, and the projected speed-up from it.
        ratios = {int(k): r for k, r in step["verify_ratio"].items()}
        assert set(ratios) == {s["num_draft_tokens"] for s in row["draft_length_sweep"]} | {K}
        assert all(r > 0 for r in ratios.values())
        verify = ratios[K] * step["target_seconds_per_token"]
        expected = row["mal"] * step["target_seconds_per_token"]
        expected /= K * cost * step["target_seconds_per_token"] + verify
        assert row["projected_speedup"] == pytest.approx(expected)
        assert row["best_num_draft_tokens_projected"] in ratios
    # Not measured where a drafter has no step of its own to time (ngram) or another tokenizer.
    for name in ("ngram", "uag"):
        row = _row(report, name)
        assert row["step_cost"] is None and row["measured_cost"] is None
        assert row["measured_improvement_factor"] is None
    assert report["num_prompts"] == len(QUESTIONS)


def test_teacher_forced_rows_equal_the_assisted_ones(
    hf_report, tmp_path, tiny_model_dir, tiny_drafter_dir, noisy_drafter_dir, mtbench_file
):
    """`assisted: false` (choosing K on held-out prompts at the cost of one target run): every
    model drafter's greedy counters, per prompt and per K, are those of the assisted run, with
    no timing and no lossless check; a drafter it cannot force is one clear error."""
    report, _ = hf_report
    drafters = [
        f"self={tiny_model_dir}",
        f"random={tiny_drafter_dir}",
        f"noisy={noisy_drafter_dir}",
    ]
    config = _config(
        tiny_model_dir,
        mtbench_file,
        tmp_path / "forced",
        drafters=drafters,
        assisted=False,
        baselines=["none"],
    )
    forced = run_eval(config)
    for name in ("self", "random", "noisy"):
        row, assisted = _row(forced, name), _row(report, name)
        assert row["teacher_forced"] is True
        assert row["per_prompt"] == assisted["per_prompt"] and row["mal"] == assisted["mal"]
        keys = ("num_draft_tokens", "mal", "improvement_factor")
        assert [{k: s[k] for k in keys} for s in row["draft_length_sweep"]] == [
            {k: s[k] for k in keys} for s in assisted["draft_length_sweep"]
        ]
        assert row["best_num_draft_tokens"] == assisted["best_num_draft_tokens"]
        assert row["tokens_per_second"] is None and row["lossless_checked"] is False
        assert row["step_cost"] is None and row["speedup"] is None
    with pytest.raises(ValueError, match="assisted: false measures greedy MAL"):
        _config(tiny_model_dir, mtbench_file, tmp_path, assisted=False, baselines=["ngram"])


def test_step_cost_pairs_alternating_rounds_and_takes_the_median():
    """The target and the drafter decode in alternating order each round (a drift of the
    machine falls on both), and c is the median of the paired per-prompt ratios: one slow
    outlier pass moves it no further than the other pairs allow."""
    import contextlib

    from sd2_hf.evaluation.backend import DrafterPlan
    from sd2_hf.evaluation.runner import measure_step_cost

    calls, seconds = [], iter([10, 10, 10, 10, 2, 2, 2, 2, 2, 20, 2, 2, 10, 10, 10, 10])

    class Backend:
        @contextlib.contextmanager
        def decoder(self, drafter):
            calls.append("target" if drafter is None else drafter.name)
            yield lambda ids, n: (0.0, n) if n == 4 else (float(next(seconds)), n)  # 4: warm-up

    class Target:
        runs, rounds, verify_ratio = [([1, 2], 8)] * 4, 2, None

    step = measure_step_cost(Backend(), DrafterPlan("d", "model", "p"), Target())
    assert calls == ["target", "d", "d", "target"]
    assert step["ratios"] == [0.2, 0.2, 0.2, 0.2, 0.2, 2.0, 0.2, 0.2]
    assert step["ratio"] == pytest.approx(0.2) and step["tokens"] == 32
    assert step["target_seconds_per_token"] == pytest.approx(80 / 64)


def _parse_table(markdown: str, first_header: str) -> list[dict[str, str]]:
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)))
    return rows


def test_markdown_table_agrees_with_json(hf_report):
    report, out = hf_report
    on_disk = json.loads((out / "eval.json").read_text())
    assert on_disk["drafters"] == json.loads(json.dumps(report["drafters"]))
    markdown = (out / "eval.md").read_text()
    table = _parse_table(markdown, "drafter")
    assert [r["drafter"] for r in table] == [d["name"] for d in on_disk["drafters"]]
    for row, d in zip(table, on_disk["drafters"], strict=True):
        assert float(row["MAL"]) == pytest.approx(d["mal"], abs=5e-4)
        assert int(row["draft steps"]) == d["draft_steps"]
        assert int(row["accepted tokens"]) == d["accepted_tokens"]
        if d["improvement_factor"] is not None:
            assert float(row["improvement factor"]) == pytest.approx(
                d["improvement_factor"], abs=5e-4
            )
        if d["lossless_checked"]:
            assert int(row["lossless mismatches"]) == d["lossless_mismatches"]
    per_category = _parse_table(markdown.split("## MAL per category")[1], "drafter")
    for row, d in zip(per_category, on_disk["drafters"], strict=True):
        for cat in on_disk["categories"]:
            assert float(row[cat]) == pytest.approx(d["mal_per_category"][cat], abs=5e-4)


def test_plots_are_pngs_with_labelled_axes(hf_report):
    report, out = hf_report
    for name in ("mal_per_category.png", "acceptance_per_position.png", "mal_vs_macs.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    for plot in (plot_mal_per_category, plot_acceptance_per_position, plot_mal_vs_macs):
        ax = plot(report).axes[0]
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title(), plot.__name__
    scatter = plot_mal_vs_macs(report).axes[0]
    labels = {t.get_text() for t in scatter.texts}
    assert {"self", "noisy", "random", "uag", "ngram"} <= labels
    # Each timed drafter also sits at its measured time ratio (hollow, same MAL).
    hollow = {
        (line.get_xdata()[0], line.get_ydata()[0])
        for line in scatter.lines
        if line.get_markerfacecolor() == "none"
    }
    timed = [r for r in report["drafters"] if r.get("measured_cost") is not None]
    assert timed and hollow == {(r["measured_cost"], r["mal"]) for r in timed}
    assert "measured time" in scatter.get_xlabel()
    bars = plot_mal_per_category(report).axes[0]
    assert [t.get_text() for t in bars.get_legend().get_texts()][:2] == ["ngram", "self"]


# --- bad input --------------------------------------------------------------------------


def test_other_tokenizer_without_uag_is_a_clear_error(
    tmp_path, tiny_model_dir, other_family_dir, mtbench_file
):
    config = _config(
        tiny_model_dir, mtbench_file, tmp_path, drafters=[str(other_family_dir)], uag="off"
    )
    with pytest.raises(ValueError, match="different tokenizer.*uag"):
        run_eval(config)


def test_sampled_uag_subset_vocabulary_crash_is_explained(tmp_path, tiny_tokenizer, mtbench_file):
    # The same corpus with a smaller BPE vocabulary gives a tokenizer whose vocabulary is a
    # subset of the target's: the case transformers' sampled UAG crashes on.
    subset_tok = tiny.build_tokenizer(vocab_size=320, seed=0)
    assert set(subset_tok.get_vocab()) < set(tiny_tokenizer.get_vocab())
    target = tiny.save_model(
        tiny.build_model(tiny_tokenizer, seed=0), tiny_tokenizer, tmp_path / "t"
    )
    drafter = tiny.save_model(tiny.build_model(subset_tok, seed=3), subset_tok, tmp_path / "d")
    config = _config(
        target,
        mtbench_file,
        tmp_path / "out",
        drafters=[str(drafter)],
        baselines=[],
        temperature=0.8,
        limit=1,
        max_new_tokens=4,
    )
    with pytest.raises(RuntimeError, match="subset of the target's.*temperature 0"):
        run_eval(config)


def test_too_long_prompts_are_skipped_or_truncated_and_counted(
    tmp_path, tiny_model_dir, mtbench_file
):
    # First turns render to 26-37 tokens, second turns to 60+; a 52-token limit with 16 new
    # tokens leaves room for 36: some first turns fit, one and all second turns do not.
    common = dict(baselines=["none"], max_model_len=52, turns="all")
    skipped = run_eval(_config(tiny_model_dir, mtbench_file, tmp_path / "s", **common))
    counts = skipped["prompts"]
    assert counts["skipped"].get("too_long", 0) > 0 and counts["evaluated"] > 0
    # A skipped first turn takes its later turns with it: every turn is accounted for.
    assert counts["evaluated"] + sum(counts["skipped"].values()) == 2 * len(QUESTIONS)
    truncated = run_eval(
        _config(tiny_model_dir, mtbench_file, tmp_path / "t", too_long="truncate", **common)
    )
    assert truncated["prompts"]["truncated"] > 0
    assert truncated["prompts"]["evaluated"] == 2 * len(QUESTIONS)
    assert not math.isnan(truncated["drafters"][0]["tokens_per_second"])


def test_cli_builds_the_config(tmp_path):
    from sd2_hf.cli import build_parser
    from sd2_hf.evaluation.config import EvalConfig
    from sd2_hf.utils.schema_cli import model_from_args

    args = build_parser().parse_args(
        [
            "eval",
            "--target",
            "t",
            "--drafter",
            "a=x",
            "--drafter",
            "y",
            "--baselines",
            "ngram",
            "--num-draft-tokens",
            "5",
            "--backend",
            "vllm",
            "--output",
            str(tmp_path),
        ]
    )
    config = model_from_args(EvalConfig, args)
    assert config.drafters == ["a=x", "y"] and config.baselines == ["ngram"]
    assert config.num_draft_tokens == 5 and config.backend == "vllm"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--target", "t", "--baselines", "beam"])


# --- vLLM backend -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def backend_reports(vllm_python, tmp_path_factory, tiny_model_dir, noisy_drafter_dir, mtbench_file):
    """The same drafters and prompts on both backends (two vLLM servers: one per drafter)."""
    reports = {}
    for backend in ("vllm", "transformers"):
        config = _config(
            tiny_model_dir,
            mtbench_file,
            tmp_path_factory.mktemp(f"eval-{backend}"),
            backend=backend,
            # One dtype on both backends: on a CPU with bf16 instructions vLLM's `auto` serves
            # this float32 model in bf16, and MAL is then measured on other numerics.
            dtype="float32",
            drafters=[f"self={tiny_model_dir}", f"noisy={noisy_drafter_dir}"],
            baselines=[],
            check_lossless=False,  # needs a third server (target alone); shown by the bench
            max_new_tokens=2 * MAX_NEW,
        )
        reports[backend] = run_eval(config)
    # vLLM again with the prompts of each category sent together (counters read per category).
    config = _config(
        tiny_model_dir,
        mtbench_file,
        tmp_path_factory.mktemp("eval-vllm-concurrent"),
        backend="vllm",
        drafters=[f"noisy={noisy_drafter_dir}"],
        baselines=[],
        check_lossless=False,
        max_new_tokens=2 * MAX_NEW,
        concurrency=4,
        dtype="float32",
    )
    reports["vllm-concurrent"] = run_eval(config)
    return reports


@pytest.mark.vllm
def test_vllm_target_drafting_for_itself_gives_k_plus_one(backend_reports):
    me = _row(backend_reports["vllm"], "self")
    assert me["mal"] == K + 1
    assert me["acceptance_per_position"] == [1.0] * K
    assert backend_reports["vllm"]["versions"]["vllm"]


@pytest.mark.vllm
def test_backends_agree_on_mal_within_5_percent(backend_reports):
    for name in ("self", "noisy"):
        hf = _row(backend_reports["transformers"], name)["mal"]
        vllm = _row(backend_reports["vllm"], name)["mal"]
        # Greedy, same prompt ids and weights: the same tokens are verified; the step
        # boundaries differ (vLLM's prefill commits the first token undrafted, transformers
        # drafts from the prompt) and so do the last drafts (shortened by transformers only).
        assert vllm == pytest.approx(hf, rel=0.05), name


@pytest.mark.vllm
def test_concurrent_vllm_requests_keep_mal_exact_per_category(backend_reports):
    one, many = (
        _row(backend_reports["vllm"], "noisy"),
        _row(backend_reports["vllm-concurrent"], "noisy"),
    )
    # Batched fp32 arithmetic could tip a near-tie; on these prompts the outputs are the same,
    # so the counters are too, overall and per category.
    assert many["new_tokens"] == one["new_tokens"]
    assert (many["draft_steps"], many["accepted_tokens"]) == (
        one["draft_steps"],
        one["accepted_tokens"],
    )
    assert many["mal_per_category"] == pytest.approx(one["mal_per_category"])
    assert many["acceptance_per_position"] == pytest.approx(one["acceptance_per_position"])
    assert backend_reports["vllm-concurrent"]["config"]["concurrency"] == 4


@pytest.mark.vllm
def test_vllm_times_a_model_served_alone_for_the_measured_cost(
    vllm_python, tmp_path, tiny_model_dir, mtbench_file, tiny_tokenizer
):
    from sd2_hf.evaluation.runner import decode_seconds, make_backend

    config = _config(tiny_model_dir, mtbench_file, tmp_path, backend="vllm", dtype="float32")
    backend = make_backend(config, str(tiny_model_dir), tiny_tokenizer, 512, tmp_path)
    prompt = tiny_tokenizer("the cat sat").input_ids
    # EOS ignored: every run decodes exactly its length (a random tiny model emits EOS early).
    timed = decode_seconds(backend, None, [(prompt, 12), (prompt, 7)])
    assert [n for _, n in timed] == [12, 7] and all(s > 0 for s, _ in timed)
    assert (tmp_path / "logs" / "vllm-target-alone.log").is_file()


def test_concurrency_is_for_vllm_only(tiny_model_dir, mtbench_file, tmp_path):
    with pytest.raises(ValueError, match="concurrency > 1 applies to backend='vllm' only"):
        _config(tiny_model_dir, mtbench_file, tmp_path, concurrency=2)


# --- resume ---------------------------------------------------------------------------------


def _count_runs(monkeypatch, kill_once: str | None = None) -> tuple[list[str], list[int]]:
    """Record which drafters `measure` runs and each reference run `build_prompts` makes; with
    `kill_once`, the first measurement of that drafter is interrupted as by a kill."""
    import sd2_hf.evaluation.runner as runner

    measured, references, killed = [], [], []
    real_measure, real_build = runner.measure, runner.build_prompts

    def measure(backend, plan, *args, **kwargs):
        measured.append(plan.name)
        if plan.name == kill_once and not killed:
            killed.append(plan.name)
            raise KeyboardInterrupt("killed")
        return real_measure(backend, plan, *args, **kwargs)

    def build_prompts(*args, **kwargs):
        references.append(1)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(runner, "measure", measure)
    monkeypatch.setattr(runner, "build_prompts", build_prompts)
    return measured, references


def _assert_same_rows(report, fresh, names) -> None:
    """The rows of `names` count the same tokens in both reports, all lossless."""
    for name in names:
        a, b = _row(report, name), _row(fresh, name)
        assert (a["mal"], a["accepted_tokens"], a["draft_steps"], a["new_tokens"]) == (
            b["mal"],
            b["accepted_tokens"],
            b["draft_steps"],
            b["new_tokens"],
        )
        assert a["lossless_mismatches"] == b["lossless_mismatches"] == 0


def test_interrupted_eval_resumes_without_remeasuring(
    tmp_path, monkeypatch, tiny_model_dir, tiny_drafter_dir, noisy_drafter_dir, mtbench_file
):
    """A run killed during its second drafter keeps the reference run and the first drafter's
    row; the rerun measures only the second, and the report equals an uninterrupted run's."""
    drafters = [f"random={tiny_drafter_dir}", f"noisy={noisy_drafter_dir}"]
    config = _config(tiny_model_dir, mtbench_file, tmp_path / "eval", drafters=drafters)
    measured, references = _count_runs(monkeypatch, kill_once="noisy")
    with pytest.raises(KeyboardInterrupt):
        run_eval(config)
    assert (tmp_path / "eval" / "partial" / "reference.json").is_file()
    assert not (tmp_path / "eval" / "eval.json").exists()

    report = run_eval(config)
    assert measured == ["ngram", "random", "noisy", "noisy"]  # the others measured once
    assert len(references) == 1  # the target's reference run is reused
    assert not (tmp_path / "eval" / "partial").exists()

    fresh = run_eval(_config(tiny_model_dir, mtbench_file, tmp_path / "fresh", drafters=drafters))
    _assert_same_rows(report, fresh, ("none", "random", "noisy"))
    # Rows keep the day they were measured; a row added on a later day to the reused target run
    # has its speed-up flagged as crossing runs.
    day = time.strftime("%Y-%m-%d")
    assert {r["measured"] for r in report["drafters"]} == {day}
    assert not any(r["speedup_across_days"] for r in report["drafters"])
    import sd2_hf.evaluation.runner as runner

    monkeypatch.setattr(runner, "today", lambda: "2099-01-01")
    later = run_eval(
        _config(
            tiny_model_dir,
            mtbench_file,
            tmp_path / "eval",
            drafters=[*drafters, f"again={tiny_drafter_dir}"],
        )
    )
    rows = {r["name"]: r for r in later["drafters"]}
    assert rows["again"]["measured"] == "2099-01-01" and rows["again"]["speedup_across_days"]
    assert rows["random"]["measured"] == day and not rows["random"]["speedup_across_days"]

    # Other settings: the partial results are not reused.
    measured.clear()
    (tmp_path / "eval" / "eval.json").unlink()
    changed = _config(
        tiny_model_dir, mtbench_file, tmp_path / "eval", drafters=drafters, max_new_tokens=8
    )
    run_eval(changed)
    assert measured == ["ngram", "random", "noisy"]
    assert len(references) == 3


def test_rows_served_in_another_dtype_are_not_reused(
    tmp_path, monkeypatch, tiny_model_dir, mtbench_file
):
    """vLLM's `auto` computes in fp32 or bf16 depending on the CPU (`served_dtype`): partial
    rows measured in one are discarded, not reported beside rows of the other."""
    import sd2_hf.evaluation.runner as runner
    from sd2_hf.utils import models

    config = _config(tiny_model_dir, mtbench_file, tmp_path / "eval", backend="vllm")

    def journal():
        served = runner._served_dtype(config, str(tiny_model_dir))
        return runner._EvalJournal(tmp_path / "eval", config, str(tiny_model_dir), served)

    monkeypatch.setattr(models, "served_dtype", lambda model, dtype: dtype)
    first = journal()
    assert "served_dtype" not in first.key
    earlier = first.dir / "rows" / "earlier.json"
    earlier.write_text("{}")
    journal()
    assert earlier.is_file()  # same settings: kept
    monkeypatch.setattr(models, "served_dtype", lambda model, dtype: "float32")
    assert journal().key["served_dtype"] == "float32" and not earlier.exists()


def test_settings_at_their_defaults_do_not_enter_the_reuse_key(
    tmp_path, tiny_model_dir, mtbench_file
):
    """A field added to EvalConfig with a default (as `offset` was) must not make every finished
    row of an earlier evaluation stale: the key holds only settings that differ from defaults."""
    import sd2_hf.evaluation.runner as runner

    def key(**changes):
        config = _config(tiny_model_dir, mtbench_file, tmp_path / "eval", **changes)
        return runner._EvalJournal(tmp_path / "eval", config, str(tiny_model_dir), "auto").key

    assert "offset" not in key()["settings"]
    assert key(offset=3)["settings"]["offset"] == 3
    assert key()["settings"] == key(offset=0)["settings"]


def test_eval_split_over_workers_reuses_every_row(
    tmp_path, monkeypatch, tiny_model_dir, tiny_drafter_dir, noisy_drafter_dir, mtbench_file
):
    """`report=False` measures without writing a report: the reference, then disjoint drafter
    subsets, land in one journal; the last full run measures nothing and reports what an
    uninterrupted run reports."""
    drafters = [f"random={tiny_drafter_dir}", f"noisy={noisy_drafter_dir}"]
    out = tmp_path / "eval"
    measured, references = _count_runs(monkeypatch)
    first = run_eval(_config(tiny_model_dir, mtbench_file, out, baselines=["none"]), report=False)
    assert [r["name"] for r in first["drafters"]] == ["none"]
    worker_a = run_eval(
        _config(tiny_model_dir, mtbench_file, out, drafters=drafters[:1], baselines=["ngram"]),
        report=False,
    )
    worker_b = run_eval(
        _config(tiny_model_dir, mtbench_file, out, drafters=drafters[1:], baselines=["none"]),
        report=False,
    )
    assert [r["name"] for r in worker_a["drafters"]] == ["ngram", "random"]
    assert [r["name"] for r in worker_b["drafters"]] == ["none", "noisy"]
    assert not (out / "eval.json").exists()
    assert len(list((out / "partial" / "rows").iterdir())) == 3
    assert measured == ["ngram", "random", "noisy"] and len(references) == 1

    report = run_eval(_config(tiny_model_dir, mtbench_file, out, drafters=drafters))
    assert measured == ["ngram", "random", "noisy"]  # every row reused
    assert len(references) == 1
    assert (out / "eval.json").is_file() and not (out / "partial").exists()
    monkeypatch.undo()
    fresh = run_eval(_config(tiny_model_dir, mtbench_file, tmp_path / "fresh", drafters=drafters))
    _assert_same_rows(report, fresh, ("none", "ngram", "random", "noisy"))


def test_a_drafter_added_to_a_finished_eval_is_the_only_one_measured(
    tmp_path, monkeypatch, tiny_model_dir, tiny_drafter_dir, noisy_drafter_dir, mtbench_file
):
    """After eval.json is written, a rerun with one more drafter (same settings) reuses the
    rows of eval.json and the target's reference run (eval-reference.json) and measures only
    the new drafter; every speed-up is against the same target row. A changed checkpoint is
    measured again, and changed settings re-measure everything."""
    import os
    import shutil

    random_dir = shutil.copytree(tiny_drafter_dir, tmp_path / "random")
    drafters = [f"random={random_dir}", f"noisy={noisy_drafter_dir}"]
    out = tmp_path / "eval"
    measured, references = _count_runs(monkeypatch)
    first = run_eval(_config(tiny_model_dir, mtbench_file, out, drafters=drafters[:1]))
    assert measured == ["ngram", "random"] and len(references) == 1
    assert not (out / "partial").exists() and (out / "eval-reference.json").is_file()

    both = run_eval(_config(tiny_model_dir, mtbench_file, out, drafters=drafters))
    assert measured == ["ngram", "random", "noisy"]  # only the new drafter
    assert len(references) == 1  # the target's reference run is reused
    assert [r["name"] for r in both["drafters"]] == ["none", "ngram", "random", "noisy"]
    for name in ("none", "ngram", "random"):
        assert _row(both, name) == _row(first, name)
    base = _row(both, "none")["tokens_per_second"]
    for row in both["drafters"]:
        assert row["speedup"] == pytest.approx(row["tokens_per_second"] / base)
    assert _row(both, "noisy")["lossless_mismatches"] == 0
    saved = json.loads((out / "eval.json").read_text())
    assert [r["name"] for r in saved["drafters"]] == ["none", "ngram", "random", "noisy"]

    # The same name and path with other checkpoint files: measured again.
    config = random_dir / "config.json"
    stat = config.stat()
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    run_eval(_config(tiny_model_dir, mtbench_file, out, drafters=drafters))
    assert measured == ["ngram", "random", "noisy", "random"] and len(references) == 1

    # Other settings: nothing is reused.
    measured.clear()
    run_eval(_config(tiny_model_dir, mtbench_file, out, drafters=drafters, max_new_tokens=8))
    assert measured == ["ngram", "random", "noisy"] and len(references) == 2
