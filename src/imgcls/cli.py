"""What every stage entrypoint shares: the project root, strict params, and user errors as exit status 1."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import UserError
from .params.core import StageParams, load_params
from .paths import ProjectPaths


def project_root() -> Path:
    """The folder holding dvc.yaml and params.yaml; stages run from there (DVC's working directory)."""
    return Path.cwd()


def run_stage(name: str, body: Callable[[Any, ProjectPaths], None], model: type[StageParams]) -> None:
    """Validate the params sections the stage reads (``model``) before any work, run ``body``, and turn user
    errors into one clear line + exit 1."""
    root = project_root()
    try:
        params = load_params(root / "params.yaml", model)
        body(params, ProjectPaths(root))
    except UserError as error:
        print(f"{name}: error: {error}", file=sys.stderr, flush=True)
        sys.exit(1)


def log(stage: str) -> Callable[[str], None]:
    def emit(message: str) -> None:
        prefix = "" if message.startswith(f"{stage}:") else f"{stage}: "
        print(prefix + message, flush=True)

    return emit
