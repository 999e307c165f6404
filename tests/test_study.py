"""`sd2 compare`: a study of several drafters on tiny models, resumed, extended, reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiny
import yaml

from sd2_hf.cli import main as sd2_main
from sd2_hf.pipeline import COMPLETE_FILE
from sd2_hf.study import load_study, plan_study

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def write_study(directory: Path, target: Path, **changes) -> Path:
    tiny.write_seed_data(directory)
    train = {"max_steps": 4, "learning_rate": 1e-2, "max_length": 64, "save_steps": 2}
    study = {
        "description": "tiny study",
        "output": "out",
        "results": "published",
        "target": str(target),
        "dataset": "seed.jsonl",
        "distill": {"max_new_tokens": 12, "filter_truncated": False, "dtype": "float32"},
        "drafters": {
            "pruned": {"prune": {"recipe": "sparsegpt-50", "num_samples": 8, "max_seq_length": 64}},
            "sd2": {"model": "pruned", "train": train},
            "sd2-step2": {"model": "sd2", "checkpoint": 2},
        },
        "evaluations": {
            "mt": {
                "prompts": "question.jsonl",
                "num_draft_tokens": 3,
                "max_new_tokens": 8,
                "baselines": ["none"],
                "draft_length_sweep": [1, 2],
            }
        },
        "comparisons": ["sd2 vs pruned"],
    }
    study.update(changes)
    path = directory / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def test_study_builds_evaluates_reuses_and_reports(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import sd2_hf.evaluation.runner as runner

    path = write_study(tmp_path / "s", tiny_model_dir)
    root = tmp_path / "s" / "out"
    assert sd2_main(["compare", str(path)]) == 0
    # Every chain ran through the pipeline's stages into <output>/drafters/<name>/<stage>/.
    assert (root / "distill" / COMPLETE_FILE).is_file()
    prune = json.loads((root / "drafters" / "pruned" / "prune" / COMPLETE_FILE).read_text())
    train = json.loads((root / "drafters" / "sd2" / "train" / COMPLETE_FILE).read_text())
    assert prune["config"]["dataset"] == str(root / "distill")
    assert train["config"]["model"] == str(root / "drafters" / "pruned" / "prune")
    assert train["inputs"]["pruned/prune"]["run_id"] == prune["run_id"]
    report = json.loads((root / "study.json").read_text())
    rows = {r["name"]: r for r in report["evaluations"]["mt"]["drafters"]}
    assert set(rows) == {"none", "pruned", "sd2", "sd2-step2"}
    assert all(r["lossless_mismatches"] == 0 for r in rows.values())
    (comparison,) = report["comparisons"]
    assert comparison["a"] == "sd2" and comparison["b"] == "pruned"
    assert comparison["low"] <= comparison["ratio"] <= comparison["high"]
    assert comparison["ratio"] == pytest.approx(rows["sd2"]["mal"] / rows["pruned"]["mal"])
    assert set(comparison["per_category"]) == set(report["evaluations"]["mt"]["prompt_categories"])
    published = (tmp_path / "s" / "published" / "study.md").read_text()
    assert "sd2 vs pruned" in published and str(tmp_path) not in published
    assert str(tmp_path) not in (tmp_path / "s" / "published" / "study.json").read_text()
    assert (tmp_path / "s" / "published" / "mt-mal-vs-macs.png").is_file()

    # A rerun builds nothing and measures nothing; a new drafter is the only one measured.
    measured = []
    real = runner.measure
    monkeypatch.setattr(
        runner,
        "measure",
        lambda b, plan, *a, **k: measured.append(plan.name) or real(b, plan, *a, **k),
    )
    capsys.readouterr()
    assert sd2_main(["compare", str(path)]) == 0
    assert measured == []
    study = yaml.safe_load(path.read_text())
    study["drafters"]["dense"] = {"model": str(tiny_model_dir)}
    study["comparisons"].append("sd2 vs dense")
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    assert sd2_main(["compare", str(path)]) == 0
    assert measured == ["dense"]
    report = json.loads((root / "study.json").read_text())
    assert {r["name"] for r in report["evaluations"]["mt"]["drafters"]} == {
        "none",
        "pruned",
        "sd2",
        "sd2-step2",
        "dense",
    }
    assert [c["b"] for c in report["comparisons"]] == ["pruned", "dense"]
    # A run leaving a drafter out (null) measures nothing of it and carries its row with the
    # comparisons naming it.
    assert sd2_main(["compare", str(path), "drafters.dense=null"]) == 0
    assert measured == ["dense"]
    report = json.loads((root / "study.json").read_text())
    assert report["carried"] == ["dense"]
    assert [c["b"] for c in report["comparisons"]] == ["pruned", "dense"]

    # A changed training section rebuilds that drafter (and the checkpoint drafter after it)
    # only; --only builds and measures it alone, and the report still has every row.
    measured.clear()
    assert (
        sd2_main(["compare", str(path), "drafters.sd2.train.learning_rate=0.02", "--only", "sd2"])
        == 0
    )
    assert measured == ["sd2"]
    again = json.loads((root / "drafters" / "sd2" / "train" / COMPLETE_FILE).read_text())
    assert again["run_id"] != train["run_id"]
    assert (
        json.loads((root / "drafters" / "pruned" / "prune" / COMPLETE_FILE).read_text())["run_id"]
        == prune["run_id"]
    )

    # The report renders again from the published study.json alone.
    published = (tmp_path / "s" / "published" / "study.md").read_text()
    (tmp_path / "s" / "published" / "study.md").unlink()
    assert sd2_main(["compare", str(path), "output=elsewhere", "--report-only"]) == 0
    assert (tmp_path / "s" / "published" / "study.md").read_text() == published


def test_resumes_an_interrupted_training(tmp_path, tiny_model_dir, monkeypatch):
    from sd2_hf.training.trainer import SD2Trainer

    evaluations = {"mt": {"prompts": "question.jsonl", "max_new_tokens": 4, "baselines": ["none"]}}
    path = write_study(tmp_path / "s", tiny_model_dir, evaluations=evaluations)
    real = SD2Trainer.training_step

    def dies_after_step_2(self, *args, **kwargs):
        if self.state.global_step >= 2:
            raise KeyboardInterrupt  # checkpoint-2 is written, the stage's record is not
        return real(self, *args, **kwargs)

    # In this process, where the patch reaches the trainer (by default it runs in a child).
    here = "drafters.sd2.train.in_process=true"
    monkeypatch.setattr(SD2Trainer, "training_step", dies_after_step_2)
    assert sd2_main(["compare", str(path), here, "--only", "sd2"]) == 130
    monkeypatch.setattr(SD2Trainer, "training_step", real)
    assert sd2_main(["compare", str(path), here, "--only", "sd2"]) == 0
    train = tmp_path / "s" / "out" / "drafters" / "sd2" / "train"
    record = json.loads((train / COMPLETE_FILE).read_text())
    assert record["resumed"] is True and record["result"]["global_step"] == 4


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"drafters": {"sd2": {"train": {"max_stepz": 3}}}},
            "unknown key 'max_stepz' in section 'train'",
        ),
        ({"drafters": {"a": {"model": "b"}, "b": {"model": "a"}}}, "cycle: a -> b -> a"),
        ({"comparisons": ["sd2 vs nothing"]}, "'nothing', which is not a drafter"),
        ({"evaluations": {"mt": {"num_draft_tokens": 0}}}, "evaluations.mt.num_draft_tokens"),
        ({"drafters": {"x": {"checkpoint": 2}}}, "drafters.x.checkpoint"),
        ({"evaluation": {}}, "unknown key 'evaluation'"),
    ],
)
def test_a_bad_study_gives_one_message_naming_the_key(
    tmp_path, tiny_model_dir, sd2_fails, change, message
):
    path = write_study(tmp_path / "s", tiny_model_dir, **change)
    err = sd2_fails(["compare", path, "--dry-run"])
    assert message in err
    assert not (tmp_path / "s" / "out").exists()


def test_dry_run_lists_every_stage(tmp_path, tiny_model_dir, capsys):
    path = write_study(tmp_path / "s", tiny_model_dir)
    plans, planned = plan_study(load_study(path))
    assert [p.key for p in plans] == ["distill", "pruned/prune", "sd2/train"]
    assert planned["sd2-step2"].path.endswith("drafters/sd2/train/checkpoints/checkpoint-2")
    assert sd2_main(["compare", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "sd2/train" in out and "would run" in out
    assert not (tmp_path / "s" / "out").exists()


def test_a_null_drafter_is_left_out_of_the_build_but_not_of_the_report(
    tmp_path, tiny_model_dir, sd2_fails
):
    path = write_study(tmp_path / "s", tiny_model_dir)
    study = load_study(path, ["drafters.sd2-step2=null"])
    assert list(study.drafters) == ["pruned", "sd2"] and study.left_out == ["sd2-step2"]
    both = load_study(path, ["drafters.sd2=null", "drafters.sd2-step2=null"])
    plans, planned = plan_study(both)
    assert [p.key for p in plans] == ["distill", "pruned/prune"] and list(planned) == ["pruned"]
    # Its comparisons stay: a carried row of it is compared in the report.
    assert both.comparison_pairs() == [("sd2", "pruned")]
    # A drafter another one starts from cannot be left out alone.
    err = sd2_fails(["compare", path, "drafters.pruned=null", "--dry-run"])
    assert "drafters.pruned is left out (null) but drafters.sd2 starts from it" in err


def _report(date: str, rows: dict[str, float], **evaluation) -> dict:
    ev = {
        "backend": "transformers",
        "num_draft_tokens": 3,
        "max_new_tokens": 8,
        "temperature": 0.0,
        "sampled_temperatures": [],
        "num_prompts": 2,
        "prompts": "question.jsonl",
        "served_dtype": "float32",
        "prompt_categories": ["writing", "math"],
        "drafters": [
            {
                "name": n,
                "kind": "model",
                "mal": m,
                "relative_macs": 0.5,
                "improvement_factor": 1.0,
                "per_prompt": [[4, int(4 * (m - 1))]] * 2,  # [draft steps, accepted]
                "sampled": {},
                "tokens_per_second": 1.0,
                "speedup": 1.0,
            }
            for n, m in rows.items()
        ],
        **evaluation,
    }
    return {
        "name": "s",
        "description": "d",
        "target": "t",
        "date": date,
        "drafters": {n: {"description": n, "chain": [n], "stage_seconds": {}} for n in rows},
        "evaluations": {"mt": ev},
    }


def test_rows_of_an_earlier_run_are_carried_beside_a_partial_run():
    """A run that measures only new drafters keeps the earlier report's other rows (same
    prompts and settings), marked with their run's date, and compares against them; rows of a
    run with other settings are not carried, and this run's rows win over earlier ones."""
    from sd2_hf.study.report import carry_earlier_rows, comparisons, to_markdown

    earlier = _report("2026-12-01", {"pruned": 1.5, "sd2": 2.0})
    now = _report("2026-12-05", {"sd2": 2.5, "vocab": 2.25})
    for row in now["evaluations"]["mt"]["drafters"]:
        row["measured"] = "2026-12-05"
    assert carry_earlier_rows(now, earlier) == ["pruned"]
    rows = {r["name"]: r for r in now["evaluations"]["mt"]["drafters"]}
    assert rows["sd2"]["mal"] == 2.5 and rows["pruned"]["measured"] == "2026-12-01"
    assert now["drafters"]["pruned"]["measured"] == "2026-12-01"
    (c,) = comparisons([("vocab", "pruned")], now["evaluations"])
    assert c["ratio"] == pytest.approx(2.25 / 1.5)
    now.update(carried=["pruned"], comparisons=[c])
    text = to_markdown(now)
    assert "| pruned † |" in text and "measured 2026-12-01" in text
    assert "| sd2 |" in text

    other = _report("2026-12-05", {"vocab": 2.25}, max_new_tokens=16)
    assert carry_earlier_rows(other, earlier) == []
    assert [r["name"] for r in other["evaluations"]["mt"]["drafters"]] == ["vocab"]


