"""export stage (dvc.yaml): validate params.yaml, then run
imgcls.deploy.stage.export through the shared error boundary."""

from imgcls.cli import run_stage
from imgcls.deploy.stage import export
from imgcls.params.export import ExportStageParams

if __name__ == "__main__":
    run_stage("export", export, ExportStageParams)
