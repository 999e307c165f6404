"""Draft length K chosen for the user: `sd2 eval`'s greedy sweep over K (teacher-forced) agrees
with measured assisted generation at every K, the report shows it, and `sd2 export` writes the
K with the best improvement factor into generation_config.json."""

from __future__ import annotations

import pytest
import tiny

from sd2_hf.evaluation.config import EvalConfig
from sd2_hf.evaluation.runner import run_eval
from sd2_hf.utils.io import read_json

K = 3
MAX_NEW = 16
SWEEP = [1, 2, 3, 5]

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    return tiny.write_questions(tmp_path_factory.mktemp("prompts") / "question.jsonl")


def _config(target, prompts, output, **overrides) -> EvalConfig:
    options = {"num_draft_tokens": K, "max_new_tokens": MAX_NEW, "baselines": ["none"]}
    return tiny.eval_config(target, prompts, output, **(options | overrides))


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_model_dir, noisy_drafter_dir, other_family_dir, prompts_file):
    out = tmp_path_factory.mktemp("eval-sweep")
    drafters = [f"noisy={noisy_drafter_dir}", f"self={tiny_model_dir}", f"uag={other_family_dir}"]
    config = _config(tiny_model_dir, prompts_file, out, drafters=drafters, draft_length_sweep=SWEEP)
    return run_eval(config), out


def _row(report, name):
    return next(d for d in report["drafters"] if d["name"] == name)


def test_sweep_equals_assisted_generation_at_every_k(
    swept, tmp_path, tiny_model_dir, noisy_drafter_dir, prompts_file
):
    report, _ = swept
    noisy = _row(report, "noisy")
    by_k = {s["num_draft_tokens"]: s for s in noisy["draft_length_sweep"]}
    assert sorted(by_k) == SWEEP
    assert by_k[K]["mal"] == noisy["mal"]  # the measured run at the report's own K
    for k in (1, 2, 5):
        measured = run_eval(
            _config(
                tiny_model_dir,
                prompts_file,
                tmp_path / f"k{k}",
                drafters=[f"noisy={noisy_drafter_dir}"],
                num_draft_tokens=k,
                draft_length_sweep=[],
            )
        )
        row = _row(measured, "noisy")
        assert "draft_length_sweep" not in row
        assert by_k[k]["mal"] == row["mal"], k
    # The noisy drafter accepts some drafts but not all: the sweep is not trivial.
    assert 1.2 < by_k[1]["mal"] < 2.0 and by_k[5]["mal"] > by_k[1]["mal"]
    # The target drafting for itself accepts everything: K+1 tokens per step at every K that
    # divides the budget (16 new tokens: K = 1 and 3).
    own = {s["num_draft_tokens"]: s["mal"] for s in _row(report, "self")["draft_length_sweep"]}
    assert own[1] == 2.0 and own[3] == 4.0


def test_best_k_is_the_best_improvement_factor(swept):
    report, _ = swept
    for name in ("noisy", "self"):
        row = _row(report, name)
        c = row["relative_macs"]
        for s in row["draft_length_sweep"]:
            assert s["improvement_factor"] == pytest.approx(
                s["mal"] / (s["num_draft_tokens"] * c + 1)
            )
        best = max(row["draft_length_sweep"], key=lambda s: s["improvement_factor"])
        assert row["best_num_draft_tokens"] == best["num_draft_tokens"]
    # No sweep where it cannot be derived: other tokenizers (UAG) and the baseline.
    assert "draft_length_sweep" not in _row(report, "uag")
    assert "draft_length_sweep" not in _row(report, "none")


def test_report_shows_the_table_behind_the_choice(swept):
    report, out = swept
    markdown = (out / "eval.md").read_text()
    section = markdown.split("## Draft length K (greedy)")[1].split("## ")[0]
    lines = [line for line in section.splitlines() if line.startswith("| noisy |")]
    assert len(lines) == 1
    cells = [c.strip() for c in lines[0].strip("|").split("|")]
    noisy = _row(report, "noisy")
    assert int(cells[1]) == noisy["best_num_draft_tokens"]
    assert int(cells[2]) == noisy["best_num_draft_tokens_measured"]
    assert int(cells[3]) == noisy["best_num_draft_tokens_projected"]
    for cell, s in zip(cells[5:], noisy["draft_length_sweep"], strict=True):
        # MAL / improvement factor / the same with the measured cost / projected speed-up.
        mal, factor, timed, projected = cell.strip("*").split(" / ")
        assert float(mal) == pytest.approx(s["mal"], abs=5e-4)
        assert float(factor) == pytest.approx(s["improvement_factor"], abs=5e-4)
        assert float(timed) == pytest.approx(s["measured_improvement_factor"], abs=5e-4)
        assert float(projected) == pytest.approx(s["projected_speedup"], abs=5e-4)
        assert cell.startswith("**") == (s["num_draft_tokens"] == noisy["best_num_draft_tokens"])


def test_sampled_runs_have_no_sweep(tmp_path, tiny_model_dir, noisy_drafter_dir, prompts_file):
    report = run_eval(
        _config(
            tiny_model_dir,
            prompts_file,
            tmp_path / "t1",
            drafters=[f"noisy={noisy_drafter_dir}"],
            temperature=1.0,
            baselines=[],
        )
    )
    assert "draft_length_sweep" not in _row(report, "noisy")


def test_export_writes_the_best_k_of_the_sweep(swept, tmp_path, noisy_drafter_dir):
    report, out = swept
    noisy = _row(report, "noisy")
    best = noisy["best_num_draft_tokens"]
    result = tiny.export(
        noisy_drafter_dir,
        tmp_path / "export",
        eval_json=[str(out / "eval.json")],
        eval_drafter="noisy",
    )
    assert result.num_draft_tokens == best
    written = read_json(tmp_path / "export" / "generation_config.json")
    assert written["num_assistant_tokens"] == best
    metadata = read_json(tmp_path / "export" / "sd2_drafter.json")
    expected_source = "eval" if best == K else "eval sweep"
    assert metadata["assisted_generation"]["source"] == expected_source
    assert metadata["eval"]["best_num_draft_tokens"] == best
    card = (tmp_path / "export" / "README.md").read_text()
    assert "MAL / improvement factor at other draft lengths" in card
    assert f"K={best}: " in card


def test_bad_sweep_values_are_refused(tiny_model_dir, prompts_file, tmp_path):
    with pytest.raises(ValueError, match="draft_length_sweep values must be draft lengths"):
        _config(tiny_model_dir, prompts_file, tmp_path, draft_length_sweep=[0, 4])