def test_a_carried_row_meets_a_rebuilt_baseline_as_measured_in_its_own_run():
    """A drafter measured again whose counts changed (rebuilt, e.g. pruned again on another
    CPU) is not the one a carried row was fine-tuned from: the carried row's comparisons and
    curve points use that drafter's row of its own run (flagged §), this run's rows their own;
    an unchanged baseline needs no such row, and a later carry keeps it."""
    from sd2_hf.study.report import carry_earlier_rows, comparisons, curves, to_markdown

    earlier = _report("2026-12-01", {"noft": 1.5, "n1": 2.0})
    now = _report("2026-12-06", {"noft": 1.75, "n2": 2.25})
    assert carry_earlier_rows(now, earlier) == ["n1"]
    rows = {r["name"]: r for r in now["evaluations"]["mt"]["drafters"]}
    assert rows["n1"]["against"]["noft"]["mal"] == 1.5
    pairs = [("n1", "noft"), ("n2", "noft"), ("noft", "n1")]
    by_pair = {(c["a"], c["b"]): c for c in comparisons(pairs, now["evaluations"])}
    assert by_pair["n1", "noft"]["ratio"] == pytest.approx(2.0 / 1.5)
    assert by_pair["noft", "n1"]["ratio"] == pytest.approx(1.5 / 2.0)
    assert by_pair["n1", "noft"]["earlier_partner"] and by_pair["noft", "n1"]["earlier_partner"]
    assert by_pair["n2", "noft"]["ratio"] == pytest.approx(2.25 / 1.75)
    assert "earlier_partner" not in by_pair["n2", "noft"]
    curve = {"baseline": "noft", "points": {"n1": 10, "n2": 100}, "log_x": True, "goal": 1.5}
    (series,) = curves({"data": curve}, now["evaluations"])["data"]["series"]
    n1, n2 = series["points"]
    assert n1["ratio"] == pytest.approx(2.0 / 1.5) and n1["earlier_partner"]
    assert n2["ratio"] == pytest.approx(2.25 / 1.75) and "earlier_partner" not in n2
    now.update(carried=["n1"], comparisons=list(by_pair.values()))
    now["curves"] = curves({"data": {**curve, "x_label": "x"}}, now["evaluations"])
    text = to_markdown(now)
    assert "| n1 vs noft § |" in text and "| n2 vs noft |" in text
    assert "§ a carried row against the other drafter as measured in the carried row's" in text

    later = _report("2026-12-07", {"noft": 1.75})  # a third run: n1 and n2 carried
    assert carry_earlier_rows(later, now) == ["n1", "n2"]
    rows = {r["name"]: r for r in later["evaluations"]["mt"]["drafters"]}
    assert rows["n1"]["against"]["noft"]["mal"] == 1.5 and "against" not in rows["n2"]


