"""The duplicates stage's findings as the evaluate stage reads them: which test images have an exact or near
copy in train or val (data/audit/duplicates.json, written by imgcls.audit.stage). The file is a pipeline
output, but it is read as data: its structure and every row index are checked before use."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import DataError

REBUILD = "rebuild it with: dvc repro -f duplicates"
COUNT_KEYS = ("cross_split_exact", "cross_split_near", "within_split_exact", "within_split_near", "leaked_test_images")


def read_leaks(path: Path, test_images: int) -> dict | None:
    """{"counts": {...COUNT_KEYS, "near_searched": bool}, "leaked_test_rows": [row, ...]} from ``path``; None
    when it does not exist (a project from before the duplicates stage)."""
    if not path.is_file():
        return None
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise DataError(f"{path}: not valid JSON ({type(error).__name__}); {REBUILD}") from None
    counts = found.get("counts") if isinstance(found, dict) else None
    rows = found.get("leaked_test_rows") if isinstance(found, dict) else None
    if not (
        isinstance(counts, dict)
        and all(isinstance(counts.get(key), int) and counts[key] >= 0 for key in COUNT_KEYS)
        and isinstance(rows, list)
        and all(isinstance(row, int) and not isinstance(row, bool) and 0 <= row < test_images for row in rows)
        and len(set(rows)) == len(rows) == counts["leaked_test_images"]
    ):
        raise DataError(
            f"{path}: expected counts ({', '.join(COUNT_KEYS)}) and distinct leaked_test_rows in "
            f"0..{test_images - 1}; it does not describe this test split; {REBUILD}"
        )
    # Near copies were searched unless the stage searched exact copies only (max_distance null).
    near = found.get("max_distance") is not None
    return {"counts": {key: counts[key] for key in COUNT_KEYS} | {"near_searched": near}, "leaked_test_rows": rows}
