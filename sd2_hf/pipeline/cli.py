"""`sd2 run RECIPE.yaml [KEY=VALUE ...]`."""

from __future__ import annotations

import argparse

from sd2_hf.pipeline.run import run_pipeline
from sd2_hf.pipeline.summary import summary
from sd2_hf.utils.schema_cli import add_command, add_file_arguments

RECIPE_HELP = "recipe YAML (e.g. recipes/sd2/smollm2-demo.yaml)"
OVERRIDES_HELP = """recipe overrides section.key=value (value parsed as YAML, e.g.
train.max_steps=3, eval.drafters=[a=dir]); section=null drops a stage; paths relative to the
current dir. Put them before the options"""


def _run(args: argparse.Namespace) -> int:
    """run a pipeline recipe: distill -> prune -> train -> export -> eval

    Run the stages of a recipe YAML in order, each into <output>/<stage>/. Complete stages whose
    section and inputs are unchanged are skipped; an interrupted stage resumes (distill, train)
    or starts over; a changed stage is redone with every stage after it that uses its output.
    """
    from sd2_hf.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    result = run_pipeline(
        recipe,
        from_stage=args.from_stage,
        only=args.only,
        force=args.force,
        dry_run=args.dry_run,
        command=_command_line(args),
    )
    if args.dry_run:
        print(f"sd2 run {recipe.name} (dry run): {recipe.root}")
        for o in result.outcomes:
            print(f"  {o.name:<9}{o.status:<14}{o.reason}")
        return 0
    print(summary(result))
    return 0


def _command_line(args: argparse.Namespace) -> list[str]:
    """The `sd2 run` command as given (`main(argv)` may be called without a real argv)."""
    line = ["sd2", "run", args.recipe, *args.overrides]
    for flag, value in (("--from", args.from_stage), ("--only", args.only)):
        line += [flag, value] if value else []
    return line + [flag for flag, on in (("--force", args.force),) if on]


def register(subparsers: argparse._SubParsersAction) -> None:
    from sd2_hf.stages import STAGE_NAMES

    parser = add_command(subparsers, "run", _run)
    add_file_arguments(parser, "recipe", RECIPE_HELP, OVERRIDES_HELP)
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--from",
        dest="from_stage",
        choices=STAGE_NAMES,
        help="run from this stage on (earlier stages must be complete); complete stages are "
        "still skipped unless --force",
    )
    which.add_argument(
        "--only", choices=STAGE_NAMES, help="run only this stage (its inputs must be complete)"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="redo the selected stages even when complete (from scratch, no resume)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the recipe and show which stages would run, without running them",
    )
