"""The duplicates and label_errors stages: what leaks between the splits and which training labels look wrong.

duplicates (after preprocess): exact copies (the same pixels) and near copies (perceptual hashes a few bits
apart) within and across train/val/test. data/audit/duplicates.json holds every pair by split and row (the
evaluate stage reports the test accuracy without the leaked test images); metrics/duplicates.csv names the
files, metrics/duplicates.png shows the pairs.

label_errors (after preprocess, beside train): each training image is scored by a model trained on the
other folds (train.model from scratch with the model's own recipe, audit.label_epochs epochs), then
confident learning flags the images whose given label the out-of-sample model most disagrees with:
metrics/label_suspects.csv (ranked, with the file and both labels), metrics/label_suspects.png and
metrics/label_errors.json."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..cli import log
from ..datasets import DATASETS
from ..fileio import atomic_dir, write_json
from ..params.audit import DuplicatesStageParams, LabelErrorsStageParams
from ..params.train import RECIPE_KEYS, params_with_recipe
from ..paths import ProjectPaths
from ..prepared import load_names, load_prepared
from ..runtime import resolve_device, resolve_precision, seed_everything, set_threads
from .duplicates import (
    DuplicatePair,
    cross_split_test_rows,
    find_duplicates,
    hash_images,
    plot_pairs,
    summarize,
    write_pairs_csv,
)
from .label_errors import confident_learning, out_of_sample_probabilities, plot_suspects, write_suspects_csv

SPLIT_ORDER = ("train", "val", "test")


def pair_counts(pairs: list[DuplicatePair]) -> dict:
    """Exact and near pairs within one split and across two; the test images with a copy in train or val.
    Flat keys: they are columns of `dvc exp show` (eval.json's duplicates)."""
    across = [p for p in pairs if p.cross_split]
    within = [p for p in pairs if not p.cross_split]
    return {
        "cross_split_exact": sum(p.kind == "exact" for p in across),
        "cross_split_near": sum(p.kind == "near" for p in across),
        "within_split_exact": sum(p.kind == "exact" for p in within),
        "within_split_near": sum(p.kind == "near" for p in within),
        "leaked_test_images": len(cross_split_test_rows(pairs)),
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
    counts = pair_counts(pairs)
    detail = {
        "max_distance": max_distance,
        "min_correlation": audit.duplicates_min_correlation if max_distance is not None else None,
        "images": {split: len(prepared.splits[split][1]) for split in splits},
        "counts": counts,
        "by_split": summarize(pairs, splits),
        "leaked_test_rows": cross_split_test_rows(pairs).tolist(),
        "pairs": [[p.split_a, p.index_a, p.split_b, p.index_b, p.kind, p.distance] for p in pairs],
    }
    with atomic_dir(paths.audit_dir, clean_stale=True) as tmp:
        write_json(tmp / "duplicates.json", detail)
    write_pairs_csv(paths.metrics_dir / "duplicates.csv", pairs, names)
    images = {split: prepared.splits[split][0] for split in splits}
    drawn = plot_pairs(paths.metrics_dir / "duplicates.png", pairs, images, names, limit=audit.duplicate_pairs_drawn)
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


def label_errors(params: LabelErrorsStageParams, paths: ProjectPaths) -> None:
    """The label_errors stage."""
    from ..train.stage import model_arguments

    emit, audit = log("label_errors"), params.audit
    # From scratch with the model's own recipe: what the folds measure is the data, not a recipe being tuned
    # (and dvc.yaml lists only the train keys read here, so a sweep over train.lr reruns no fold).
    own = {key: "auto" for key in RECIPE_KEYS} | {"pretrained": "none", "init_from": "none"}
    params = params_with_recipe(params.model_copy(update={"train": params.train.model_copy(update=own)}))
    prepared = load_prepared(paths.prepared_dir, ("train",))
    images, labels = prepared.splits["train"]
    class_names = prepared.class_names
    names = load_names(paths.prepared_dir, "train", len(labels))
    outputs = (
        paths.metrics_dir / "label_suspects.csv",
        paths.metrics_dir / "label_suspects.png",
        paths.metrics_dir / "label_errors.json",
    )
    if audit.label_folds == 0:
        write_off(outputs, class_names)
        emit("off (audit.label_folds: 0): no training image was checked; metrics/label_suspects.csv is empty")
        return
    set_threads(params.base.threads)
    seed_everything(params.base.seed)
    device = resolve_device(params.base.device)
    precision = resolve_precision(params.train.precision, device)
    emit(
        f"{audit.label_folds} folds of {len(labels):,} training images, each scored by train.model = "
        f"{params.train.model!r} trained {audit.label_epochs} epoch(s) on the other folds (precision {precision})"
    )
    pixels = torch.from_numpy(images.load())
    started = time.perf_counter()

    def on_fold(fold: int, folds: int, seconds: float) -> None:
        emit(f"fold {fold}/{folds} trained and scored in {seconds:.1f} s")

    probabilities = out_of_sample_probabilities(
        pixels,
        labels,
        config=params.train,
        arguments=model_arguments(params.train, prepared.meta),
        folds=audit.label_folds,
        epochs=audit.label_epochs,
        device=device,
        precision=precision,
        seed=params.base.seed,
        on_fold=on_fold,
    )
    seconds = time.perf_counter() - started
    suspects = confident_learning(labels, probabilities)
    write_suspects_csv(outputs[0], suspects, names, class_names)
    drawn = plot_suspects(
        outputs[1], pixels.numpy(), suspects, class_names, limit=audit.label_suspects_drawn, names=names
    )
    held_out_accuracy = float((probabilities.argmax(1) == labels).mean())
    write_json(
        outputs[2],
        {
            "folds": audit.label_folds,
            "epochs": audit.label_epochs,
            "images": int(len(labels)),
            "out_of_sample_accuracy": held_out_accuracy,
            "suspects": int(len(suspects.indices)),
            "estimated_label_errors": int(suspects.estimated_issues),
            "seconds": seconds,
        },
    )
    emit(
        f"{len(suspects.indices)} training image(s) flagged as likely mislabelled (confident learning estimates "
        f"{suspects.estimated_issues}); out-of-sample accuracy {held_out_accuracy:.4f}; {seconds:.1f} s; "
        f"metrics/label_suspects.csv, the first {drawn} in metrics/label_suspects.png"
    )


def write_off(outputs: tuple[Path, Path, Path], class_names: list[str]) -> None:
    """The stage's outputs when it is off: an empty table, a picture saying so, zero counts."""
    from .label_errors import LabelSuspects

    empty = np.zeros(0, dtype=np.int64)
    none = LabelSuspects(empty, empty, empty, empty.astype(float), empty.astype(float), empty.astype(float), 0)
    write_suspects_csv(outputs[0], none, [], class_names)
    plot_suspects(outputs[1], np.zeros((0, 1, 8, 8), np.uint8), none, class_names, limit=0)
    write_json(outputs[2], {"folds": 0, "suspects": 0, "estimated_label_errors": 0})
