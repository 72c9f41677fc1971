"""duplicates stage (dvc.yaml): validate params.yaml, then run
imgcls.audit.duplicates_stage.duplicates through the shared error boundary."""

from imgcls.audit.duplicates_stage import duplicates
from imgcls.cli import run_stage
from imgcls.params.audit import DuplicatesStageParams

if __name__ == "__main__":
    run_stage("duplicates", duplicates, DuplicatesStageParams)
