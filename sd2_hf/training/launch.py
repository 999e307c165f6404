"""The train stage in processes of its own: `accelerate launch` (multi-GPU: DDP, FSDP2) or one
child process.

`launch_train` writes the stage config to `<output>/train_config.json` and starts
`[accelerate launch ...] python -m sd2_hf.training.launch CONFIG.json`, whose every process runs
`run_train` on it (a JSON config can carry `trainer_args`, a command line cannot). A bad input
the stage refuses (ValueError, FileNotFoundError) is written to `<output>/train_error.txt` for the
pipeline to report as one message.

The pipeline runs single-process training in a child too: a finished full fine-tuning leaves its
allocator's arenas in the process (measured: 12.5-13.9 GB kept after a 0.5B drafter's training,
and the next training in the same `sd2 compare` was killed for memory on 24 GiB); a child's memory
goes back to the system when it exits.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from sd2_hf.training.config import TrainStageConfig
from sd2_hf.utils.io import atomic_write_json, atomic_write_text

ERROR_FILE = "train_error.txt"


def launch_train(
    config: TrainStageConfig,
    accelerate_config: str | None = None,
    accelerate_args: list[str] | None = None,
) -> int:
    """Run the stage under `accelerate launch --config_file accelerate_config`, or without it in
    one child process; its exit status (a refused input's message is in `error_message`)."""
    output = Path(config.output)
    config_file = output / "train_config.json"
    atomic_write_json(config_file, config.model_dump(mode="json"))
    (output / ERROR_FILE).unlink(missing_ok=True)
    command = [sys.executable, "-m", __name__, str(config_file)]
    if accelerate_config:
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            accelerate_config,
            *(accelerate_args or []),
            *command[1:],
        ]
    print("+ " + " ".join(command), flush=True)
    return subprocess.run(command).returncode


def error_message(config: TrainStageConfig) -> str | None:
    """The message of the input a launched training refused, if it wrote one."""
    path = Path(config.output) / ERROR_FILE
    return path.read_text(encoding="utf-8").strip() if path.is_file() else None


def main(argv: list[str]) -> int:
    from sd2_hf.training.stage import run_train

    if len(argv) != 1:
        raise SystemExit("usage: python -m sd2_hf.training.launch CONFIG.json")
    logging.basicConfig(level=logging.INFO)
    config = TrainStageConfig.model_validate_json(Path(argv[0]).read_text(encoding="utf-8"))
    try:
        run_train(config)
    except (ValueError, FileNotFoundError) as err:
        # The stage's own refusals of bad input: the pipeline prints it as its one message.
        atomic_write_text(Path(config.output) / ERROR_FILE, str(err))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
