"""train stage (dvc.yaml): validate params.yaml, then run imgcls.train.stage.train through the shared error boundary."""

from imgcls.cli import run_stage
from imgcls.params.train import TrainStageParams
from imgcls.train.stage import train

if __name__ == "__main__":
    run_stage("train", train, TrainStageParams)
