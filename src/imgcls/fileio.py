"""Atomic outputs: write next to the target, then rename, so a failed stage leaves no half-written file.

Temporaries are named ``.<target>.imgcls.<pid>.<random>.tmp`` (and ``....old`` for a folder being replaced):
the ``imgcls`` marker, the writer's pid and a random part make a name no user file has by accident, and
each is removed by the process that made it. A process killed mid-write (kill -9, out of memory) cannot
clean up after itself; only the pipeline's stages, writing into the project's own ``data/`` and
``metrics/`` folders, ask (``clean_stale=True``) for the temporaries of dead writers of the same target
to be removed. Writes anywhere else (``imgcls predict --output`` in a user's folder) never delete a name
they did not create."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TEMPORARY_MARKER = "imgcls"


def _temporary_prefix(target: Path) -> str:
    return f".{target.name}.{TEMPORARY_MARKER}.{os.getpid()}."


@contextlib.contextmanager
def atomic_path(target: str | Path, *, clean_stale: bool = False) -> Iterator[Path]:
    """Yield a temporary file path beside ``target``; rename it onto ``target`` only on success.
    ``clean_stale``: first remove this target's temporaries left by dead processes (project folders only)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if clean_stale:
        remove_stale_temporaries(target)
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(target), suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the mode a plain open() would
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(target: str | Path, *, clean_stale: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; it replaces ``target`` only on success.
    ``clean_stale``: first remove this target's temporaries left by dead processes (project folders only)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if clean_stale:
        remove_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(target), suffix=".tmp", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if target.exists() or target.is_symlink():
            # Move the old folder aside first (rename cannot replace a non-empty folder), under a name derived
            # from our own unique temporary, so nothing but what this process moved there is ever deleted.
            old = tmp.with_name(tmp.name[: -len(".tmp")] + ".old")
            os.replace(target, old)
            os.replace(tmp, target)
            _remove(old)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    except OverflowError:
        return False
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Delete ``target``'s temporaries (``.<name>.imgcls.<pid>.<random>.tmp`` / ``.old``) whose writer no
    longer runs; returns what was removed. Any other name, however similar, is left alone."""
    pattern = re.compile(
        re.escape(f".{target.name}.{TEMPORARY_MARKER}.") + r"([0-9]{1,10})\.[A-Za-z0-9_]{8}\.(tmp|old)"
    )
    removed = []
    for sibling in target.parent.iterdir():
        match = pattern.fullmatch(sibling.name)
        if match and not _running(int(match.group(1))):
            _remove(sibling)
            removed.append(sibling)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
