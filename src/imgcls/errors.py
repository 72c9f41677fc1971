"""Errors a user can act on. Stages print their message and exit 1; anything else is a bug and keeps
its traceback. This module imports nothing heavy, so light stages (download) start fast."""


class UserError(Exception):
    """Bad input or configuration; the message says what was expected, what was found and what to do."""


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
