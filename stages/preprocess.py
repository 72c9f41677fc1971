"""preprocess stage: decode data/raw/ to uint8 splits + meta.json in data/prepared/."""

import json

from imgcls.cli import log, run_stage
from imgcls.datasets import decode
from imgcls.errors import DataError
from imgcls.fileio import atomic_dir
from imgcls.prepare import build_meta, make_splits, save_prepared


def main() -> None:
    def body(params, paths):
        data, emit = params.data, log("preprocess")
        provenance = json.loads((paths.raw_dir / "source.json").read_text())
        if provenance["dataset"] != data.dataset:
            raise DataError(f"data/raw holds {provenance['dataset']} but data.dataset is {data.dataset}; "
                            "run the download stage again (dvc repro)")
        decoded = decode(data.dataset, paths.raw_dir, image_size=data.image_size, channels=data.channels,
                         on_bad_image=data.on_bad_image, log=emit)
        splits = make_splits(decoded, val_fraction=params.preprocess.val_fraction,
                             test_fraction=data.test_fraction, limit=data.limit, seed=params.base.seed)
        meta = build_meta(splits, decoded.class_names, data.dataset)
        meta["source"] = provenance
        with atomic_dir(paths.prepared_dir) as tmp:
            save_prepared(tmp, splits, meta)
        counts = ", ".join(f"{split} {len(labels)}" for split, (_, labels) in splits.items())
        emit(f"{data.dataset}: {len(decoded.class_names)} classes, image shape {meta['image_shape']}, {counts}")

    run_stage("preprocess", body)


if __name__ == "__main__":
    main()
