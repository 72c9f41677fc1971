"""The duplicates stage: exact copies (the same pixels) and near copies (perceptual hashes a few bits apart,
confirmed by their thumbnails) within and across train/val/test. data/audit/duplicates.json holds every pair by
split and row (the evaluate stage reports the test accuracy without the leaked test images);
metrics/duplicates.csv names the files, metrics/duplicates.png shows the pairs."""

from __future__ import annotations

import time

from ..cli import log
from ..datasets import DATASETS
from ..fileio import atomic_dir, write_json
from ..params.audit import DuplicatesStageParams
from ..paths import ProjectPaths
from ..prepared import load_names, load_prepared
from ..tensorboard import write_tensorboard_run
from .duplicates import (
    cross_split_test_rows,
    find_duplicates,
    hash_images,
    plot_pairs,
    summarize,
    write_pairs_csv,
)

SPLIT_ORDER = ("train", "val", "test")


def pair_counts(summary: dict) -> dict:
    """The flat counts eval.json and `dvc exp show` carry, from ``summarize``'s per-split tables: exact and
    near pairs across two splits and within one, and the test images with a copy in train or val."""
    return {
        "cross_split_exact": sum(summary["exact_across"].values()),
        "cross_split_near": sum(summary["near_across"].values()),
        "within_split_exact": sum(summary["exact_within"].values()),
        "within_split_near": sum(summary["near_within"].values()),
        "leaked_test_images": summary["leaked_test_images"],
    }


def near_search(params: DuplicatesStageParams) -> tuple[int | None, str]:
    """The near-duplicate threshold to search with (None: exact copies only) and why."""
    audit, dataset = params.audit, params.data.dataset
    if audit.near_duplicates == "off":
        return None, "near duplicates off (audit.near_duplicates: off)"
    if audit.near_duplicates == "auto" and not DATASETS[dataset].near_duplicates:
        return None, (
            f"near duplicates not searched on {dataset} (audit.near_duplicates: auto): its look-alike items "
            "match as closely as copies do, so only exact copies are reported"
        )
    return audit.duplicates_max_distance, (
        f"near: at most {audit.duplicates_max_distance} bits apart and thumbnails correlated >= "
        f"{audit.duplicates_min_correlation}"
    )


def duplicates(params: DuplicatesStageParams, paths: ProjectPaths) -> None:
    """The duplicates stage."""
    emit, audit = log("duplicates"), params.audit
    prepared = load_prepared(paths.prepared_dir, ("train", "test"), optional=("val",))
    splits = [s for s in SPLIT_ORDER if s in prepared.splits]
    started = time.perf_counter()
    hashes = {split: hash_images(prepared.splits[split][0]) for split in splits}
    hashed = time.perf_counter()
    max_distance, rule = near_search(params)
    pairs = find_duplicates(hashes, max_distance=max_distance, min_correlation=audit.duplicates_min_correlation)
    searched = time.perf_counter()
    names = {split: load_names(paths.prepared_dir, split, len(prepared.splits[split][1])) for split in splits}
    by_split = summarize(pairs, splits)
    counts = pair_counts(by_split)
    detail = {
        "max_distance": max_distance,
        "min_correlation": audit.duplicates_min_correlation if max_distance is not None else None,
        "images": {split: len(prepared.splits[split][1]) for split in splits},
        "counts": counts,
        "by_split": by_split,
        "leaked_test_rows": cross_split_test_rows(pairs).tolist(),
        "pairs": [[p.split_a, p.index_a, p.split_b, p.index_b, p.kind, p.distance] for p in pairs],
    }
    with atomic_dir(paths.audit_dir, clean_stale=True) as tmp:
        write_json(tmp / "duplicates.json", detail)
    write_pairs_csv(paths.metrics_dir / "duplicates.csv", pairs, names)
    images = {split: prepared.splits[split][0] for split in splits}
    drawn = plot_pairs(
        paths.metrics_dir / "duplicates.png",
        pairs,
        images,
        names,
        limit=audit.duplicate_pairs_drawn,
        note=f"exact copies; {rule}",
    )
    write_tensorboard_run(
        paths.stage_tensorboard_dir("duplicates"),
        {"duplicates/pairs": paths.metrics_dir / "duplicates.png"},
        {f"duplicates/{key}": value for key, value in counts.items() if key != "near_searched"},
    )
    total = sum(len(prepared.splits[s][1]) for s in splits)
    emit(
        f"{total:,} images hashed in {hashed - started:.1f} s, compared in {searched - hashed:.1f} s: "
        f"across splits {counts['cross_split_exact']} exact and {counts['cross_split_near']} near pair(s), "
        f"within splits {counts['within_split_exact']} exact and {counts['within_split_near']} near ({rule}); "
        "metrics/duplicates.csv, "
        f"{drawn} pair(s) drawn in metrics/duplicates.png"
    )
    if counts["leaked_test_images"]:
        emit(
            f"warning: {counts['leaked_test_images']} test image(s) have a copy in train or val: the test "
            "accuracy counts them as if unseen; the evaluate stage also reports it without them "
            "(eval.json: test_without_leaks). Remove the copies from one split to measure honestly"
        )
