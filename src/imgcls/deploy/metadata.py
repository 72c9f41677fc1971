"""What an exported model says about itself, so that `imgcls predict` needs nothing but the file: class
names, input size and channels, how a picture is made square (resize), data set, test accuracy, the
temperature that calibrates its probabilities. One home for
the keys: the export stage writes them (ONNX ``metadata_props``, a TorchScript extra file) and imgcls.predict
reads them."""

from __future__ import annotations

import json
from pathlib import Path

from ..calibration import checkpoint_temperature

METADATA_KEY = "imgcls"  # ONNX: one metadata entry holding the JSON document
TORCHSCRIPT_EXTRA_FILE = "imgcls.json"
FORMAT_VERSION = 1


def trained_resize(checkpoint: dict) -> object:
    """How the model's training images were made square: data.resize in the checkpoint's params snapshot, or
    "squash" for a checkpoint without one (written before data.resize existed, when every image was squashed).
    Returned as found: a reader of an untrusted file checks it against preprocess/images.py RESIZE_MODES."""
    params = checkpoint.get("params")
    data = params.get("data") if isinstance(params, dict) else None
    return data.get("resize", "squash") if isinstance(data, dict) else "squash"


def model_facts(checkpoint: dict, *, dataset: str, test_accuracy: float, tta: str) -> dict:
    arguments = checkpoint["arguments"]
    return {
        "format_version": FORMAT_VERSION,
        "class_names": list(checkpoint["class_names"]),
        "image_size": int(arguments["image_size"]),
        "channels": int(arguments["in_channels"]),
        "resize": trained_resize(checkpoint),  # squash | crop | pad: predict decodes pictures the same way
        "input": "float32 (N, C, H, W) in [0, 1]; normalization is inside the graph",
        "mean": list(arguments["mean"]),
        "std": list(arguments["std"]),
        "start": checkpoint.get("extra", {}).get("start"),
        "dataset": dataset,
        "architecture": checkpoint["architecture"],
        "test_accuracy": test_accuracy,
        "tta": tta,
        # temperature scaling fitted on the validation split: probabilities are softmax(logits / temperature)
        "temperature": checkpoint_temperature(checkpoint, "checkpoint"),
    }


def add_onnx_metadata(path: Path, facts: dict) -> None:
    import onnx

    model = onnx.load(str(path))
    # One entry per key: the int8 graph inherits the fp32 graph's entry from the quantizer, and ONNX's full
    # check refuses a key written twice (which one a runtime reads would be up to the runtime).
    for stale in [entry for entry in model.metadata_props if entry.key == METADATA_KEY]:
        model.metadata_props.remove(stale)
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(facts)
    onnx.save(model, str(path))
