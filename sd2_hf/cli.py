"""`sd2` command line: one subcommand per pipeline stage.

Each stage package exposes `register(subparsers)` in its `cli` module; the subcommand's
options come from the stage's pydantic config (see `sd2_hf.utils.schema_cli`). Heavy imports
(torch, transformers) happen inside the command functions, so `sd2 --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback

from sd2_hf.utils.signals import sigterm_as_interrupt

# Modules that register subcommands, in the order `sd2 --help` lists them.
COMMAND_MODULES = (
    "sd2_hf.assets",
    "sd2_hf.data.cli",
    "sd2_hf.pruning.cli",
    "sd2_hf.training.cli",
    "sd2_hf.export.cli",
    "sd2_hf.evaluation.cli",
    "sd2_hf.serving.cli",
    "sd2_hf.pipeline",
    "sd2_hf.study",
)


def build_parser() -> argparse.ArgumentParser:
    from sd2_hf import __version__

    parser = argparse.ArgumentParser(
        prog="sd2",
        description="Self-Distilled Sparse Drafters (SD²) for speculative decoding.",
    )
    parser.add_argument("--version", action="version", version=f"sd2-hf {__version__}")
    verbose_help = (
        "debug logging, and the libraries' own chatter (llm-compressor's per-layer lines)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            # Only tolerate the stage module (or its package) being absent (a partial checkout);
            # a missing dependency inside it is a real error.
            if not (module_name == err.name or module_name.startswith(f"{err.name}.")):
                raise
            continue
        module.register(subparsers)
    # The same flag after the command (`sd2 run recipe.yaml -v`); SUPPRESS keeps the global
    # default when it is not given there.
    for command in subparsers.choices.values():
        command.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    # SIGTERM (a scheduler or `kill`) takes the same path as Ctrl-C: vLLM servers started by
    # a stage are stopped, not orphaned.
    try:
        with sigterm_as_interrupt():
            return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if not is_input_error(err):
            raise
        # What the stages raise for bad input (a missing model or dataset, a bad combination,
        # a server that cannot start): one message, exit 2, as `sd2 run` does; `sd2 -v` adds
        # the traceback.
        if args.verbose:
            traceback.print_exc()
        print(f"error: sd2 {args.command}: {err}", file=sys.stderr)
        return 2


def is_input_error(err: BaseException) -> bool:
    """Errors about the user's input or environment, as opposed to defects of the program."""
    if isinstance(err, (ValueError, OSError)):
        return True
    from sd2_hf.serving.server import ServerError  # on the error path only: keeps start-up light

    return isinstance(err, ServerError)


if __name__ == "__main__":
    sys.exit(main())
