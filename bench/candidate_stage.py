"""A pipeline stage (train or evaluate) run with issue 25's candidate layouts registered (bench/candidates.py):
what bench/search.py runs in a scratch project instead of stages/<stage>.py.

    python bench/candidate_stage.py train|evaluate
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from candidates import register  # noqa: E402

from imgcls.cli import run_stage  # noqa: E402
from imgcls.evaluate.stage import evaluate  # noqa: E402
from imgcls.params.evaluate import EvaluateStageParams  # noqa: E402
from imgcls.params.train import TrainStageParams  # noqa: E402
from imgcls.train.stage import train  # noqa: E402

STAGES = {"train": (train, TrainStageParams), "evaluate": (evaluate, EvaluateStageParams)}

if __name__ == "__main__":
    register()
    function, params = STAGES[sys.argv[1]]
    run_stage(sys.argv[1], function, params)
