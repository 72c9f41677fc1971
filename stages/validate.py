"""validate stage (dvc.yaml): validate params.yaml, then run
imgcls.validate.validate through the shared error boundary."""

from imgcls.cli import run_stage
from imgcls.params.project import Params
from imgcls.validate import validate

if __name__ == "__main__":
    run_stage("validate", validate, Params)
