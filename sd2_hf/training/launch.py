"""The train stage in `accelerate launch` processes (multi-GPU: DDP, FSDP2).

`launch_train` writes the stage config to `<output>/train_config.json` and starts
`accelerate launch ... -m sd2_hf.training.launch CONFIG.json`, whose every process runs
`run_train` on it (a JSON config can carry `trainer_args`, a command line cannot).
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from sd2_hf.training.config import TrainStageConfig
from sd2_hf.utils.io import atomic_write_json


def launch_train(
    config: TrainStageConfig, accelerate_config: str, accelerate_args: list[str]
) -> int:
    """Run the stage under `accelerate launch --config_file accelerate_config`; its exit status."""
    config_file = Path(config.output) / "train_config.json"
    atomic_write_json(config_file, config.model_dump(mode="json"))
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        accelerate_config,
        *accelerate_args,
        "-m",
        __name__,
        str(config_file),
    ]
    print("+ " + " ".join(command), flush=True)
    return subprocess.run(command).returncode


def main(argv: list[str]) -> int:
    from sd2_hf.training.stage import run_train

    if len(argv) != 1:
        raise SystemExit("usage: python -m sd2_hf.training.launch CONFIG.json")
    logging.basicConfig(level=logging.INFO)
    run_train(TrainStageConfig.model_validate_json(Path(argv[0]).read_text(encoding="utf-8")))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
