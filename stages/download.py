"""download stage (dvc.yaml): validate params.yaml, then run
imgcls.download.stage.download through the shared error boundary."""

from imgcls.cli import run_stage
from imgcls.download.stage import download
from imgcls.params.data import DownloadStageParams

if __name__ == "__main__":
    run_stage("download", download, DownloadStageParams)
