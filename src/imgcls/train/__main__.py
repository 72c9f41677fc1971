"""`python -m imgcls.train`: the train stage, run in the project root. torchrun starts each process of a
data-parallel run this way (see imgcls.train.distributed); stages/train.py is the same for one process."""

from imgcls.cli import run_stage
from imgcls.params.train import TrainStageParams
from imgcls.train.stage import train

if __name__ == "__main__":
    run_stage("train", train, TrainStageParams)
