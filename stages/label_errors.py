"""label_errors stage (dvc.yaml): validate params.yaml, then run
imgcls.audit.label_errors_stage.label_errors through the shared error boundary."""

from imgcls.audit.label_errors_stage import label_errors
from imgcls.cli import run_stage
from imgcls.params.label_errors import LabelErrorsStageParams

if __name__ == "__main__":
    run_stage("label_errors", label_errors, LabelErrorsStageParams)
