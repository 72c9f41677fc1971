"""preprocess stage (dvc.yaml): validate params.yaml, then run
imgcls.preprocess.stage.preprocess through the shared error boundary."""

from imgcls.cli import run_stage
from imgcls.params.preprocess import PreprocessStageParams
from imgcls.preprocess.stage import preprocess

if __name__ == "__main__":
    run_stage("preprocess", preprocess, PreprocessStageParams)
