"""`sd2 run RECIPE.yaml`: run a recipe's stages in order, skipping those already complete.

Each stage writes to `<output>/<stage>/` and, when it finishes, a completion record
`.sd2-complete.json` holding its fingerprint: the sha256 of the stage's resolved config, of the
content of local files it names (recipe YAMLs, JSON/JSONL data), of the records of the stages it
consumes (their fingerprint and run id) and of the sd2-hf version. A rerun skips a stage whose
record matches; a stage whose section or inputs changed is redone from scratch, and so is every
stage that consumes it (its inputs' run ids changed). A stage interrupted before its record was
written is resumed when it can resume itself (distill: its journal; train: its checkpoints) and
its settings are unchanged (`.sd2-running.json`), else redone. `<output>/provenance.json` records
the command, the resolved recipe, versions, git revision and times of every run.

Stages run in this process, one after the other (the train stage can run under
`accelerate launch` instead: recipe keys `train.accelerate_config` / `train.accelerate_args`).
"""

from sd2_hf.pipeline.cli import register
from sd2_hf.pipeline.records import (
    COMPLETE_FILE,
    PROVENANCE_FILE,
    RUNNING_FILE,
    PipelineResult,
    StageOutcome,
    fingerprint,
    read_record,
)
from sd2_hf.pipeline.run import run_pipeline, select_stages
from sd2_hf.pipeline.summary import summary
from sd2_hf.stages import PipelineError

__all__ = [
    "COMPLETE_FILE",
    "PROVENANCE_FILE",
    "RUNNING_FILE",
    "PipelineError",
    "PipelineResult",
    "StageOutcome",
    "fingerprint",
    "read_record",
    "register",
    "run_pipeline",
    "select_stages",
    "summary",
]
