"""validate stage: the first stage of dvc.yaml. It depends on params.yaml and every other stage depends on
its stamp, so a bad value stops `dvc repro` / `dvc exp run` here, before DVC deletes any stage's outputs."""

from __future__ import annotations

from .fileio import write_text
from .params.project import Params
from .paths import ProjectPaths

# Constant content: DVC sees the same hash after every successful validation, so a params change reruns
# only the stages whose own params changed, not everything downstream of this stamp.
STAMP = "params.yaml passed validation\n"


def validate(params: Params, paths: ProjectPaths) -> None:
    """``params`` arrive validated (run_stage parses the whole file first): record that it passed."""
    write_text(paths.params_stamp, STAMP)
