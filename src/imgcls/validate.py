"""validate stage: the first stage of dvc.yaml. It depends on params.yaml and every other stage depends on
its stamp, so a bad value stops `dvc repro` / `dvc exp run` here, before DVC runs any other stage."""

from __future__ import annotations

from pathlib import Path

from .errors import ParamsError
from .fileio import write_text
from .params.project import Params
from .paths import ProjectPaths

# Constant content: DVC sees the same hash after every successful validation, so a params change reruns
# only the stages whose own params changed, not everything downstream of this stamp.
STAMP = "params.yaml passed validation\n"


def validate(params: Params, paths: ProjectPaths) -> None:
    """``params`` arrive validated (run_stage parses the whole file first); check the files they name,
    then record that they passed."""
    check_named_files(params, paths.root)
    write_text(paths.params_stamp, STAMP)


def check_named_files(params: Params, root: Path) -> None:
    """Files named by params exist and are regular files: found missing by the train stage instead, they
    would fail a run that has already started (train.pretrained: imagenet is fetched, or found in torch's
    cache, by the train stage itself)."""
    train = params.train
    named = {"train.init_from": train.init_from}
    if train.pretrained not in ("none", "imagenet"):
        named["train.pretrained"] = train.pretrained
    for key, value in named.items():
        if value == "none":
            continue
        path = root / Path(value).expanduser()
        if not path.exists():
            raise ParamsError(f"params: {key} = {value!r}: no such file (looked for {path}); name an existing file")
        if not path.is_file():
            raise ParamsError(f"params: {key} = {value!r} is not a regular file ({path}); name the file itself")
