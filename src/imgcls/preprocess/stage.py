"""preprocess stage: decode data/raw/ to uint8 splits + meta.json in data/prepared/."""

from __future__ import annotations

import json

from ..cli import log
from ..errors import DataError
from ..fileio import atomic_dir
from ..params import Params
from ..paths import ProjectPaths
from ..prepared import save_prepared
from .decode import decode
from .splits import build_meta, make_splits


def preprocess(params: Params, paths: ProjectPaths) -> None:
    data, emit = params.data, log("preprocess")
    source_json = paths.raw_dir / "source.json"
    if not source_json.is_file():
        raise DataError(f"{source_json} is missing; run the download stage first (dvc repro download)")
    provenance = json.loads(source_json.read_text())
    if provenance.get("dataset") != data.dataset:
        raise DataError(f"data/raw holds {provenance.get('dataset')} but data.dataset is {data.dataset}; "
                        "run the download stage again (dvc repro)")
    decoded = decode(data.dataset, paths.raw_dir, image_size=data.image_size, channels=data.channels,
                     on_bad_image=data.on_bad_image, max_image_pixels=data.max_image_pixels, log=emit)
    splits = make_splits(decoded, val_fraction=params.preprocess.val_fraction,
                         test_fraction=data.test_fraction, limit=data.limit, seed=params.base.seed)
    meta = build_meta(splits, decoded.class_names, data.dataset)
    meta["source"] = provenance
    with atomic_dir(paths.prepared_dir) as tmp:
        save_prepared(tmp, splits, meta)
    counts = ", ".join(f"{split} {len(labels)}" for split, (_, labels) in splits.items())
    emit(f"{data.dataset}: {len(decoded.class_names)} classes, image shape {meta['image_shape']}, {counts}")
