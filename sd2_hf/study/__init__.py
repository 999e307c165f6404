"""`sd2 compare STUDY.yaml`: several drafters built and evaluated against one target.

See `sd2_hf.study.config` for the study file, `sd2_hf.study.run` for how drafters are built
(the pipeline's stages, resumably) and evaluated (`run_eval`, reusing finished rows), and
`sd2_hf.study.report` for the one report every study writes.
"""

from sd2_hf.study.cli import register
from sd2_hf.study.config import DrafterSpec, Study, StudyError, load_study
from sd2_hf.study.run import plan_study, run_study

__all__ = [
    "DrafterSpec",
    "Study",
    "StudyError",
    "load_study",
    "plan_study",
    "register",
    "run_study",
]
