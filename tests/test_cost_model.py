"""The speculative-decoding cost model on measured step times."""

from __future__ import annotations

import pytest

from sd2_hf.evaluation.cost_model import projected_speedup, projected_sweep, verify_ratios


def test_reduces_to_the_improvement_factor_when_verify_costs_one_step():
    # t_verify = t_target and t_draft = c t_target: MAL / (K c + 1).
    assert projected_speedup(3.0, 4, 0.25, 1.0, 1.0) == pytest.approx(3.0 / (4 * 0.25 + 1))


def test_a_costlier_verify_step_and_a_costlier_drafter_both_slow_it_down():
    base = projected_speedup(3.0, 4, 0.3, 0.2, 0.2)
    assert projected_speedup(3.0, 4, 0.3, 0.2, 0.3) < base
    assert projected_speedup(3.0, 4, 0.4, 0.2, 0.2) < base
    # A free drafter with a free verify step: the speed-up is MAL.
    assert projected_speedup(2.5, 3, 0.0, 1.0, 1.0) == pytest.approx(2.5)


def test_sweep_uses_each_k_with_both_a_mal_and_a_verify_time():
    sweep = projected_sweep({1: 1.8, 2: 2.4, 3: 2.8}, 0.1, 1.0, {1: 1.1, 2: 1.2})
    assert set(sweep) == {1, 2}
    assert sweep[2] == pytest.approx(2.4 / (2 * 0.1 + 1.2))


@pytest.mark.parametrize(
    "args", [(2.0, 0, 0.1, 1.0, 1.0), (2.0, 2, -0.1, 1.0, 1.0), (2.0, 2, 0.1, 0.0, 1.0)]
)
def test_bad_step_times_are_refused(args):
    with pytest.raises(ValueError, match="step times"):
        projected_speedup(*args)


def test_project_study_projects_every_swept_row_with_its_own_run_beside_it():
    from sd2_hf.evaluation.cost_model import project_study, projected_speedup

    sweep = [{"num_draft_tokens": k, "mal": m} for k, m in ((1, 1.8), (2, 2.4), (4, 3.2))]
    study = {
        "evaluations": {
            "mt": {
                "num_draft_tokens": 4,
                "drafters": [
                    {"name": "none", "speedup": 1.0},
                    {"name": "dense", "speedup": 1.3, "draft_length_sweep": sweep},
                ],
            }
        }
    }
    verify = {1: 1.1, 2: 1.2, 4: 1.5}
    (only,) = project_study(study, 0.2, 1.0, verify).items()
    name, p = only
    assert name == "mt/dense" and p["own_run_k"] == 4 and p["own_run_speedup"] == 1.3
    assert p["by_k"] == {
        k: projected_speedup(s["mal"], k, 0.2, 1.0, verify[k])
        for s in sweep
        for k in [s["num_draft_tokens"]]
    }
    assert p["best"] == max(p["by_k"].values()) and p["by_k"][p["best_k"]] == p["best"]


def test_verify_ratios_are_the_median_over_runs_of_the_wide_forward_over_the_one_token_forward():
    calls = []

    def forward_seconds(prompt_ids, widths):
        calls.append((prompt_ids, widths))
        scale = {1: 1.0, 2: 3.0, 3: 2.0}[len(prompt_ids)]  # a per-run drift of the machine
        return {w: scale * (1.0 + 0.5 * (w - 1) * len(prompt_ids)) for w in widths}

    runs = [([7], 5), ([7, 8], 5), ([7, 8, 9], 5)]
    ratios = verify_ratios(forward_seconds, runs, [2, 4])
    # Per run, width K + 1 over width 1: 1 + 0.5 K len(prompt); medians over the three runs.
    assert ratios == {2: pytest.approx(3.0), 4: pytest.approx(5.0)}
    assert [w for _, w in calls] == [[1, 3, 5]] * 3
