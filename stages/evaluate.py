"""evaluate stage (dvc.yaml): validate params.yaml, then run
imgcls.evaluate.stage.evaluate through the shared error boundary."""

from imgcls.cli import run_stage
from imgcls.evaluate.stage import evaluate
from imgcls.params.evaluate import EvaluateStageParams

if __name__ == "__main__":
    run_stage("evaluate", evaluate, EvaluateStageParams)
