"""preprocess stage: decode data/raw/ to uint8 splits + meta.json in data/prepared/, streamed: image folders
are decoded chunk by chunk into a scratch file, then the planned splits are copied out chunk by chunk, so
peak memory is bounded by chunks, not by the data set."""

from __future__ import annotations

import json
import shutil

from ..cli import log
from ..datasets import DATASETS
from ..errors import DataError
from ..fileio import atomic_dir
from ..params.preprocess import PreprocessStageParams as Params
from ..paths import ProjectPaths
from .decode import decode
from .splits import plan_splits
from .write import write_splits


def preprocess(params: Params, paths: ProjectPaths) -> None:
    data, emit = params.data, log("preprocess")
    source_json = paths.raw_dir / "source.json"
    if not source_json.is_file():
        raise DataError(f"{source_json} is missing; run the download stage first (dvc repro download)")
    provenance = json.loads(source_json.read_text())
    if provenance.get("dataset") != data.dataset:
        raise DataError(
            f"data/raw holds {provenance.get('dataset')} but data.dataset is {data.dataset}; "
            "run the download stage again (dvc repro)"
        )
    with atomic_dir(paths.prepared_dir, clean_stale=True) as tmp:
        scratch = tmp / ".decoded"  # inside the temporary folder: a killed run leaves nothing behind for good
        decoded = decode(
            data.dataset,
            paths.raw_dir,
            image_size=data.image_size,
            channels=data.channels,
            resize=data.resize,
            on_bad_image=data.on_bad_image,
            max_image_pixels=data.max_image_pixels,
            workdir=scratch,
            log=emit,
            cache_dir=paths.decode_cache_dir,
            project_root=paths.root,
        )
        plan = plan_splits(
            {name: labels for name, (_, labels) in decoded.splits.items()},
            val_fraction=params.preprocess.val_fraction,
            test_fraction=data.test_fraction,
            limit=data.limit,
            seed=params.base.seed,
            val_folder=data.val_folder,
        )
        # data.resize applies where images are resized (image folders); built-in data sets come square.
        resized = DATASETS[data.dataset].image_size is None
        meta = write_splits(
            tmp, decoded, plan, dataset=data.dataset, source=provenance, resize=data.resize if resized else None
        )
        shutil.rmtree(scratch, ignore_errors=True)
    counts = ", ".join(
        f"{split} {len(rows)}" + (f" (from {source}/)" if source != split else "")
        for split, (source, rows) in plan.items()
    )
    emit(f"{data.dataset}: {len(decoded.class_names)} classes, image shape {meta['image_shape']}, {counts}")
