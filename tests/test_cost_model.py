"""The speculative-decoding cost model on measured step times."""

from __future__ import annotations

import pytest

from sd2_hf.evaluation.cost_model import projected_speedup, projected_sweep


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