def test_drafters_fine_tuned_from_different_builds_of_their_base_are_flagged():
    """n1 was fine-tuned from the noft of an earlier run, n2 from this run's rebuilt noft: their
    comparison mixes the rebuild into the ratio and is flagged ¶; a pair from one build is not,
    in this run and in a later run that carries both."""
    from sd2_hf.study.report import carry_earlier_rows, comparisons, to_markdown

    def chains(report):
        for name in report["drafters"]:
            if name != "noft":
                report["drafters"][name]["chain"] = ["noft", "train"]
        return report

    earlier = chains(_report("2026-12-01", {"noft": 1.5, "n1": 2.0}))
    now = chains(_report("2026-12-06", {"noft": 1.75, "n2": 2.25, "n3": 2.0}))
    carry_earlier_rows(now, earlier)
    pairs = [("n2", "n1"), ("n3", "n2"), ("n1", "noft")]
    by_pair = {(c["a"], c["b"]): c for c in comparisons(pairs, now["evaluations"], now["drafters"])}
    assert by_pair["n2", "n1"]["mixed_builds"] and by_pair["n2", "n1"]["ratio"] == pytest.approx(
        2.25 / 2.0
    )
    assert "mixed_builds" not in by_pair["n3", "n2"] and "mixed_builds" not in by_pair["n1", "noft"]
    assert "mixed_builds" not in comparisons(pairs, now["evaluations"])[0]  # no chains: no flag
    now.update(carried=["n1"], comparisons=list(by_pair.values()))
    text = to_markdown(now)
    assert "| n2 vs n1 ¶ |" in text and "| n3 vs n2 |" in text
    assert "¶ the two drafters were built from different builds of a drafter they share" in text

    later = chains(_report("2026-12-07", {"noft": 1.75}))  # both carried, noft unchanged
    carry_earlier_rows(later, now)
    by_pair = {
        (c["a"], c["b"]): c for c in comparisons(pairs, later["evaluations"], later["drafters"])
    }
    assert by_pair["n2", "n1"]["mixed_builds"] and "mixed_builds" not in by_pair["n3", "n2"]


