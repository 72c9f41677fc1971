"""Output people read, written once: capped listings ("first 20 and N more") and terminal progress bars.
Torch-free, so light stages (download) can use it."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

LISTED = 20  # items a message lists before "... and N more"


def first_of(items: Sequence[Any], limit: int = LISTED, *, separator: str = ", ", more: str = " and {} more") -> str:
    """``items`` joined, cut after ``limit`` with the count of the rest: "a, b, c and 4 more"."""
    shown = separator.join(str(item) for item in items[:limit])
    return shown + (more.format(len(items) - limit) if len(items) > limit else "")


def bullet_list(items: Sequence[Any], limit: int = LISTED) -> str:
    """One "  - item" line each, cut after ``limit`` with a "  ... and N more" line."""
    return first_of([f"  - {item}" for item in items], limit, separator="\n", more="\n  ... and {} more")


def progress_bar(total: int | None, *, unit: str, label: str | None = None) -> Any:
    """A tqdm bar on a terminal; None when output is captured (CI, DVC's logs), so logs stay one line a step."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=label, leave=False, unit=unit)
