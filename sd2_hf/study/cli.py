"""`sd2 compare STUDY.yaml [KEY=VALUE ...]`."""

from __future__ import annotations

import argparse
from pathlib import Path

from sd2_hf.utils.schema_cli import add_command, add_file_arguments

STUDY_HELP = "study YAML (e.g. recipes/studies/smollm2-small.yaml)"
OVERRIDES_HELP = """overrides such as drafters.sd2.train.max_steps=3 or
evaluations.mtbench.limit=4 (values parsed as YAML; paths relative to the current dir). Put
them before the options"""


def _run(args: argparse.Namespace) -> int:
    """run a study: several drafters built and evaluated against one target, one report

    Build every drafter of a study YAML (each a chain of prune/train/export sections, through
    the same stages as `sd2 run`, resumably: complete stages are skipped), evaluate them side by
    side (finished rows are reused) and write study.json, study.md and plots into the study's
    output directory.
    """
    from sd2_hf.study.config import load_study
    from sd2_hf.study.report import rewrite_from_json, write_study_report
    from sd2_hf.study.run import plan_study, run_study

    study = load_study(args.study, args.overrides)
    if args.report_only:
        if (study.root / "eval").is_dir():
            _, planned = plan_study(study)
            write_study_report(study, planned, carry=not args.fresh_report)
        elif study.results and (Path(study.results) / "study.json").is_file():
            rewrite_from_json(Path(study.results) / "study.json")
            print(f"rendered {study.results}/study.md from its study.json")
        else:
            raise FileNotFoundError(
                f"--report-only: no evaluation under {study.root / 'eval'} and no "
                f"study.json in the study's `results` ({study.results}); run the study first"
            )
        return 0
    result = run_study(
        study,
        only=args.only,
        force=args.force,
        dry_run=args.dry_run,
        carry=not args.fresh_report,
    )
    if args.dry_run:
        print(f"sd2 compare {study.name} (dry run): {study.root}")
        for outcome in result["outcomes"]:
            print(f"  {outcome.name:<30} {outcome.status:<14}{outcome.reason}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "compare", _run)
    add_file_arguments(parser, "study", STUDY_HELP, OVERRIDES_HELP)
    parser.add_argument(
        "--only",
        metavar="DRAFTER",
        help="build and measure only this drafter (and the drafters it starts from); the next "
        "full run reuses its rows and writes the report",
    )
    parser.add_argument(
        "--force", action="store_true", help="rebuild the selected drafters' stages from scratch"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="validate the study and list what would run"
    )
    parser.add_argument(
        "--fresh-report",
        action="store_true",
        help="write the report from this run's rows alone; by default, rows of the report "
        "already in the study's `results` for drafters this run did not measure (same prompts "
        "and settings) are kept beside them, marked with the date of their run",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="write the report again from the finished evaluations (or from the study.json in "
        "the study's `results` directory) without building or measuring anything",
    )