def test_k_is_chosen_on_the_named_evaluation_and_reported_on_the_others():
    """`choose_k_on`: the K with the best improvement factor on the selection prompts (MACs
    cost, and the drafter's measured time cost) is the one reported on the other evaluation,
    with that evaluation's own MAL at it; a study naming no such evaluation is refused."""
    from sd2_hf.study.report import choose_k, to_markdown

    def sweep(mals):
        return [{"num_draft_tokens": k, "mal": m} for k, m in enumerate(mals, 1)]

    select = _report("d", {"sd2": 2.0})["evaluations"]["mt"]
    mt = _report("d", {"sd2": 3.0})["evaluations"]["mt"]
    select["drafters"][0]["draft_length_sweep"] = sweep([1.5, 2.5, 2.7])  # best K=2 at c=0.5
    mt["drafters"][0].update(draft_length_sweep=sweep([1.7, 2.0, 3.0]), measured_cost=0.05)
    evaluations = {"select": select, "mt": mt}
    choose_k(evaluations, "select")
    chosen = mt["drafters"][0]["chosen_k"]
    assert chosen["on"] == "select"
    assert chosen["macs"] == {"k": 2, "mal": 2.0, "improvement_factor": pytest.approx(1.0)}
    # At c_t = 0.05, K = 3 wins on the selection prompts (2.7 / 1.15 > 2.5 / 1.1).
    assert chosen["time"]["k"] == 3 and chosen["time"]["mal"] == 3.0
    assert "chosen_k" not in select["drafters"][0]
    report = _report("d", {})
    report.update(evaluations=evaluations, comparisons=[])
    assert "K on select: impr." in to_markdown(report) and "1.000 (K=2)" in to_markdown(report)


