"""Errors a user can act on. Stages print their message and exit 1; anything else is a bug and keeps
its traceback. This module imports nothing heavy, so light stages (download) start fast."""


class UserError(Exception):
    """Bad input or configuration: ``problem`` says what was expected and what was found, ``advice`` (when
    given) what to do. The message is "problem; advice", so a caller that passes the error on with advice of
    its own takes ``problem`` and leaves the original advice out, without parsing the text."""

    def __init__(self, problem: str, advice: str | None = None):
        # args rebuild the error when it is pickled (a process pool or another rank hands it back)
        super().__init__(*((problem,) if advice is None else (problem, advice)))
        self.problem = problem
        self.advice = advice

    def __str__(self) -> str:
        return self.problem if self.advice is None else f"{self.problem}; {self.advice}"


class ParamsError(UserError, ValueError):
    """A params.yaml value a user has to fix; the message names the key."""


class DataError(UserError):
    """A data problem (bad source, checksum, archive or image)."""


class PermanentFetchError(DataError):
    """A failure that retrying the same location will not fix (HTTP 404, missing local file)."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used."""


class ExportError(UserError):
    """An export that does not match the PyTorch model closely enough."""


class RuntimeChoiceError(UserError):
    """A device or precision that this machine cannot provide."""


class TrainingError(UserError):
    """A run that cannot give a usable model (its loss diverged)."""