def test_choose_k_on_must_name_an_evaluation(tmp_path, tiny_model_dir, sd2_fails):
    path = write_study(tmp_path, tiny_model_dir, choose_k_on="heldout")
    message = sd2_fails(["compare", str(path), "--dry-run"])
    assert "choose_k_on: 'heldout' is not an evaluation of the study (mt)" in message


def test_a_null_evaluation_is_left_out_of_the_run(tmp_path, tiny_model_dir):
    mt = {"prompts": "question.jsonl", "max_new_tokens": 8, "baselines": ["none"]}
    path = write_study(
        tmp_path, tiny_model_dir, evaluations={"mt": mt, "held": dict(mt)}, choose_k_on="held"
    )
    study = load_study(path, ["evaluations.held=null"])
    assert list(study.evaluations) == ["mt"] and study.left_out_evaluations == ["held"]
    assert study.choose_k_on == "held"  # used where the report carries `held` from before


def test_a_left_out_evaluation_is_carried_whole_into_the_report():
    """A run leaving an evaluation out (null) does not drop its table from the report it writes:
    the earlier report's evaluation is carried whole, rows dated by their run."""
    from sd2_hf.study.report import carry_left_out_evaluations, to_markdown

    earlier = _report("2026-12-01", {"pruned": 1.5, "sd2": 2.0})
    now = _report("2026-12-05", {"sd2": 2.5})
    now["evaluations"] = {"held": now["evaluations"]["mt"]}
    assert carry_left_out_evaluations(now, earlier, ["mt", "gone"]) == ["mt"]
    rows = {r["name"]: r for r in now["evaluations"]["mt"]["drafters"]}
    assert rows["sd2"]["mal"] == 2.0 and rows["sd2"]["measured"] == "2026-12-01"
    assert now["drafters"]["pruned"]["measured"] == "2026-12-01"
    assert carry_left_out_evaluations(now, earlier, ["mt"]) == []  # present: kept as it is
    now["comparisons"] = []
    text = to_markdown(now)
    assert "## Evaluation `mt`" in text and "## Evaluation `held`" in text
    assert "carried whole from an earlier run (measured 2026-12-01)" in text


def test_a_curve_reports_each_point_over_its_baseline_with_a_fit(tmp_path):
    """`curves`: the MAL ratio of each point's drafter over the baseline, sorted by x, greedy and
    at each sampled temperature, with the least-squares line against log10 x and the x where it
    reaches the goal; a table and a plot."""
    from sd2_hf.study.report import curves, to_markdown, write_files

    report = _report("d", {"noft": 2.0, "n10": 2.2, "n100": 2.4, "n1000": 2.6})
    for row in report["evaluations"]["mt"]["drafters"]:
        m = row["mal"]
        row["per_prompt"] = [[10, round(10 * (m - 1))]] * 2
        row["sampled"] = {"1": {"mal": m - 0.5, "per_prompt": [[10, round(10 * (m - 1.5))]] * 2}}
    curve = {"baseline": "noft", "points": {"n100": 100, "n10": 10, "n1000": 1000}}
    curve |= {"x_label": "conversations", "log_x": True, "goal": 1.5}
    report.update(comparisons=[], curves=curves({"data": curve}, report["evaluations"]))
    greedy, sampled = report["curves"]["data"]["series"]
    assert (greedy["decoding"], sampled["decoding"]) == ("greedy", "T=1")
    assert [p["x"] for p in greedy["points"]] == [10, 100, 1000]
    assert [p["ratio"] for p in greedy["points"]] == pytest.approx([1.1, 1.2, 1.3])
    assert greedy["fit"]["slope"] == pytest.approx(0.1)  # per decade of x
    assert greedy["fit"]["x_at_goal"] == pytest.approx(1e5)  # 1.0 + 0.1 * log10(x) = 1.5
    assert sampled["points"][0]["ratio"] == pytest.approx(1.7 / 1.5)
    text = to_markdown(report)
    assert "## Curve `data`: MAL over `noft` against conversations" in text
    assert "| 10 | n10 | ×1.100" in text
    assert "+10.0 points of MAL gain per decade of x" in text and "x ≈ 1e+05" in text
    assert (tmp_path / "data-curve.png") in write_files(report, tmp_path)
    # A goal the line reaches only far past the points (here 1e10, 10^7 × the largest x) gets
    # no estimate.
    report.update(curves=curves({"data": {**curve, "goal": 2.0}}, report["evaluations"]))
    assert report["curves"]["data"]["series"][0]["fit"]["x_at_goal"] == pytest.approx(1e10)
    text = to_markdown(report)
    assert "+100% not within 1000× the largest x along the fit (x ≈ 1e+10)" in text


def test_a_curve_names_drafters_and_keeps_left_out_points(tmp_path, tiny_model_dir, sd2_fails):
    bad = write_study(tmp_path / "a", tiny_model_dir, curves={"c": {"baseline": "pruned",
                      "points": {"nope": 1}}})  # fmt: skip
    assert "curves.c names 'nope', not drafters of the study" in sd2_fails(
        ["compare", str(bad), "--dry-run"]
    )
    curve = {"baseline": "pruned", "points": {"sd2": 4, "sd2-step2": 2}}
    path = write_study(tmp_path / "b", tiny_model_dir, curves={"c": curve})
    study = load_study(path, ["drafters.sd2-step2=null"])
    assert study.curves["c"].points == {"sd2": 4, "sd2-step2": 2}  # a carried row still counts


def test_a_speed_up_against_a_reference_of_another_day_is_flagged():
    """A row measured on another day than the target run its evaluation reused keeps that
    day, and its speed-up is marked as crossing runs."""
    from sd2_hf.study.report import to_markdown

    report = _report("2026-12-06", {"none": 1.0, "old": 2.0, "new": 2.5})
    rows = {r["name"]: r for r in report["evaluations"]["mt"]["drafters"]}
    for name, day in (("none", "2026-12-05"), ("old", "2026-12-05"), ("new", "2026-12-06")):
        rows[name]["measured"] = day
    rows["new"].update(speedup=0.6, speedup_across_days=True)
    report["comparisons"] = []
    text = to_markdown(report)
    assert "| 0.60 ‡ |" in text
    assert "‡ measured on another day (2026-12-06) than the target alone it is divided by " in text
    assert "(2026-12-05)" in text
